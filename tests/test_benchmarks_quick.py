"""The benchmark suite still runs: `python -m benchmarks run --quick` end to end.

Every scenario and baseline (socat, websockify, SoftHSM for PKCS#11) runs on tiny sizes;
the test checks that each produced numeric results and that the plots were drawn. It
never asserts a speed.

CI runs the tests against the installed wheel, where `benchmarks` (not packaged) is not
importable: the subprocess appends the repository root to sys.path (after
site-packages, so `ksw1fast` still resolves to the installed package, whose compiled
extensions a clean checkout lacks) and runs from a temporary directory.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.softhsm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("throughput", "echo", "opens", "dns", "idle", "peak_rss", "pkcs11", "workers",
             "tls")
PLOTS = ("throughput.png", "latency.png", "memory.png")
# per scenario: one numeric field every row must have
MEASURE = {"throughput": "mib_per_s", "echo": "ops_per_s", "opens": "ops_per_s",
           "dns": "ops_per_s", "idle": "rss_per_connection_kib", "peak_rss": "rss_growth_mib",
           "pkcs11": "gateway_ops_per_s", "workers": "runs", "tls": "runs"}


def test_quick_run_produces_every_scenario_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    launcher = (f"import sys; sys.path.append({str(REPO)!r}); "
                "from benchmarks.cli import main; main()")
    proc = subprocess.run(
        [sys.executable, "-c", launcher, "run", "--quick", "--out", str(out)],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-5000:]

    doc = json.loads((out / "results.json").read_text())
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name in SCENARIOS:
        rows = doc["scenarios"][name]
        assert rows, name
        for row in rows:
            assert "error" not in row, (name, row)
            value = row[MEASURE[name]]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, row)
    impls = {row["impl"] for row in doc["scenarios"]["throughput"]}
    assert {"compiled", "pure", "socat", "websockify"} <= impls
    # a quick run judges nothing, and its sub-second CPU readings are not figures
    assert doc["quick"] is True
    assert all(goal["met"] is None and "quick" in goal["why_not_judged"]
               for goal in doc["goals"]), doc["goals"]
    echo = doc["scenarios"]["echo"][0]
    assert echo["server_cores"] is None and "cpu_unmeasured" in echo, echo
    peak = doc["scenarios"]["peak_rss"]
    assert all(len(row["rss_samples_mib"]) >= 2 for row in peak), peak  # memory.png's panel
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 0, plot
    assert (out / "summary.md").read_text().startswith("**A quick run**")
