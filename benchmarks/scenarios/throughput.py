"""Bulk download and upload × streams {1, 16, 64, 256} × WebSockets {1, 8}.

Streams are the total, spread evenly over the WebSockets (so 8 WebSockets start at 16
streams).  Every combination runs through the compiled gateway, the pure-Python one (and with
`--against DIR` another tree's compiled one) and the socat relay (the same number of plain TCP connections, from the same load-generator
processes); the single stream also through websockify.  Each stream moves
`transfer / streams` bytes; set-up (WebSockets, Opens) is outside the clock.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from benchmarks.context import LOADGEN_PROCESSES, RELAY_BYTES_PER_S, Context, Sizes
from benchmarks.loadgen.session import Spec, split
from benchmarks.measure import Run, alternate, runner, summarize

NAME = "throughput"
DIRECTIONS = {"download": "source_port", "upload": "sink_port"}  # -> the target it uses
STREAMS = (1, 16, 64, 256)
WEBSOCKETS = (1, 8)
BASELINES = ("socat",)  # next to every KSW1 gateway of Context.gateway_impls
COMBOS = [(direction, streams, websockets) for direction in DIRECTIONS
          for websockets in WEBSOCKETS for streams in STREAMS if streams >= websockets]


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * (len(COMBOS) * (gateways + len(BASELINES)) + len(DIRECTIONS))


def step_seconds(sizes: Sizes) -> float:
    return 0.3 + sizes.transfer / RELAY_BYTES_PER_S


def variants(ctx: Context, direction: str, streams: int, websockets: int
             ) -> dict[str, Callable[[], Run]]:
    """How to run one combination through each implementation."""
    port = getattr(ctx.targets, DIRECTIONS[direction])
    nbytes = ctx.sizes.transfer // streams
    base = Spec(kind=direction, via="ksw1", port=port, websockets=websockets, streams=streams,
                nbytes=nbytes)

    out = {}
    for impl in ctx.gateway_impls:
        gateway = ctx.gateway(impl)
        out[impl] = runner(ctx, split(replace(base, url=gateway.address), LOADGEN_PROCESSES),
                           gateway)
    relay = ctx.socat(port)
    out["socat"] = runner(ctx, split(replace(base, via="tcp", port=relay.port),
                                     LOADGEN_PROCESSES), relay)
    if streams == 1 and websockets == 1:
        bridge = ctx.websockify(port)
        out["websockify"] = runner(ctx, [Spec(kind=direction, via="rawws", url=bridge.url,
                                              streams=1, nbytes=ctx.sizes.websockify_transfer)],
                                   bridge)
    return out


def run(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for direction, streams, websockets in COMBOS:
        label = f"{direction} {streams} streams / {websockets} WS"
        outcomes = alternate(ctx, label, variants(ctx, direction, streams, websockets))
        for impl, outcome in outcomes.items():
            rows.append({"direction": direction, "streams": streams, "websockets": websockets,
                         "impl": impl, **summarize(outcome, "bytes")})
    return rows
