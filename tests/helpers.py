"""Helpers the tests share (imported as `helpers`; tests/ is on sys.path): a gateway
subprocess, loopback TCP servers, a raw KSW1 client on an independent WebSocket
library, and IPv6 addresses that embed an IPv4 one."""
from __future__ import annotations

import asyncio
import importlib.machinery
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from ipaddress import IPv4Address, IPv6Address
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import websockets
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

import ksw1fast
from ksw1fast import framing
from ksw1fast.protocol import payloads

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class GatewayProcess:
    """`python -m ksw1fast serve` (or `command` serve) in a subprocess, in `cwd`; the
    address is read from its log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 default_port: bool = False,
                 command: Sequence[str] = (sys.executable, "-m", "ksw1fast"),
                 cwd: Path | None = None, **popen: object) -> None:
        port = () if default_port else ("--port", "0")
        self.proc = subprocess.Popen(
            [*command, "serve", *port, *args], cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, text=True, **popen)  # type: ignore[call-overload]
        self.address = ""
        self.log: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # bounded: the process exits or prints its address
            self.log.append(line)
            match = re.search(r"serving (wss?://[^\s\"]+)", line)
            if match:
                self.address = match.group(1)
                break
        if not self.address:
            raise RuntimeError("gateway did not start:\n" + "".join(self.log))
        # keep draining: a full stderr pipe would block the gateway's logging
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        """SIGTERM, wait, and return the rest of the log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        return "".join(self.log)


async def serve_tcp(handler: Handler, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    return await asyncio.start_server(handler, host, 0)


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF."""
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


class RawClient:
    """An independent WebSocket client (the `websockets` library) speaking raw KSW1 bytes."""

    def __init__(self, address: str, **kwargs: object) -> None:
        self.address = address
        self.kwargs = kwargs
        self.parser = framing.FrameParser()
        self.pending: list = []

    async def __aenter__(self) -> "RawClient":
        self.ws = await websockets.connect(self.address, max_size=None, **self.kwargs)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.ws.close()

    async def send(self, message: bytes | str) -> None:
        await self.ws.send(message)

    async def hello(self, features: int = 0x2E, max_streams: int = 64) -> None:
        await self.send(framing.encode_frame(0x01, 0, payloads.encode_hello(features, max_streams)))
        (ack,) = await self.frames(1)
        assert ack.type == 0x02

    async def frames(self, count: int, timeout: float = 10) -> list:
        """The next `count` KSW1 frames, payloads as bytes."""
        while len(self.pending) < count:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
            self.pending += [f._replace(payload=bytes(f.payload))
                             for f in self.parser.feed(message)]
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    async def close_code(self, timeout: float = 10) -> int | None:
        """Wait for the server to close the WebSocket; its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


class PackageCopy:
    """A copy of the ksw1fast under test as `root/ksw1fast`, like a source checkout: built
    (with the compiled extensions) or not.  Importing the copy appends the importing
    process's pid to `root/imported`, so a test can tell which processes ran the copy."""

    def __init__(self, root: Path, built: bool) -> None:
        skip = ["__pycache__", "*.c", "*.html"]
        if not built:
            skip += [f"*{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
        shutil.copytree(Path(ksw1fast.__file__).parent, root / "ksw1fast",
                        ignore=shutil.ignore_patterns(*skip))
        self.root = root
        self.package = root / "ksw1fast"
        self._marks = root / "imported"
        with open(self.package / "__init__.py", "a") as init:
            init.write(f"\nimport os as _os\nwith open({str(self._marks)!r}, 'a') as _marks:\n"
                       "    print(_os.getpid(), file=_marks)\n")

    @property
    def imported_by(self) -> set[int]:
        """pids of the processes that imported this copy."""
        return set(map(int, self._marks.read_text().split())) if self._marks.exists() else set()


def free_port() -> int:
    """A loopback port free right now (for listeners whose port must be known up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class RawPeer:
    """A WebSocket client whose every byte is visible: websockets' sans-I/O protocol for
    the upgrade and for building frames, a plain non-blocking socket underneath."""

    def __init__(self, address: str) -> None:
        self.protocol = ClientProtocol(parse_uri(address), max_size=None)
        uri = parse_uri(address)
        self.sock = socket.create_connection((uri.host, uri.port))
        self.sock.setblocking(False)

    async def upgrade(self) -> None:
        self.protocol.send_request(self.protocol.connect())
        await self._flush()
        loop = asyncio.get_running_loop()
        while not any(isinstance(e, Response) for e in self.protocol.events_received()):
            self.protocol.receive_data(await loop.sock_recv(self.sock, 65536))
        assert self.protocol.handshake_exc is None

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.protocol.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def send_frame(self, opcode: Opcode, payload: bytes) -> None:
        self.protocol.send_frame(Frame(opcode, payload))  # masked, as a client must
        await self._flush()

    async def flood(self, message: bytes, count: int, blocked_for: float = 2.0) -> int:
        """Send `message` as a binary message up to `count` times without reading, until
        the server has not taken one for `blocked_for` seconds; how many went out."""
        for sent in range(count):
            try:
                await asyncio.wait_for(self.send_frame(Opcode.BINARY, message), blocked_for)
            except asyncio.TimeoutError:
                return sent
        return count

    async def recv_message(self, timeout: float = 10) -> bytes:
        """The next data message's payload (control frames other than Close skipped)."""
        loop = asyncio.get_running_loop()
        while True:
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.TEXT):
                    return event.data
            await self._flush()  # pongs the protocol owes
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), timeout)
            if not data:
                raise EOFError("closed")
            self.protocol.receive_data(data)

    async def close_code(self, timeout: float = 30) -> int | None:
        """Read (and drop) everything until the server's Close; answer it; its code."""
        loop = asyncio.get_running_loop()
        while True:
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode == Opcode.CLOSE:
                    await self._flush()  # the protocol queued the answering Close
                    return int.from_bytes(event.data[:2], "big") if event.data else None
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), timeout)
            if not data:
                return None
            self.protocol.receive_data(data)

    async def read_exactly(self, n: int, timeout: float = 10) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(self.sock, n - len(data)), timeout)
            if not chunk:
                raise EOFError(f"closed after {data!r}")
            data += chunk
        return data

    async def read_frame(self) -> bytes:
        """The next server frame, header and all (servers do not mask; payload < 126)."""
        head = await self.read_exactly(2)
        return head + await self.read_exactly(head[1] & 0x7F)

    async def at_eof(self, timeout: float = 10) -> bool:
        """Whether the server closes the TCP connection within `timeout` (data is read
        and dropped)."""
        loop = asyncio.get_running_loop()
        try:
            while await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout):
                pass
        except asyncio.TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class ControlEcho:
    """A well-behaved client echoing through the gateway while an attack runs.

        async with ControlEcho(address, echo_port):
            ...  # the attack

    A round trip every `period` seconds over one stream; on exit it asserts that every
    round trip completed within `stall` seconds and that it made some.
    """

    def __init__(self, address: str, echo_port: int, stall: float = 5.0,
                 period: float = 0.05) -> None:
        self.address, self.echo_port, self.stall, self.period = address, echo_port, stall, period
        self.round_trips = 0
        self.stalls: list[str] = []

    async def __aenter__(self) -> "ControlEcho":
        from ksw1fast import client

        self.client = await client.connect(self.address)
        self.stream = await self.client.open_connection("127.0.0.1", self.echo_port)
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            message = b"%08d" % self.round_trips
            self.stream.write(message)
            try:
                echoed = await asyncio.wait_for(self.stream.readexactly(len(message)), self.stall)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                self.stalls.append(f"round trip {self.round_trips}: {exc!r}")
                return
            assert echoed == message
            self.round_trips += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.period)
            except asyncio.TimeoutError:
                pass

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await self._task
        await self.client.close()
        assert not self.stalls, f"the control connection stalled: {self.stalls}"
        assert self.round_trips > 0
def _inverted(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


# Every IPv6 form that carries an IPv4 for a translator or tunnel, built from the RFCs'
# byte layouts (not from ksw1fast): form -> f(ipv4, 10 bytes for the form's free bits).
EMBEDDINGS: dict[str, Callable[[IPv4Address, bytes], IPv6Address]] = {
    "nat64 64:ff9b::/96": lambda v4, fill: IPv6Address(
        bytes.fromhex("0064ff9b") + bytes(8) + v4.packed),
    # RFC 6052 layout for a /48 prefix: 16 bits, the 'u' octet, 16 bits, a suffix
    "nat64 local 64:ff9b:1::/48": lambda v4, fill: IPv6Address(
        bytes.fromhex("0064ff9b0001") + v4.packed[:2] + fill[9:] + v4.packed[2:] + fill[:5]),
    "6to4 2002::/16": lambda v4, fill: IPv6Address(b"\x20\x02" + v4.packed + fill),
    "ipv4-compatible ::/96": lambda v4, fill: IPv6Address(bytes(12) + v4.packed),
    "siit ::ffff:0:0:0/96": lambda v4, fill: IPv6Address(
        bytes(8) + b"\xff\xff\0\0" + v4.packed),
    "teredo client": lambda v4, fill: IPv6Address(
        bytes.fromhex("20010000") + fill[:8] + _inverted(v4.packed)),
    "teredo server": lambda v4, fill: IPv6Address(
        bytes.fromhex("20010000") + v4.packed + fill[:8]),
}
# free bits that embed nothing special: a Teredo server 65.54.227.120 (or flags and
# port), a Teredo client 8.8.4.4 (or flags and port), a zero 'u' octet last
FILL = bytes([65, 54, 227, 120]) + _inverted(bytes([8, 8, 4, 4])) + bytes(2)


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SoftHSM:
    """A throwaway SoftHSM2 token store with one initialised token."""

    module: str     # path of libsofthsm2.so
    conf: Path      # the softhsm2.conf of this store (SOFTHSM2_CONF)
    label: str      # the token's label
    user_pin: bytes = b"1234"
    so_pin: bytes = b"5678"

    @property
    def env(self) -> dict[str, str]:
        """What a gateway's agents need in their environment to see this store."""
        return {"SOFTHSM2_CONF": str(self.conf)}


def make_softhsm(root: Path, label: str, user_pin: bytes = SoftHSM.user_pin) -> SoftHSM:
    """SoftHSM2 installed (scripts/softhsm.sh) and a token store in `root` holding one
    token `label` with `user_pin`. Each group of tests makes its own, so that no test's
    token changes (InitToken, object creation) leak into another group's slots."""
    module = subprocess.run(["bash", str(REPO / "scripts" / "softhsm.sh")], check=True,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=900).stdout.strip()
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    store = SoftHSM(module, conf, label, user_pin)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", store.user_pin.decode(), "--so-pin", store.so_pin.decode()],
                   env={**os.environ, **store.env}, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=60)
    return store
