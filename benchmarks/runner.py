"""`python -m benchmarks`: throughput of the compiled and pure-Python gateway, as JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence, Union

import psutil
import uvloop

import ksw1fast
from benchmarks.gateway_proc import GatewayProcess
from benchmarks.targets import Targets
from benchmarks.throughput import SCENARIOS, Transfer, run_transfer
from ksw1fast._impl import EXTENSIONS

MIB = 1024 * 1024
GIB = 1024 * MIB
STREAM_COUNTS = (1, 64)
IMPLS = ("compiled", "pure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--bytes", type=int, default=256 * MIB,
                      help="bytes moved per run of a scenario, split evenly over its streams")
    size.add_argument("--quick", action="store_true", help="32 MiB per run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per scenario and gateway; the median run is reported")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one run may take before the scenario is recorded as failed")
    parser.add_argument("--out", help="also write the JSON document to this file")
    return parser


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ksw1fast": ksw1fast.__version__,
        "client_uses_extensions": EXTENSIONS,  # the client shares the gateway's codec
        "load_average_at_start": os.getloadavg(),
    }


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_once(scenario: str, streams: int, gateway: GatewayProcess, targets: Targets,
                   total: int, timeout: float) -> Union[Transfer, str]:
    """One timed run; a failure comes back as its description, so the next run still runs."""
    per_stream, target = SCENARIOS[scenario]
    port = targets.source_port if target == "source" else targets.sink_port

    def clocks() -> dict[str, float]:
        return {"server": gateway.cpu_seconds(), "client": time.process_time(),
                "target": targets.cpu_seconds()}

    if gateway.exit_code() is not None:
        return f"gateway exited with code {gateway.exit_code()}"
    try:
        return await asyncio.wait_for(
            run_transfer(gateway.address, port, total, streams, per_stream, clocks), timeout)
    except asyncio.TimeoutError:
        return f"timed out after {timeout:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def summarize(head: dict[str, Any], runs: list[Transfer]) -> dict[str, Any]:
    """Throughput of the median run; CPU as means over all runs (10 ms ticks add up)."""
    n = len(runs)
    median = sorted(runs, key=lambda t: t.seconds)[n // 2]
    moved = sum(t.bytes for t in runs)
    cpu = {name: sum(t.cpu_seconds[name] for t in runs) for name in median.cpu_seconds}
    return {
        **head, "runs": n, "bytes": median.bytes, "seconds": round(median.seconds, 4),
        "bytes_per_second": round(median.bytes / median.seconds),
        "mib_per_second": round(median.bytes / median.seconds / MIB, 1),
        "mib_per_second_runs": [round(t.bytes / t.seconds / MIB, 1) for t in runs],
        "server_cpu_seconds": round(cpu["server"] / n, 3),
        "server_cpu_s_per_gib": round(cpu["server"] * GIB / moved, 3),
        "client_cpu_seconds": round(cpu["client"] / n, 3),
        "client_cpu_s_per_gib": round(cpu["client"] * GIB / moved, 3),
        "target_cpu_seconds": round(cpu["target"] / n, 3),
    }


def _describe(result: dict[str, Any]) -> str:
    name = f"{result['scenario']:8} streams={result['streams']:<2} {result['impl']:8}"
    if "error" in result:
        return f"{name} ERROR {result['error']}"
    return (f"{name} {result['mib_per_second']:8.1f} MiB/s  "
            f"server {result['server_cpu_s_per_gib']:.2f} CPU-s/GiB  "
            f"client {result['client_cpu_s_per_gib']:.2f} CPU-s/GiB")


async def run_scenario(scenario: str, streams: int, gateways: dict[str, GatewayProcess],
                       targets: Targets, total: int, repeat: int,
                       timeout: float) -> list[dict[str, Any]]:
    """Runs alternate between the gateways so both see the same machine weather."""
    runs: dict[str, list[Transfer]] = {impl: [] for impl in IMPLS}
    errors: dict[str, str] = {}
    for _ in range(repeat):
        for impl in IMPLS:
            if impl in errors:
                continue  # a broken scenario stays broken; do not pay its timeout again
            outcome = await run_once(scenario, streams, gateways[impl], targets, total, timeout)
            if isinstance(outcome, str):
                errors[impl] = outcome
            else:
                runs[impl].append(outcome)
    results = []
    for impl in IMPLS:
        head = {"scenario": scenario, "streams": streams, "impl": impl}
        result = ({**head, "error": errors[impl], "runs_ok": len(runs[impl])}
                  if impl in errors else summarize(head, runs[impl]))
        _progress(_describe(result))
        results.append(result)
    return results


async def run_all(gateways: dict[str, GatewayProcess], targets: Targets, total: int,
                  repeat: int, timeout: float) -> list[dict[str, Any]]:
    results = []
    for scenario in SCENARIOS:
        for streams in STREAM_COUNTS:
            results += await run_scenario(scenario, streams, gateways, targets, total, repeat,
                                          timeout)
    return results


def ratios(results: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """compiled/pure throughput, and pure/compiled server CPU per byte (both: >1 = faster)."""
    by_key = {(r["scenario"], r["streams"], r["impl"]): r for r in results}
    out: dict[str, Optional[float]] = {}
    for scenario in SCENARIOS:
        for streams in STREAM_COUNTS:
            fast = by_key[(scenario, streams, "compiled")]
            slow = by_key[(scenario, streams, "pure")]
            ok = "error" not in fast and "error" not in slow
            out[f"{scenario}_{streams}_compiled_vs_pure"] = (
                round(fast["bytes_per_second"] / slow["bytes_per_second"], 2) if ok else None)
            out[f"{scenario}_{streams}_server_cpu_pure_vs_compiled"] = (
                round(slow["server_cpu_s_per_gib"] / fast["server_cpu_s_per_gib"], 2)
                if ok and fast["server_cpu_s_per_gib"] else None)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    total = 32 * MIB if args.quick else args.bytes
    if total < max(STREAM_COUNTS) or args.repeat < 1:
        raise SystemExit("need --bytes of at least one byte per stream and --repeat >= 1")
    machine = machine_info()  # before the run: the load average is of the machine, not of us
    _progress(f"benchmarks: {total / MIB:g} MiB per run, {args.repeat} runs per scenario "
              f"and gateway, timeout {args.timeout:g} s per run")
    with Targets() as targets, GatewayProcess("compiled") as compiled, \
            GatewayProcess("pure") as pure:
        results = uvloop.run(run_all({"compiled": compiled, "pure": pure}, targets, total,
                                     args.repeat, args.timeout))
    doc = {"machine": machine, "bytes_per_run": total, "repeat": args.repeat,
           "results": results, "ratios": ratios(results)}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
