"""64-byte echo round trips: messages per second and latency percentiles.

One WebSocket with 1, 16, then 256 streams to the echo target, one message in flight per
stream, for `echo_seconds`; the same through socat over as many TCP connections, and
with `--reference` through the Node reference server.  One stream measures latency
(every round trip wakes four processes).  With more in flight, more replies are ready
in one event-loop iteration, which the compiled relay sends as one WebSocket message.
Latency is the round trip seen by the load generator, which shares the machine.
"""
from __future__ import annotations

from typing import Any, Callable

from benchmarks.context import Context, Sizes
from benchmarks.loadgen.session import Spec
from benchmarks.measure import (Run, alternate, percentiles, reference_runner, runner,
                                summarize)

NAME = "echo"
STREAMS = (1, 16, 256)
MESSAGE = 64
BASELINES = ("socat",)


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * (gateways + len(BASELINES)) * len(STREAMS)


def step_seconds(sizes: Sizes) -> float:
    return sizes.echo_seconds + 0.3


def echo_spec(ctx: Context, via: str, url: str, port: int, websockets: int = 1,
              streams: int = 16) -> Spec:
    return Spec(kind="echo", via=via, url=url, port=port, websockets=websockets,
                streams=streams, seconds=ctx.sizes.echo_seconds, message=MESSAGE)


def row(outcome: Any) -> dict[str, Any]:
    """Rate and CPU per message, and the latency percentiles over every run."""
    out = summarize(outcome, "count")
    if not isinstance(outcome, str):
        out.update(percentiles([x for run in outcome for x in run.latencies()]))
    return out


def run(ctx: Context) -> list[dict[str, Any]]:
    port = ctx.targets.echo_port
    relay = ctx.socat(port)
    rows = []
    for streams in STREAMS:
        variants: dict[str, Callable[[], Run]] = {}
        for impl in ctx.gateway_impls:
            gateway = ctx.gateway(impl)
            variants[impl] = runner(ctx, [echo_spec(ctx, "ksw1", gateway.address, port,
                                                    streams=streams)], gateway)
        reference = reference_runner(
            ctx, lambda url, n=streams: [echo_spec(ctx, "ksw1", url, port, streams=n)])
        if reference is not None:
            variants["reference"] = reference
        variants["socat"] = runner(ctx, [echo_spec(ctx, "tcp", "", relay.port,
                                                   streams=streams)], relay)
        outcomes = alternate(ctx, f"echo 64 B, {streams} streams", variants)
        rows += [{"message": MESSAGE, "streams": streams, "websockets": 1, "impl": impl,
                  **row(outcome)} for impl, outcome in outcomes.items()]
    return rows
