"""Workers: 8 WebSockets against `--workers N` for each N of the sweep (compiled;
`run --workers 1,2,4,8`, default 1,2).

Two loads, each from two load-generator processes: the bulk download of 64 streams
(8 per WebSocket) and 64-byte echo over 64 streams (8 per WebSocket).  The kernel
spreads the WebSockets over the workers (SO_REUSEPORT), not always evenly.  Rows say
how many cores the machine had: workers cannot scale past the cores that the load
generators and the targets leave them.
"""
from __future__ import annotations

from typing import Any

from benchmarks.context import LOADGEN_PROCESSES, RELAY_BYTES_PER_S, Context, Sizes
from benchmarks.loadgen.session import Spec, split
from benchmarks.measure import CORES, alternate, runner, summarize
from benchmarks.scenarios.echo import echo_spec, row

NAME = "workers"
WEBSOCKETS = 8
STREAMS = 64
LOADS = ("download", "echo")


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * len(sizes.workers) * len(LOADS)


def step_seconds(sizes: Sizes) -> float:
    return 0.3 + max(sizes.transfer / RELAY_BYTES_PER_S, sizes.echo_seconds)


def _spec(ctx: Context, load: str, url: str) -> Spec:
    if load == "echo":
        return echo_spec(ctx, "ksw1", url, ctx.targets.echo_port, WEBSOCKETS, STREAMS)
    return Spec(kind="download", via="ksw1", url=url, port=ctx.targets.source_port,
                websockets=WEBSOCKETS, streams=STREAMS, nbytes=ctx.sizes.transfer // STREAMS)


def run(ctx: Context) -> list[dict[str, Any]]:
    gateways = {n: ctx.gateway("compiled", workers=n) for n in ctx.sizes.workers}
    rows = []
    for load in LOADS:
        variants = {n: runner(ctx, split(_spec(ctx, load, g.address), LOADGEN_PROCESSES), g)
                    for n, g in gateways.items()}
        outcomes = alternate(ctx, f"{load} {WEBSOCKETS} WS, workers", variants)
        for workers, outcome in outcomes.items():
            stats = summarize(outcome, "bytes") if load == "download" else row(outcome)
            rows.append({"load": load, "workers": workers, "cores": CORES,
                         "websockets": WEBSOCKETS,
                         "streams": STREAMS, **stats})
    return rows
