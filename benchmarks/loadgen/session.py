"""One job in a load-generator process: connect (untimed), run (timed), close.

`Spec` says what to do; `Session.prepare` opens every WebSocket and lane, `run` is the
measured part, `close` drops everything.  Connections are opened in batches so a
thousand WebSockets do not hit the gateway's accept backlog at once.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Iterable, Optional, Sequence, TypeVar

from benchmarks.loadgen import tcp
from benchmarks.loadgen.cycles import DnsCycle, OpenCycle, direct_dns, direct_opens
from benchmarks.loadgen.ksw1 import Ksw1Connection
from benchmarks.loadgen.lanes import Echo, Greeted, Job, Lane, make_job
from benchmarks.loadgen.rawws import RawWsConnection
from benchmarks.loadgen.wspeer import WsPeer

CONNECT_BATCH = 50  # WebSockets or TCP connections being set up at once (the
                    # gateway's accept backlog is 100, and two processes connect)
BYTE_STREAM_KINDS = ("download", "upload", "echo")
T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    """A job for one load-generator process (picklable: it crosses a pipe)."""

    kind: str                 # download | upload | echo | opens | dns | hold
    via: str                  # ksw1 | tcp (socat) | rawws (websockify) | direct (dns, opens)
    url: str = ""             # the WebSocket URL (ksw1, rawws)
    port: int = 0             # the target (ksw1 Opens) or the relay (tcp)
    websockets: int = 1
    streams: int = 0          # lanes in total, spread round-robin over the WebSockets
    nbytes: int = 0           # per lane (download, upload)
    seconds: float = 0.0      # time-bound kinds (echo, opens, dns)
    depth: int = 1            # requests in flight per WebSocket (opens, dns)
    message: int = 64         # echo message size
    ca: str = ""              # the CA file of a wss:// url's certificate


async def _batched(coros: Iterable[Awaitable[T]]) -> list[T]:
    out: list[T] = []
    batch: list[Awaitable[T]] = []
    for coro in coros:
        batch.append(coro)
        if len(batch) == CONNECT_BATCH:
            out += await asyncio.gather(*batch)
            batch = []
    return out + list(await asyncio.gather(*batch))


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def split(spec: Spec, processes: int) -> list[Spec]:
    """`spec` shared out over load-generator processes: WebSockets and streams evenly
    (one process when there is one WebSocket: a WebSocket cannot be shared)."""
    parts = max(1, min(processes, spec.websockets))
    return [replace(spec, websockets=ws, streams=streams)
            for ws, streams in zip(_spread(spec.websockets, parts), _spread(spec.streams, parts))]


class Session:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.peers: list[WsPeer] = []
        self.lanes: Sequence[Lane] = []
        self._tcp: list[tcp.TcpLane] = []

    async def prepare(self) -> None:
        spec = self.spec
        if spec.via == "ksw1":
            per_ws = _spread(spec.streams, spec.websockets)
            conns = await _batched(Ksw1Connection.start(spec.url, spec.ca) for _ in per_ws)
            self.peers = list(conns)
            opened = await _batched(c.open_lanes(spec.port, n) for c, n in zip(conns, per_ws))
            self.lanes = [lane for lanes in opened for lane in lanes]
        elif spec.via == "rawws":
            raw = await _batched(RawWsConnection.connect(spec.url) for _ in range(spec.streams))
            self.peers = list(raw)
            self.lanes = [peer.lane for peer in raw]
        elif spec.via == "tcp":
            self._tcp = await _batched(tcp.open_lane(spec.port) for _ in range(spec.streams))
            self.lanes = self._tcp
        if spec.kind in BYTE_STREAM_KINDS:  # the targets greet; hold's target does not
            greeted = Greeted(len(self.lanes))
            for lane in self.lanes:
                greeted.start(lane)
            await greeted.done

    async def run(self) -> dict[str, Any]:
        """The timed part; returns what the parent adds up over processes."""
        spec = self.spec
        job: Optional[Job] = make_job(spec.kind, len(self.lanes), spec.nbytes, spec.message,
                                      spec.seconds)
        count = 0
        if job is not None:
            for lane in self.lanes:
                job.start(lane)
            await job.done
        elif spec.kind == "dns" and spec.via == "direct":
            count = await direct_dns(spec.depth, spec.seconds)
        elif spec.kind == "opens" and spec.via == "direct":
            count = await direct_opens(spec.port, spec.depth, spec.seconds)
        elif spec.kind in ("opens", "dns"):
            cycle = OpenCycle if spec.kind == "opens" else DnsCycle
            count = sum(await asyncio.gather(*(
                cycle(peer, spec.depth, spec.seconds, spec.port).run()
                for peer in self.peers if isinstance(peer, Ksw1Connection))))
        elif spec.kind != "hold":
            raise ValueError(f"unknown job kind {spec.kind!r}")
        result: dict[str, Any] = {
            "bytes": spec.nbytes * len(self.lanes) if spec.kind in ("download", "upload") else 0,
            "count": count}
        if isinstance(job, Echo):
            result["count"] = len(job.latencies)
            result["latencies"] = job.latencies
        return result

    async def close(self) -> None:
        for peer in self.peers:
            peer.close()
        tcp.close_lanes(self._tcp)
        if self.peers:
            await asyncio.wait([asyncio.ensure_future(p.disconnected) for p in self.peers],
                               timeout=30)
