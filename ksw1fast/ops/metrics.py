"""Prometheus metrics (the `metrics` extra: prometheus_client).

Every worker records into prometheus_client's metrics; with several workers they write
to PROMETHEUS_MULTIPROC_DIR and the supervisor's /metrics aggregates them.  Without
prometheus_client the same names exist as no-ops, so the relay never checks.  Nothing
here runs per frame: bytes are harvested from the streams' own counters once a second.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType
from typing import Any, Optional


def _prometheus_client() -> Optional[ModuleType]:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:  # an install without the extra
        return None


prom = _prometheus_client()

AVAILABLE = prom is not None


class _NoOp:
    def labels(self, *args: Any, **kwargs: Any) -> "_NoOp":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


def _metric(kind: str, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    if prom is None:
        return _NoOp()
    return getattr(prom, kind)(name, doc, labels, **kw)


CONNECTIONS = _metric("Gauge", "ksw1fast_connections_open", "Open WebSocket connections",
                      multiprocess_mode="livesum")
CONNECTIONS_TOTAL = _metric("Counter", "ksw1fast_connections",
                            "WebSocket connections accepted")
CONNECTIONS_CLOSED = _metric("Counter", "ksw1fast_connections_closed",
                             "WebSocket connections closed, by close code", ("code",))
STREAMS = _metric("Counter", "ksw1fast_streams", "Opens, by protocol and result",
                  ("proto", "result"))
OPEN_SECONDS = _metric("Histogram", "ksw1fast_open_seconds",
                       "Time from Open to OpenOk (resolve and connect)",
                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
BYTES = _metric("Counter", "ksw1fast_bytes", "Payload bytes relayed, by direction",
                ("direction",))
DNS_QUERIES = _metric("Counter", "ksw1fast_dns_queries", "DnsQuery answers, by result",
                      ("result",))
PKCS11_CALLS = _metric("Counter", "ksw1fast_pkcs11_calls", "PKCS#11 calls, by fn and status",
                       ("fn", "status"))
PKCS11_SECONDS = _metric("Histogram", "ksw1fast_pkcs11_call_seconds",
                         "PKCS#11 call latency through the gateway")
POLICY_DENIALS = _metric("Counter", "ksw1fast_policy_denials",
                         "Requests denied by Origin or egress policy", ("reason",))
AUTH_FAILURES = _metric("Counter", "ksw1fast_auth_failures", "Refused tokens, by reason",
                        ("reason",))
LIMITS = _metric("Counter", "ksw1fast_limit_refusals",
                 "Requests refused or connections paused by a limit, by limit", ("limit",))
PKCS11_SCOPE_REFUSALS = _metric(
    "Counter", "ksw1fast_pkcs11_scope_refusals",
    "PKCS#11 calls refused by the token's PKCS#11 scope, by fn and rule", ("fn", "rule"))
AGENTS = _metric("Gauge", "ksw1fast_pkcs11_agents", "Running PKCS#11 agent processes",
                 multiprocess_mode="livesum")
# one sample per live worker (with its pid): a supervisor's /healthz lists them from it
BUILD_INFO = _metric("Gauge", "ksw1fast_build_info",
                     "Always 1: the version and the codec (compiled or pure) this gateway runs",
                     ("version", "codec"), multiprocess_mode="liveall")


@lru_cache(maxsize=None)  # label values come from small fixed sets (results, codes)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus_client takes a lock and builds
    a key on every `labels` call, which per DNS query or Open is a cost worth sparing."""
    return metric.labels(*labels)


def _registry() -> Any:
    """This process's metrics, or in multiprocess mode all the workers'."""
    if prom is None:
        raise RuntimeError("metrics need prometheus_client: pip install 'ksw1fast[metrics]'")
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return prom.REGISTRY
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers in multiprocess mode."""
    registry = _registry()
    assert prom is not None  # _registry refused already
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


def worker_codecs() -> list[dict[str, Any]]:
    """pid and codec of each live worker, as its BUILD_INFO says (a supervisor's view)."""
    workers = [{"pid": int(sample.labels["pid"]), "codec": sample.labels["codec"]}
               for metric in _registry().collect() if metric.name == "ksw1fast_build_info"
               for sample in metric.samples]
    return sorted(workers, key=lambda worker: worker["pid"])
