"""Bounded memory in numbers: gateway RSS, sampled every 50 ms, while `peak_bytes` are
downloaded over 64 streams of one WebSocket.

A fresh gateway per implementation; a small download first (so one-time allocations
such as the shared read buffer are in the baseline), then the big one.  Reports the
peak minus the RSS right before it started, and the samples for the plot.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.context import MIB, RELAY_BYTES_PER_S, Context, Sizes
from benchmarks.loadgen.session import Spec
from benchmarks.measure import error_row, measure, summarize

NAME = "peak_rss"
STREAMS = 64
WARMUP_BYTES = 64 * 1024  # per stream
IMPLS = ("compiled", "pure")


def steps(sizes: Sizes, gateways: int) -> int:
    return len(IMPLS)


def step_seconds(sizes: Sizes) -> float:
    return 2 + sizes.peak_bytes / RELAY_BYTES_PER_S  # a fresh gateway, then the download


def run(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for impl in IMPLS:
        ctx.progress.step(f"peak RSS {impl}")
        head = {"impl": impl, "streams": STREAMS, "bytes": ctx.sizes.peak_bytes}
        gateway = ctx.fresh_gateway(impl)
        try:
            with error_row(ctx, rows, head, f"peak RSS {impl}"):
                spec = Spec(kind="download", via="ksw1", url=gateway.address,
                            port=ctx.targets.source_port, streams=STREAMS, nbytes=WARMUP_BYTES)
                measure(ctx, [spec], gateway)
                big = measure(ctx, [replace(spec, nbytes=ctx.sizes.peak_bytes // STREAMS)],
                              gateway, rss=gateway.rss)
                peak = max([rss for _, rss in big.rss_samples] or [big.rss_base])
                rows.append({**head, **summarize([big], "bytes"),
                             "rss_base_mib": round(big.rss_base / MIB, 1),
                             "rss_peak_mib": round(peak / MIB, 1),
                             "rss_growth_mib": round((peak - big.rss_base) / MIB, 1),
                             "rss_samples_mib": [[round(t, 3), round(rss / MIB, 1)]
                                                 for t, rss in big.rss_samples]})
        finally:
            gateway.stop()
    return rows
