"""Timed runs with the CPU of every party, repeats in alternating order, and summaries.

Every run reads the CPU time of the server under test (its whole process tree), of the
load generators and of the targets right before "go" and right after the last "done",
so each result says who was busy: a throughput limited by the load generator shows as
its `client_cores` near 1.0 (one process per WebSocket group, one core each).
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Optional, Protocol, TypeVar, Union

from benchmarks.context import GIB, MIB, Context
from benchmarks.loadgen.pool import JobError
from benchmarks.loadgen.session import Spec


K = TypeVar("K", bound=Hashable)


class Server(Protocol):
    def cpu_seconds(self) -> float: ...


@dataclass
class Run:
    wall: float
    results: list[dict[str, Any]]
    cpu: dict[str, float]                 # server, client, target: CPU seconds in the run
    rss_base: int = 0                     # server RSS right before "go" (when sampled)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def total(self, unit: str) -> int:
        return sum(r[unit] for r in self.results)

    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.get("latencies", ())]


def measure(ctx: Context, specs: list[Spec], server: Optional[Server],
            rss: Optional[Callable[[], int]] = None) -> Run:
    """One run of `specs` (one per load-generator process); `rss` is sampled every 50 ms."""
    clocks: dict[str, Callable[[], float]] = {
        "server": server.cpu_seconds if server is not None else (lambda: 0.0),
        "client": ctx.pool.cpu_seconds, "target": ctx.targets.cpu_seconds}
    before: dict[str, float] = {}
    samples: list[tuple[float, int]] = []
    base = [0, time.perf_counter()]

    def ready() -> None:
        if rss is not None:
            base[:] = [rss(), time.perf_counter()]
        before.update({name: clock() for name, clock in clocks.items()})

    def sample() -> None:
        assert rss is not None
        samples.append((time.perf_counter() - base[1], rss()))

    results, wall = ctx.pool.run(specs, ready, ctx.sizes.timeout,
                                 sample if rss is not None else None)
    cpu = {name: clock() - before[name] for name, clock in clocks.items()}
    return Run(wall, results, cpu, int(base[0]), samples)


def runner(ctx: Context, specs: list[Spec], server: Optional[Server],
           rss: Optional[Callable[[], int]] = None) -> Callable[[], Run]:
    """A run to hand to `alternate`."""
    return lambda: measure(ctx, specs, server, rss)


Outcome = Union[list[Run], str]  # the runs, or why the measurement failed


# What a failed run raises: the suite records it and goes on with the next measurement.
RUN_ERRORS = (JobError, RuntimeError, OSError)


@contextmanager
def error_row(ctx: Context, rows: list[dict[str, Any]], head: dict[str, Any],
              label: str) -> Iterator[None]:
    """Run one measurement that appends its row; if it fails, append `head` + the error."""
    try:
        yield
    except RUN_ERRORS as exc:
        rows.append({**head, "error": f"{type(exc).__name__}: {exc}"})
        ctx.progress.note(f"{label}: {rows[-1]['error']}")


def alternate(ctx: Context, label: str, variants: dict[K, Callable[[], Run]],
              repeat: Optional[int] = None) -> dict[K, Outcome]:
    """`repeat` runs of each variant, in forward then reverse order and so on, so every
    variant sees the same machine weather; a variant that fails is not run again."""
    runs: dict[K, list[Run]] = {name: [] for name in variants}
    errors: dict[K, str] = {}
    names = list(variants)
    for i in range(repeat or ctx.sizes.repeat):
        for name in names if i % 2 == 0 else reversed(names):
            ctx.progress.step(f"{label} {name}")
            if name in errors:
                continue
            try:
                runs[name].append(variants[name]())
            except RUN_ERRORS as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                ctx.progress.note(f"{label} {name}: {errors[name]}")
    return {name: errors.get(name, runs[name]) for name in names}


def summarize(outcome: Outcome, unit: str) -> dict[str, Any]:
    """The median run's rate, CPU per unit of work over all runs, and who was busy.

    `unit` is "bytes" (rates in MiB/s, CPU in seconds per GiB) or "count" (operations per
    second, CPU in microseconds per operation)."""
    if isinstance(outcome, str):
        return {"error": outcome}
    runs = outcome
    rates = [r.total(unit) / r.wall for r in runs]
    work = sum(r.total(unit) for r in runs)
    wall = sum(r.wall for r in runs)
    out: dict[str, Any] = {"runs": len(runs)}
    scale: float
    if unit == "bytes":
        out["mib_per_s"] = round(statistics.median(rates) / MIB, 1)
        out["mib_per_s_runs"] = [round(r / MIB, 1) for r in rates]
        per, scale = "cpu_s_per_gib", GIB
    else:
        out["ops_per_s"] = round(statistics.median(rates))
        out["ops_per_s_runs"] = [round(r) for r in rates]
        per, scale = "cpu_us_per_op", 1e6
    for party in ("server", "client", "target"):
        cpu = sum(r.cpu[party] for r in runs)
        out[f"{party}_{per}"] = round(cpu * scale / work, 3) if work else None
        out[f"{party}_cores"] = round(cpu / wall, 2)  # mean CPU use during the runs
    return out


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 and max, in microseconds."""
    if not latencies:
        return {}
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {"p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99), "p999_us": at(0.999),
            "max_us": round(ordered[-1] * 1e6, 1)}
