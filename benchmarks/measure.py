"""Timed runs with the CPU of every party, repeats in alternating order, and summaries.

Every run reads the CPU time of the server under test (its whole process tree), of the
load generators and of the targets right before "go" and right after the last "done",
so each result says who was busy.  A load-generator process busy for more than
GENERATOR_LIMIT of a core was what limited the run, not the server: such a row says
`generator_bound` and no goal is judged on it.  CPU read over less than CPU_WINDOW
seconds of runs is reported as unmeasured (None), never as a figure.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Optional, Protocol, TypeVar, Union

from benchmarks.context import GIB, MIB, Context
from benchmarks.loadgen.pool import JobError
from benchmarks.loadgen.session import Spec
from benchmarks.procs import CpuSnapshot, cpu_between


K = TypeVar("K", bound=Hashable)
# Above this share of one core, a load-generator process (one uvloop, one core at most)
# is what the run measured: the "~70 % of a core".
GENERATOR_LIMIT = 0.7
# CPU over shorter windows (a quick run's 0.3 s) is too coarse and too disturbed by the
# set-up and tear-down around the run to be a figure.
CPU_WINDOW = 1.0
CORES = os.cpu_count() or 1


class Server(Protocol):
    def cpu(self) -> CpuSnapshot: ...


@dataclass
class Run:
    wall: float
    results: list[dict[str, Any]]
    cpu: dict[str, float]                 # server (if any), client, target: CPU seconds
    busiest_client: float = 0.0           # CPU seconds of the busiest load generator
    rss_base: int = 0                     # server RSS right before "go" (when sampled)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def total(self, unit: str) -> int:
        return sum(r[unit] for r in self.results)

    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.get("latencies", ())]


class Together:
    """Servers measured as one (nginx and the gateway behind it)."""

    def __init__(self, *servers: Server) -> None:
        self.servers = servers

    def cpu(self) -> CpuSnapshot:
        return sum((server.cpu() for server in self.servers), CpuSnapshot())


def measure(ctx: Context, specs: list[Spec], server: Optional[Server],
            rss: Optional[Callable[[], int]] = None) -> Run:
    """One run of `specs` (one per load-generator process); `rss` is sampled every 50 ms."""
    clocks: dict[str, Callable[[], CpuSnapshot]] = {"client": ctx.pool.cpu,
                                                    "target": ctx.targets.cpu}
    if server is not None:  # a "direct" baseline has none
        clocks["server"] = server.cpu
    before: dict[str, CpuSnapshot] = {}
    samples: list[tuple[float, int]] = []
    base = [0, time.perf_counter()]

    def ready() -> None:
        if rss is not None:
            base[:] = [rss(), time.perf_counter()]
            samples.append((0.0, int(base[0])))
        before.update({name: clock() for name, clock in clocks.items()})

    def sample() -> None:
        assert rss is not None
        samples.append((time.perf_counter() - base[1], rss()))

    results, wall = ctx.pool.run(specs, ready, ctx.sizes.timeout,
                                 sample if rss is not None else None)
    after = {name: clock() for name, clock in clocks.items()}
    if rss is not None:  # a run shorter than one sampling period still shows its end
        sample()
    cpu = {name: cpu_between(before[name], after[name]) for name in clocks}
    busiest = max((seconds - before["client"].procs.get(key, 0.0)
                   for key, seconds in after["client"].procs.items()), default=0.0)
    return Run(wall, results, cpu, busiest, int(base[0]), samples)


def runner(ctx: Context, specs: list[Spec], server: Optional[Server],
           rss: Optional[Callable[[], int]] = None) -> Callable[[], Run]:
    """A run to hand to `alternate`."""
    return lambda: measure(ctx, specs, server, rss)


def reference_runner(ctx: Context, specs: Callable[[str], list[Spec]]
                     ) -> Optional[Callable[[], Run]]:
    """A run of the Node reference server at `specs(its URL)`, None without `--reference`.
    The server starts in the first run, so one that cannot start fails that variant (an
    error row), not the whole run."""
    if ctx.reference is None:
        return None

    def run() -> Run:
        server = ctx.reference_server()
        return measure(ctx, specs(server.address), server)

    return run


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
    out.update(cpu_figures({party: sum(r.cpu[party] for r in runs) for party in runs[0].cpu},
                           wall, work, per, scale))
    if out.get("client_cores") is not None:
        # the busiest generator process, in its busiest run
        out["generator_core"] = round(max(r.busiest_client / r.wall for r in runs), 2)
        out["generator_bound"] = out["generator_core"] > GENERATOR_LIMIT
    return out


def cpu_figures(cpu: dict[str, float], wall: float, work: float = 0, per: str = "",
                scale: float = 1.0) -> dict[str, Any]:
    """`<party>_cores` (mean CPU use; 1.0 = one core busy all the time) and, with `per`,
    `<party>_<per>` (CPU per unit of work) for each party of `cpu` (CPU seconds over
    `wall` seconds).  Unmeasured (None, and `cpu_unmeasured` says why) when the window
    was too short, or when a reading is impossible (more cores than the machine has)."""
    out: dict[str, Any] = {}
    why = None
    if wall < CPU_WINDOW:
        why = f"CPU over {wall:.2g} s of runs (< {CPU_WINDOW:g} s)"
    elif any(seconds / wall > CORES * 1.05 for seconds in cpu.values()):
        why = f"a reading above the machine's {CORES} cores"
    for party, seconds in cpu.items():
        if per:
            out[f"{party}_{per}"] = (round(seconds * scale / work, 3)
                                     if work and why is None else None)
        out[f"{party}_cores"] = None if why else round(seconds / wall, 2)
    if why:
        out["cpu_unmeasured"] = why
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
