"""Idle connections: gateway RSS per WebSocket with one open stream, at 1,000 and 10,000.

A fresh gateway per count (freed memory of an earlier count would hide growth).  After a
small warm-up (first-connection allocations), RSS is read, the load generators open the
WebSockets and their streams (to the hold target) in batches, and RSS
is read again once every OpenOk is in: (after - before) / count.

Each connection costs the gateway two sockets.  When the hard RLIMIT_NOFILE (which needs
CAP_SYS_RESOURCE to raise) is too small for one process, the gateway runs with
`--workers N` and the RSS is that of all its processes.
"""
from __future__ import annotations

import resource
from typing import Any

from benchmarks.context import LOADGEN_PROCESSES, MIB, Context, Sizes
from benchmarks.loadgen.session import Spec, split
from benchmarks.measure import error_row, measure

NAME = "idle"
WARMUP = 20
FD_MARGIN = 256  # listeners, pipes, epoll, stdio and the like of one gateway process


def steps(sizes: Sizes, gateways: int) -> int:
    return len(sizes.idle_connections)


def step_seconds(sizes: Sizes) -> float:
    return 2 + max(sizes.idle_connections) / 1000  # a fresh gateway, then the connections


def gateway_processes(connections: int) -> int:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -(-(2 * connections + FD_MARGIN) // limit)


def _hold(ctx: Context, url: str, connections: int) -> list[Spec]:
    """`connections` WebSockets with one stream each, from every load generator."""
    return split(Spec(kind="hold", via="ksw1", url=url, port=ctx.targets.hold_port,
                      websockets=connections, streams=connections), LOADGEN_PROCESSES)


def run(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for count in ctx.sizes.idle_connections:
        ctx.progress.step(f"idle {count} WebSockets")
        workers = gateway_processes(count)
        head = {"connections": count, "streams_per_connection": 1, "impl": "compiled",
                "gateway_processes": workers}
        gateway = ctx.fresh_gateway("compiled", workers=workers)
        try:
            with error_row(ctx, rows, head, f"idle {count}"):
                measure(ctx, _hold(ctx, gateway.address, WARMUP), gateway)
                before = gateway.rss()
                held = measure(ctx, _hold(ctx, gateway.address, count), gateway, rss=gateway.rss)
                per_connection = (held.rss_base - before) / count
                rows.append({**head, "rss_before_mib": round(before / MIB, 1),
                             "rss_after_mib": round(held.rss_base / MIB, 1),
                             "rss_per_connection_kib": round(per_connection / 1024, 2)})
        finally:
            gateway.stop()
    return rows
