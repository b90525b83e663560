"""The scenarios, in the order a run goes through them.

Each module has NAME, `steps(sizes, gateways)` (progress steps it will take),
`step_seconds(sizes)` (roughly how long one takes, for the time-left estimate) and
`run(ctx)`, which returns its result rows (dicts; a failed measurement is a row with an
`error`).
"""
from __future__ import annotations

from types import ModuleType

from benchmarks.scenarios import (dns, echo, idle, opens, peak_rss, pkcs11, throughput, tls,
                                  workers)

SCENARIOS: dict[str, ModuleType] = {m.NAME: m for m in (
    throughput, echo, opens, dns, idle, peak_rss, pkcs11, workers, tls)}
