"""What every scenario shares: sizes, the targets, the load generators, and the servers
under test, started on first use and stopped (all of them, also on failure) at the end."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

from benchmarks.baselines.nginx import NginxTls
from benchmarks.baselines.reference import ReferenceServer
from benchmarks.baselines.socat import SocatRelay
from benchmarks.baselines.websockify import Websockify
from benchmarks.gateway_proc import GatewayProcess
from benchmarks.loadgen.pool import ClientPool
from benchmarks.progress import Progress
from benchmarks.targets import Targets

MIB = 1024 * 1024
GIB = 1024 * MIB
S = TypeVar("S")


@dataclass(frozen=True)
class Sizes:
    transfer: int              # bytes per throughput run, split over its streams
    websockify_transfer: int   # websockify is slow: its single-stream runs move less
    repeat: int                # runs per measurement; implementations alternate order
    echo_seconds: float
    cycle_seconds: float       # stream opens and DNS queries
    idle_connections: tuple[int, ...]
    peak_bytes: int            # the bounded-memory download
    pkcs11_seconds: float
    timeout: float             # one run; beyond it the measurement is recorded as failed
    workers: tuple[int, ...] = (1, 2)  # the worker counts the workers scenario compares


QUICK = Sizes(transfer=4 * MIB, websockify_transfer=4 * MIB, repeat=1, echo_seconds=0.3,
              cycle_seconds=0.3, idle_connections=(100,), peak_bytes=16 * MIB,
              pkcs11_seconds=0.5, timeout=60.0)
FULL = Sizes(transfer=2 * GIB, websockify_transfer=1 * GIB, repeat=5, echo_seconds=3.0,
             cycle_seconds=3.0, idle_connections=(1000, 10000), peak_bytes=2 * GIB,
             pkcs11_seconds=3.0, timeout=120.0)
LOADGEN_PROCESSES = 2  # one per core of the 2-core target machine
# roughly what a relay moves on loopback here: only for the progress bar's time estimate
RELAY_BYTES_PER_S = 1.5 * GIB


def gateway_impls(against: Optional[Path]) -> tuple[str, ...]:
    return ("compiled", "pure") + (("against",) if against else ())


class Context:
    """Use as `with Context(sizes, progress) as ctx:`; scenarios ask it for servers."""

    def __init__(self, sizes: Sizes, progress: Progress, against: Optional[Path] = None,
                 reference: Optional[Path] = None) -> None:
        self.sizes = sizes
        self.against = against
        self.reference = reference  # the Node reference server's bundle, when given
        self.progress = progress
        self.pool = ClientPool(LOADGEN_PROCESSES)
        self._stack = contextlib.ExitStack()
        self._services: dict[tuple, object] = {}
        self._targets: Optional[Targets] = None

    @property
    def gateway_impls(self) -> tuple[str, ...]:
        """The gateways every KSW1 scenario compares; "against" is another tree's."""
        return gateway_impls(self.against)

    def __enter__(self) -> "Context":
        self._stack.callback(self.pool.close)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def targets(self) -> Targets:
        if self._targets is None:
            self._targets = self._stack.enter_context(Targets())
        return self._targets

    def _service(self, key: tuple, make: Callable[[], S]) -> S:
        if key not in self._services:
            service = make()
            self._stack.callback(service.stop)  # type: ignore[attr-defined]
            self._services[key] = service
        return self._services[key]  # type: ignore[return-value]

    def gateway(self, impl: str, *flags: str, workers: int = 1) -> GatewayProcess:
        """A shared gateway subprocess, one per (impl, flags, workers)."""
        return self._service(("gateway", impl, flags, workers),
                             lambda: self._new_gateway(impl, flags, workers))

    def fresh_gateway(self, impl: str, *flags: str, workers: int = 1) -> GatewayProcess:
        """A gateway of its own (memory scenarios); the caller stops it, or we do at exit."""
        gateway = self._new_gateway(impl, flags, workers)
        self._stack.callback(gateway.stop)
        return gateway

    def _new_gateway(self, impl: str, flags: tuple[str, ...], workers: int) -> GatewayProcess:
        tree = self.against if impl == "against" else None
        return GatewayProcess(impl, *flags, workers=workers, tree=tree, echo=self.progress.note)

    def reference_server(self) -> ReferenceServer:
        """The Node reference server of `--reference`, started on first use;
        RuntimeError if it does not start."""
        bundle = self.reference
        assert bundle is not None, "the run was given no --reference"
        return self._service(("reference",), lambda: ReferenceServer(bundle, self.progress.note))

    def socat(self, target_port: int) -> SocatRelay:
        return self._service(("socat", target_port), lambda: SocatRelay(target_port, self.progress.note))

    def nginx(self, tmp: Path, upstream: int, chain: Path, key: Path) -> NginxTls:
        """nginx terminating TLS (files in `tmp`) in front of the gateway on `upstream`."""
        return self._service(("nginx", upstream),
                             lambda: NginxTls(tmp, upstream, chain, key, self.progress.note))

    def websockify(self, target_port: int) -> Websockify:
        return self._service(("websockify", target_port), lambda: Websockify(target_port))
