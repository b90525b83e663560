"""wss://: the gateway's own TLS, and nginx (deploy/nginx.conf, one worker) terminating
TLS in front of a plain gateway, next to plain ws://, in the same run.

Two loads through one WebSocket: the bulk download of 64 streams and 64-byte echo over
16 streams.  The certificate is a fresh test CA's (trustme), for 127.0.0.1; the load
generator checks it.  The nginx row's server CPU is nginx's and the gateway's together.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import trustme

from benchmarks.context import RELAY_BYTES_PER_S, Context, Sizes
from benchmarks.loadgen.session import Spec
from benchmarks.measure import Run, Together, alternate, runner, summarize
from benchmarks.scenarios.echo import echo_spec, row

NAME = "tls"
LOADS = {"download": 64, "echo": 16}  # -> streams
VIAS = ("ws", "wss", "nginx")         # plain; the gateway's TLS; nginx's TLS, plain behind


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * len(LOADS) * len(VIAS)


def step_seconds(sizes: Sizes) -> float:
    return 0.3 + max(sizes.transfer / RELAY_BYTES_PER_S, sizes.echo_seconds)


def _spec(ctx: Context, load: str, url: str, ca: str) -> Spec:
    streams = LOADS[load]
    if load == "echo":
        return replace(echo_spec(ctx, "ksw1", url, ctx.targets.echo_port, streams=streams),
                       ca=ca)
    return Spec(kind="download", via="ksw1", url=url, port=ctx.targets.source_port,
                streams=streams, nbytes=ctx.sizes.transfer // streams, ca=ca)


def run(ctx: Context) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="ksw1fast-bench-tls-"))
    try:
        authority = trustme.CA()
        cert = authority.issue_cert("127.0.0.1", "localhost")
        chain, key, ca = tmp / "chain.pem", tmp / "key.pem", tmp / "ca.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        authority.cert_pem.write_to_path(str(ca))
        plain = ctx.gateway("compiled")
        tls = ctx.gateway("compiled", "--tls-cert", str(chain), "--tls-key", str(key))
        port = urlsplit(plain.address).port
        assert port is not None
        nginx = ctx.nginx(tmp, port, chain, key)
        servers = {"ws": (plain.address, plain), "wss": (tls.address, tls),
                   "nginx": (nginx.url, Together(nginx, plain))}
        rows = []
        for load, streams in LOADS.items():
            variants: dict[str, Callable[[], Run]] = {
                via: runner(ctx, [_spec(ctx, load, url, str(ca))], server)
                for via, (url, server) in servers.items()}
            outcomes = alternate(ctx, f"{load} over TLS", variants)
            for via, outcome in outcomes.items():
                stats = summarize(outcome, "bytes") if load == "download" else row(outcome)
                rows.append({"load": load, "via": via, "streams": streams, **stats})
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
