"""The benchmark suite's bookkeeping, without running a benchmark: CPU accounting over
process trees, what makes a figure unmeasured or a goal unjudged, the time-left estimate.

`benchmarks` is not packaged: it is imported from the repository root (appended to
sys.path, after site-packages, so `ksw1fast` stays the installed package).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.goals import Goal, goals, ratios  # noqa: E402
from benchmarks.measure import CPU_WINDOW, GENERATOR_LIMIT, cpu_figures  # noqa: E402
from benchmarks.procs import CpuSnapshot, cpu_between, tree_cpu  # noqa: E402
from benchmarks.progress import Progress  # noqa: E402
from benchmarks.report import goals_table, markdown  # noqa: E402

BURN = "import sys, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_a_child_reaped_in_the_window_adds_only_what_it_spent_in_it() -> None:
    """A child that burned CPU before the first snapshot and is reaped before the
    second: its lifetime lands in the parent's children_* counters, and must not be
    counted as spent in the window (it put a PKCS#11 agent's life into 0.5 s)."""
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys\n"
                               f"child = subprocess.Popen([sys.executable, '-c', {BURN!r} + "
                               "'sys.stdin.read()\\n'], stdin=subprocess.PIPE)\n"
                               "sys.stdin.readline()\n"
                               "child.stdin.close(); child.wait()\n"
                               "sys.stdin.readline()\n"],
                              stdin=subprocess.PIPE, text=True)
    assert parent.stdin is not None
    try:
        ps = psutil.Process(parent.pid)
        deadline = time.monotonic() + 30
        while True:  # until the child has burned its CPU and waits for its stdin
            kids = ps.children()
            if kids and kids[0].cpu_times().user + kids[0].cpu_times().system >= 0.25 \
                    and kids[0].status() == psutil.STATUS_SLEEPING:
                break
            assert time.monotonic() < deadline, "the child never finished burning"
            time.sleep(0.05)
        before = tree_cpu(ps)
        parent.stdin.write("\n")
        parent.stdin.flush()
        while ps.children():  # reaped
            assert time.monotonic() < deadline, "the child was never reaped"
            time.sleep(0.05)
        after = tree_cpu(ps)
        assert after.reaped - before.reaped >= 0.25  # the kernel did add its lifetime
        assert cpu_between(before, after) < 0.15, (before, after)
    finally:
        parent.stdin.close()
        parent.wait(30)


def test_a_process_gone_unreaped_takes_nothing_from_the_window() -> None:
    """A process of `before` that ended without the tree reaping it (an orphan init
    reaps) must not subtract its earlier CPU from what the others spent."""
    before = CpuSnapshot({(1, 0.0): 5.0, (2, 0.0): 3.0}, reaped=0.0)
    after = CpuSnapshot({(1, 0.0): 5.5}, reaped=0.0)
    assert cpu_between(before, after) == 0.5
    reaped = CpuSnapshot({(1, 0.0): 5.5}, reaped=3.25)  # reaped by process 1 instead
    assert cpu_between(before, reaped) == 0.75


def test_cpu_over_a_short_window_is_not_a_figure() -> None:
    short = cpu_figures({"server": 0.01, "client": 0.02}, CPU_WINDOW / 4, 1000, "per_op", 1e6)
    assert short["server_cores"] is None and short["server_per_op"] is None
    assert "cpu_unmeasured" in short
    long = cpu_figures({"server": 1.0}, CPU_WINDOW * 2, 1000, "per_op", 1e6)
    assert long["server_cores"] == 0.5 and long["server_per_op"] == 1000.0
    assert "cpu_unmeasured" not in long


def test_more_cores_than_the_machine_has_is_not_a_figure() -> None:
    impossible = cpu_figures({"server": 1000.0}, CPU_WINDOW * 2)
    assert impossible["server_cores"] is None
    assert "cores" in impossible["cpu_unmeasured"]


def _echo(impl: str, rate: int, generator: float) -> dict:
    return {"impl": impl, "streams": 16, "ops_per_s": rate, "generator_core": generator,
            "generator_bound": generator > GENERATOR_LIMIT}


def test_no_goal_is_judged_on_a_run_the_load_generator_limited() -> None:
    scenarios = {"echo": [_echo("compiled", 90_000, 0.95), _echo("pure", 30_000, 0.4)]}
    ratio_of = ratios(scenarios)
    goal = next(g for g in goals(scenarios, ratio_of) if "16 streams: compiled × pure" in g.name)
    assert goal.value == 3.0 and goal.met is None
    assert "load generator" in (goal.why_not_judged or "")
    assert "not judged" in goals_table([goal.as_dict()])
    # the same figures with a generator that kept up: judged
    scenarios["echo"][0] = _echo("compiled", 90_000, 0.5)
    ratio_of = ratios(scenarios)
    goal = next(g for g in goals(scenarios, ratio_of) if "16 streams: compiled × pure" in g.name)
    assert goal.met is True


def test_a_direct_baseline_may_keep_its_generator_busy() -> None:
    """"direct" is the load generator's own loop: its being busy is what it measures."""
    scenarios = {"opens": [{"impl": "compiled", "ops_per_s": 9_000, "generator_core": 0.2,
                            "generator_bound": False},
                           {"impl": "direct", "ops_per_s": 10_000, "generator_core": 1.0,
                            "generator_bound": True}]}
    ratio_of = ratios(scenarios)
    assert ratio_of["opens_vs_direct"] == 0.9 and not ratio_of.bound



def _single(impl: str, rate: int, p99: float) -> dict:
    return {"impl": impl, "streams": 1, "ops_per_s": rate, "p99_us": p99,
            "generator_core": 0.3, "generator_bound": False}


def test_the_reference_goals_use_the_reference_when_it_was_measured() -> None:
    """Measured (`--reference`): opens ≥ 2x and single-stream echo ≥ 1.5x the Node
    reference at a p99 no worse; else the same goals scaled onto direct and socat."""
    opens = [{"impl": "compiled", "ops_per_s": 13_000, "generator_core": 0.2},
             {"impl": "direct", "ops_per_s": 14_000, "generator_core": 1.0,
              "generator_bound": True}]
    echo = [_single("compiled", 9_000, 180.0), _single("socat", 12_000, 140.0)]
    scenarios = {"opens": opens, "echo": echo}
    scaled = {g.name: g for g in goals(scenarios, ratios(scenarios))}
    assert [n for n in scaled if "reference" in n] == [
        "stream opens/s: × direct TCP connect/close loop (2× the Node reference, scaled)",
        "single-stream 64-byte echo msgs/s: × socat relay (1.5× the Node reference, scaled)",
        "single-stream 64-byte echo p99: ÷ socat relay's (the Node reference's, scaled)"]
    assert [g.met for n, g in scaled.items() if "reference" in n] == [False, False, True]
    opens.append({"impl": "reference", "ops_per_s": 6_000, "generator_core": 0.3})
    echo.append(_single("reference", 6_000, 200.0))
    measured = {g.name: g for g in goals(scenarios, ratios(scenarios))}
    assert {n: (g.value, g.met) for n, g in measured.items() if "reference" in n} == {
        "stream opens/s: × the Node reference": (2.167, True),
        "single-stream 64-byte echo msgs/s: × the Node reference": (1.5, True),
        "single-stream 64-byte echo p99: ÷ the Node reference's": (0.9, True)}
    # a reference that failed: its goals are unmeasured, not judged on the scaled ones
    opens[-1] = {"impl": "reference", "error": "RuntimeError: reference did not start"}
    failed = {g.name: g for g in goals(scenarios, ratios(scenarios))}
    assert (failed["stream opens/s: × the Node reference"].value,
            failed["stream opens/s: × the Node reference"].met) == (None, None)

def test_a_quick_run_judges_nothing_and_says_so() -> None:
    scenarios = {"echo": [_echo("compiled", 90_000, 0.5), _echo("pure", 30_000, 0.4)]}
    ratio_of = ratios(scenarios)
    judged = goals(scenarios, ratio_of, quick=True)
    assert all(g.met is None and g.why_not_judged for g in judged)
    doc = {"machine": {"cpu_count": 2, "cpu_model": "x", "ram_gib": 1, "python": "3",
                       "ksw1fast": "0", "load_average_at_start": [0.0, 0, 0], "date": "d"},
           "quick": True, "goals": [g.as_dict() for g in judged],
           "scenarios": scenarios, "ratios": ratio_of}
    text = markdown(doc)
    assert text.startswith("**A quick run**") and "2 cores" in text
    assert "| met |" in text and "| met" not in text.split("| met |", 1)[1]


def test_a_goal_on_an_unmeasured_figure_is_not_met() -> None:
    assert Goal("CPU-s/GiB", None, 0.6, higher_is_better=False).met is None
    assert Goal("CPU-s/GiB", 0.0, 0.6, higher_is_better=False).met is True  # a real 0


@pytest.mark.parametrize("done", [1, 3])
def test_the_time_left_weighs_slow_steps(done: int) -> None:
    """Two quick steps and two 10x slower ones: after the quick ones, the estimate is
    the slow ones' share, at the pace the quick ones went."""
    progress = Progress([(2, 1.0), (2, 10.0)])
    progress._started -= 2.0  # the quick steps took 1 s each
    for _ in range(done):
        progress.step("x")
    left = progress.left()
    expected = {1: 22.0, 3: 20.0}[done]  # at 1 s per planned second
    assert abs(left - expected) / expected < 0.2, left


def test_both_readmes_install_and_run_the_benchmarks_the_same_way() -> None:
    repo = Path(__file__).resolve().parents[1]
    texts = [(repo / name).read_text() for name in ("README.md", "benchmarks/README.md")]
    for text in texts:
        assert "pip install -e '.[bench]'" in text
        assert "From the root of a checkout" in text
    installs = [{line for line in text.splitlines() if line.startswith("pip install -e")}
                for text in texts]
    assert installs[0] == installs[1], installs
