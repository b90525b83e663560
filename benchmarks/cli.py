"""Command line: `python -m benchmarks run [--quick] [--out DIR] [--only NAME ...]`."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

import ksw1fast
from benchmarks import report
from benchmarks.baselines.reference import SCENARIOS as REFERENCE_SCENARIOS
from benchmarks.context import FULL, QUICK, Context, Sizes, gateway_impls
from benchmarks.goals import goals, ratios
from benchmarks.procs import raise_fd_limit
from benchmarks.progress import Progress
from benchmarks.scenarios import SCENARIOS
from ksw1fast.extensions import COMPILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Benchmarks of the ksw1fast gateway.")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the scenarios, print a table, write results")
    run.add_argument("--quick", action="store_true",
                     help="tiny sizes (seconds): checks that every scenario still works")
    run.add_argument("--out", type=Path,
                     help="directory for results.json, summary.md and the PNG plots")
    run.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                     help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    run.add_argument("--repeat", type=int, help="runs per measurement (default: "
                     f"{QUICK.repeat} quick, {FULL.repeat} full)")
    run.add_argument("--workers", type=_counts, metavar="N,N,...",
                     help="the worker counts the workers scenario compares (default "
                          f"{','.join(map(str, FULL.workers))}), e.g. 1,2,4,8 on a machine "
                          "with the cores for it; the report states the cores it had")
    run.add_argument("--against", type=_source_tree, metavar="DIR",
                     help="also measure the compiled gateway of another source tree (its "
                          "extensions built in place), e.g. a worktree of the commit before a "
                          "change; the ratios then include compiled ÷ against")
    run.add_argument("--reference", type=_bundle, metavar="BUNDLE",
                     help="also measure the Node reference server (the polyfill's "
                          "ws-gateway server.ts bundled into one CommonJS file, see "
                          "benchmarks/README.md) in the opens and echo scenarios; the "
                          "goals that are multiples of its figures are then judged on it")
    return parser


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        counts = ()
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of worker counts like 1,2,4")
    return counts


def _source_tree(text: str) -> Path:
    tree = Path(text).resolve()
    if not (tree / "ksw1fast" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{tree} has no ksw1fast/ package")
    return tree


def _bundle(text: str) -> Path:
    bundle = Path(text).resolve()
    if not bundle.is_file():
        raise argparse.ArgumentTypeError(f"{bundle} is not a file")
    return bundle


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(fd_limit: int) -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "ksw1fast": ksw1fast.__version__, "extensions_built": COMPILED,
        "fd_limit": fd_limit, "load_average_at_start": os.getloadavg(),
    }


def run(names: Sequence[str], sizes: Sizes, quick: bool, out: Optional[Path],
        against: Optional[Path] = None, reference: Optional[Path] = None) -> dict[str, Any]:
    machine = machine_info(raise_fd_limit())  # before: children inherit the raised limit
    chosen = [SCENARIOS[name] for name in names]
    gateways = len(gateway_impls(against))

    def servers(name: str) -> int:  # the reference is one more server in its scenarios
        return gateways + int(reference is not None and name in REFERENCE_SCENARIOS)

    progress = Progress([(module.steps(sizes, servers(module.NAME)),
                          module.step_seconds(sizes)) for module in chosen])
    started = time.monotonic()
    scenarios: dict[str, list[dict[str, Any]]] = {}
    with Context(sizes, progress, against, reference) as ctx:
        try:
            for module in chosen:
                scenarios[module.NAME] = module.run(ctx)
        finally:
            progress.close()
    ratio_of = ratios(scenarios)
    doc = {"machine": machine, "quick": quick, "sizes": dataclasses.asdict(sizes),
           "against": str(against) if against else None,
           "reference": str(reference) if reference else None,
           "duration_s": round(time.monotonic() - started, 1), "scenarios": scenarios,
           "ratios": ratio_of, "goals": [g.as_dict() for g in goals(scenarios, ratio_of, quick)],
           "ratios_not_judged": ratio_of.bound}
    print(report.write(doc, out))
    print(f"{len(chosen)} scenarios in {doc['duration_s']:g} s"
          + (f"; results in {out}" if out else ""), file=sys.stderr)
    return doc


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.print_help()
        return
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    if args.workers:
        sizes = dataclasses.replace(sizes, workers=args.workers)
    # SIGTERM (a CI timeout) unwinds like an error, so every server and process is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args.only or list(SCENARIOS), sizes, args.quick, args.out, args.against,
        args.reference)
