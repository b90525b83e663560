"""Operators' limits and the real client address, against real gateways on loopback:
connections per worker and per client address (503 + Retry-After), the PROXY protocol
(plain and before TLS), forwarding headers from trusted proxies only, and running out
of file descriptors at accept."""
from __future__ import annotations

import asyncio
import resource
import socket
import ssl
import time

import pytest
import trustme
import websockets

import ksw1fast
from ksw1fast import client as kclient

from helpers import GatewayProcess

pytestmark = pytest.mark.timeout(60)


async def _refused(address: str, **kwargs: object) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(address, **kwargs):
            pass
    return info.value


async def test_connections_per_worker_are_capped_with_503() -> None:
    async with await ksw1fast.start_gateway(port=0, max_connections=2) as gw:
        first, second = [await kclient.connect(gw.address) for _ in range(2)]
        refused = await _refused(gw.address)
        assert refused.response.status_code == 503
        assert refused.response.headers["Retry-After"] == "5"
        assert b"connections limit" in refused.response.body
        await first.close()
        for _ in range(50):  # its place is free once the gateway saw it go
            if gw.limits.total < 2:
                break
            await asyncio.sleep(0.05)
        third = await kclient.connect(gw.address)
        assert await third.ping(b"in") == b"in"
        await second.close()
        await third.close()


async def test_connections_per_client_address() -> None:
    """Two per address: 127.0.0.1's third is refused while 127.0.0.2 still gets in."""
    async with await ksw1fast.start_gateway(port=0, max_connections_per_ip=2) as gw:
        clients = [await kclient.connect(gw.address) for _ in range(2)]
        refused = await _refused(gw.address)
        assert refused.response.status_code == 503
        assert b"connections per ip limit" in refused.response.body
        other = socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.2", 0))
        async with websockets.connect(gw.address, sock=other) as ws:
            await ws.ping()
        for c in clients:
            await c.close()


async def test_forwarding_headers_count_only_from_trusted_proxies() -> None:
    """X-Forwarded-For decides the client address when the peer is a trusted proxy, and
    is ignored from anyone else."""
    xff = {"X-Forwarded-For": "198.51.100.7"}
    async with await ksw1fast.start_gateway(port=0, max_connections_per_ip=1,
                                            trusted_proxies=("127.0.0.1/32",)) as gw:
        async with websockets.connect(gw.address, additional_headers=xff):
            (conn,) = gw.connections
            assert str(conn.peer) == "198.51.100.7"
            # the same forwarded client again: over its limit of one
            assert (await _refused(gw.address, additional_headers=xff)
                    ).response.status_code == 503
            async with websockets.connect(gw.address,  # another client behind the proxy
                                          additional_headers={"X-Forwarded-For": "203.0.113.1"}):
                pass
    async with await ksw1fast.start_gateway(port=0) as gw:  # no trusted proxy
        async with websockets.connect(gw.address, additional_headers=xff):
            (conn,) = gw.connections
            assert conn.peer.host == "127.0.0.1"


def _tls(tmp_path) -> tuple[str, str, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(chain), str(key), context


@pytest.mark.parametrize("tls", [False, True])
async def test_proxy_protocol_gives_the_client_address(tmp_path, tls: bool) -> None:
    settings: dict = {"proxy_protocol": True}
    context = None
    if tls:
        settings["tls_cert"], settings["tls_key"], context = _tls(tmp_path)
    async with await ksw1fast.start_gateway(port=0, **settings) as gw:
        for header, client in [
                (b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 443\r\n", "203.0.113.9:40000"),
                (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([198, 51, 100, 4, 192, 0, 2, 1])
                 + (40001).to_bytes(2, "big") + (443).to_bytes(2, "big"), "198.51.100.4:40001"),
                (b"PROXY UNKNOWN\r\n", None)]:  # the proxy's own check: its socket address
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(header)  # before TLS: the header precedes everything
            async with websockets.connect(gw.address, sock=sock, ssl=context,
                                          server_hostname="127.0.0.1" if tls else None) as ws:
                await ws.ping()
                (conn,) = gw.connections
                assert str(conn.peer) == client if client else conn.peer.host == "127.0.0.1"
            await _until(lambda: not gw.connections)
        # a connection without the header is closed, whatever follows
        plain = socket.create_connection(("127.0.0.1", gw.port))
        plain.setblocking(False)
        plain.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(plain, 100), 10)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""
        plain.close()


async def _until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_out_of_file_descriptors_pauses_accepting_and_recovers() -> None:
    """With 40 descriptors, 100 connections at once: the gateway warns, keeps the rest
    waiting in its backlog instead of closing them, and serves again once they go."""
    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    proc = GatewayProcess(preexec_fn=few_fds)
    try:
        port = int(proc.address.rsplit(":", 1)[1].split("/")[0])
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        deadline = time.monotonic() + 10
        while "cannot accept connections" not in "".join(proc.log):
            assert time.monotonic() < deadline, "".join(proc.log)
            time.sleep(0.05)
        for sock in flood:
            sock.close()

        async def served() -> bytes:
            client = await kclient.connect(proc.address)
            pong = await client.ping(b"back")
            await client.close()
            return pong

        assert asyncio.run(served()) == b"back"
    finally:
        log = proc.stop()
    assert "Traceback" not in log, log
