"""DNS queries per second: DnsQuery("localhost", IPv4) -> DnsResult, DEPTH in flight.

The gateway resolves with c-ares; "direct" looks the same name up with getaddrinfo on
uvloop's thread pool in the load-generator process, without a gateway: a ceiling.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.context import Context, Sizes
from benchmarks.loadgen.session import Spec
from benchmarks.measure import alternate, runner, summarize

NAME = "dns"
DEPTH = 32
BASELINES = ("direct",)


def steps(sizes: Sizes, gateways: int) -> int:
    return sizes.repeat * (gateways + len(BASELINES))


def step_seconds(sizes: Sizes) -> float:
    return sizes.cycle_seconds + 0.3


def run(ctx: Context) -> list[dict[str, Any]]:
    base = Spec(kind="dns", via="ksw1", seconds=ctx.sizes.cycle_seconds, depth=DEPTH)
    variants = {}
    for impl in ctx.gateway_impls:
        gateway = ctx.gateway(impl)
        variants[impl] = runner(ctx, [replace(base, url=gateway.address)], gateway)
    variants["direct"] = runner(ctx, [replace(base, via="direct")], None)
    outcomes = alternate(ctx, "DNS queries", variants)
    return [{"depth": DEPTH, "impl": impl, **summarize(outcome, "count")}
            for impl, outcome in outcomes.items()]
