"""Stream open rate: Open -> OpenOk -> Close -> CloseAck, DEPTH cycles in flight.

One WebSocket; each stream connects to the hold target (silent) and is closed as soon as it
is open; a completed CloseAck starts the next Open, until `cycle_seconds` pass.  "direct" is
the baseline: the load generator connects to the same target and closes, DEPTH in flight,
with no gateway (each Open costs a gateway that very connect and close, and more).
With `--reference`, the Node reference server is measured too.
"""
from __future__ import annotations

from typing import Any

from dataclasses import replace

from benchmarks.context import Context, Sizes
from benchmarks.loadgen.session import Spec
from benchmarks.measure import alternate, reference_runner, runner, summarize

NAME = "opens"
DEPTH = 32
BASELINES = ("direct",)


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * (gateways + len(BASELINES))


def step_seconds(sizes: Sizes) -> float:
    return sizes.cycle_seconds + 0.3


def run(ctx: Context) -> list[dict[str, Any]]:
    variants = {}
    for impl in ctx.gateway_impls:
        gateway = ctx.gateway(impl)
        spec = Spec(kind="opens", via="ksw1", url=gateway.address, port=ctx.targets.hold_port,
                    seconds=ctx.sizes.cycle_seconds, depth=DEPTH)
        variants[impl] = runner(ctx, [spec], gateway)
    reference = reference_runner(ctx, lambda url: [replace(spec, url=url)])
    if reference is not None:
        variants["reference"] = reference
    variants["direct"] = runner(ctx, [replace(spec, via="direct", url="")], None)
    outcomes = alternate(ctx, "stream opens", variants)
    return [{"depth": DEPTH, "impl": impl, **summarize(outcome, "count")}
            for impl, outcome in outcomes.items()]
