"""Auth, Origin and egress policy enforced by a running gateway (protocol.md §3, §9; README Security).

Destinations are all on loopback: denied ones are denied by rules naming loopback
addresses, so a policy bug could never send traffic off this machine.  The always-denied
ranges (169.254.0.0/16 ...) are tested as pure decisions in test_policy.py.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time

import pytest
import websockets

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.protocol import payloads
from ksw1fast.security import resolve
from ksw1fast.security.tokens import issue_token
from ksw1fast.config import GatewayConfig
from ksw1fast.protocol.constants import (AddrKind, DnsErrCode, Feature, OpenErrCode, Pkcs11Status, Proto)
from ksw1fast.protocol.errors import DnsError, OpenError
from ksw1fast.security.gate import Security

pytestmark = pytest.mark.timeout(60)

TOKEN = "static-token-for-tests"
SECRET = b"a test secret of enough length"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{TOKEN}\n")
    return str(path)


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("KSW1FAST_TEST_SECRET", SECRET.decode())
    return "KSW1FAST_TEST_SECRET"


async def _status_of_refusal(address: str, **kwargs) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(address, **kwargs):
            pass
    return info.value.response.status_code


async def test_subprotocol_token_is_echoed(token_file) -> None:
    async with await ksw1fast.start_gateway(port=0, token_file=token_file) as gw:
        async with websockets.connect(gw.address, subprotocols=[f"auth-{TOKEN}"]) as ws:
            assert ws.subprotocol == f"auth-{TOKEN}"  # else a browser drops the socket
        assert await _status_of_refusal(gw.address) == 401
        assert await _status_of_refusal(gw.address, subprotocols=["auth-wrong"]) == 403
        async with websockets.connect(f"{gw.address}?token={TOKEN}"):
            pass
        async with websockets.connect(gw.address,
                                      additional_headers={"Authorization": f"Bearer {TOKEN}"}):
            pass


async def test_offered_auth_subprotocol_is_echoed_with_auth_off() -> None:
    async with await ksw1fast.start_gateway(port=0) as gw:
        async with websockets.connect(gw.address, subprotocols=["auth-anything"]) as ws:
            assert ws.subprotocol == "auth-anything"


async def test_signed_token_scope(secret_env, echo_port) -> None:
    token = issue_token(SECRET, 600, [f"127.0.0.1:{echo_port}"])
    expired = issue_token(SECRET, 60, ["*"], now=time.time() - 3600)
    async with await ksw1fast.start_gateway(port=0, token_secret_env=secret_env) as gw:
        assert await _status_of_refusal(gw.address, subprotocols=[f"auth-{expired}"]) == 403
        client = await kclient.connect(f"{gw.address}?token={token}")
        stream = await client.open_connection("127.0.0.1", echo_port)
        stream.write(b"in scope")
        assert await stream.readexactly(8) == b"in scope"
        with pytest.raises(OpenError) as info:
            await client.open_connection("127.0.0.1", echo_port + 1)
        assert info.value.code == OpenErrCode.AUTH_FAILED
        with pytest.raises(OpenError) as info:
            await client.open_udp("127.0.0.1", echo_port)
        assert info.value.code == OpenErrCode.AUTH_FAILED
        with pytest.raises(DnsError) as dns:
            await client.resolve("localhost")
        assert dns.value.code == DnsErrCode.REFUSED
        assert (await client.pkcs11(0)).status == Pkcs11Status.AUTH_DENIED
        await client.close()


async def test_per_frame_tokens(secret_env, echo_port) -> None:
    """OpenToken mode: the upgrade needs no token; Open, DNS and PKCS#11 each need one."""
    token = issue_token(SECRET, 600, ["*"], dns=True)
    async with await ksw1fast.start_gateway(port=0, token_secret_env=secret_env,
                                            open_token=True) as gw:
        client = await kclient.connect(gw.address, features=0x3E)
        assert client.features & Feature.OPEN_TOKEN
        for host_token, code in ((b"", OpenErrCode.AUTH_REQUIRED),
                                 (b"forged", OpenErrCode.AUTH_FAILED)):
            with pytest.raises(OpenError) as info:
                await client.open_connection("127.0.0.1", echo_port, token=host_token)
            assert info.value.code == code
        stream = await client.open_connection("127.0.0.1", echo_port, token=token.encode())
        stream.write(b"ok")
        assert await stream.readexactly(2) == b"ok"
        with pytest.raises(DnsError) as dns:
            await client.resolve("localhost")
        assert dns.value.code == DnsErrCode.REFUSED
        assert (await client.pkcs11(0)).status == Pkcs11Status.AUTH_DENIED
        await client.close()
        # the Hello token extension authorises the whole connection
        client = await kclient.connect(gw.address, token=token.encode())
        assert "127.0.0.1" in await client.resolve("localhost")
        await client.close()


@pytest.mark.parametrize("origin,allowed", [
    (None, True), ("http://localhost:3000", True), ("https://127.0.0.1", True),
    ("http://[::1]:8080", True), ("https://evil.example", False), ("null", False),
])
async def test_default_origin_policy(origin, allowed) -> None:
    async with await ksw1fast.start_gateway(port=0) as gw:
        if allowed:
            async with websockets.connect(gw.address, origin=origin):
                pass
        else:
            assert await _status_of_refusal(gw.address, origin=origin) == 403


async def test_allow_origin_patterns() -> None:
    async with await ksw1fast.start_gateway(
            port=0, allow_origins=("https://*.example.com",)) as gw:
        async with websockets.connect(gw.address, origin="https://app.example.com"):
            pass
        for origin in ("http://localhost:3000", "https://app.example.com:8443",
                       "https://app.example.com.evil.net", "https://app.example.com/",
                       "https://evil.net?.example.com"):
            assert await _status_of_refusal(gw.address, origin=origin) == 403, origin


@pytest.mark.parametrize("allow_origins", [(), ("*",), ("https://app.example.com", "null")])
async def test_two_origin_headers_are_refused(allow_origins: tuple[str, ...]) -> None:
    """Whatever their values: which of them would count is anyone's guess."""
    async with await ksw1fast.start_gateway(port=0, allow_origins=allow_origins) as gw:
        for first, second in (("http://localhost:3000", "http://localhost:3000"),
                              ("https://app.example.com", "https://evil.example")):
            assert await _status_of_refusal(gw.address, origin=first,
                                            additional_headers=[("Origin", second)]) == 403


def test_a_bad_origin_pattern_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="origin pattern 'https://app.example.com/login'"):
        Security(GatewayConfig(allow_origins=("https://app.example.com/login",)))
    result = subprocess.run([sys.executable, "-m", "ksw1fast", "serve", "--port", "0",
                             "--allow-origin", "http://localhost:8O"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "port '8O'" in result.stderr, result.stderr


async def test_egress_rules(echo_port) -> None:
    rules = (f"allow tcp 127.0.0.1:{echo_port}", "allow udp 127.0.0.1:53")
    async with await ksw1fast.start_gateway(port=0, egress=rules) as gw:
        client = await kclient.connect(gw.address)
        await client.open_connection("127.0.0.1", echo_port)
        with pytest.raises(OpenError) as info:
            await client.open_connection("127.0.0.1", echo_port + 1)  # allow rules: deny the rest
        assert info.value.code == OpenErrCode.BLOCKED
        raw_v4 = payloads.encode_open(Proto.TCP, AddrKind.IPV4, echo_port + 1, bytes([127, 0, 0, 1]))
        with pytest.raises(OpenError) as info:
            await client.open_stream(raw_v4)
        assert info.value.code == OpenErrCode.BLOCKED
        await client.close()


async def test_name_allowed_but_address_denied_is_blocked(echo_port) -> None:
    """DNS rebinding: the name passes, the address it resolves to does not."""
    rules = ("deny 127.0.0.0/8", "deny [::1]", "allow any localhost:*")
    async with await ksw1fast.start_gateway(port=0, egress=rules) as gw:
        client = await kclient.connect(gw.address)
        with pytest.raises(OpenError) as info:
            await client.open_connection("localhost", echo_port)
        assert info.value.code == OpenErrCode.BLOCKED
        with pytest.raises(DnsError) as dns:
            await client.resolve("localhost", 4)  # its only answer is denied
        assert dns.value.code == DnsErrCode.REFUSED
        await client.close()


async def test_dns_for_a_denied_name_is_refused() -> None:
    async with await ksw1fast.start_gateway(port=0, egress=("deny *.invalid",)) as gw:
        client = await kclient.connect(gw.address)
        with pytest.raises(DnsError) as dns:
            await client.resolve("anything.invalid")
        assert dns.value.code == DnsErrCode.REFUSED
        await client.close()


async def test_embedded_ipv4_through_the_gateway(monkeypatch) -> None:
    """An Open of a raw NAT64 address and the DnsResult of a name whose answers embed
    refused IPv4s meet the same checks as IPv4. Lookups and connects are stubbed: nothing
    here may leave the machine, even if a check failed."""
    answers = ["64:ff9b::a9fe:a9fe", "2002:a00:1::1", "64:ff9b::808:808"]

    async def lookup(self: resolve.Resolver, name: str, port: int = 0,
                     family: int = 0) -> list[resolve.Endpoint]:
        return [resolve.Endpoint(socket.AF_INET6, (a, port, 0, 0)) for a in answers]

    async def connect(endpoints: list, udp: bool, factory: object) -> None:
        raise ConnectionRefusedError(f"this test connects nowhere: {endpoints}")

    monkeypatch.setattr(resolve.Resolver, "lookup", lookup)
    monkeypatch.setattr(resolve, "connect", connect)
    async with await ksw1fast.start_gateway(port=0, egress=("deny 10.0.0.0/8",)) as gw:
        client = await kclient.connect(gw.address)
        for address in answers[:2]:
            raw = payloads.encode_open(Proto.TCP, AddrKind.IPV6, 80,
                                    ipaddress.IPv6Address(address).packed)
            with pytest.raises(OpenError) as info:
                await client.open_stream(raw)
            assert info.value.code == OpenErrCode.BLOCKED, address
        with pytest.raises(OpenError) as info:
            await client.open_connection("nat64.example", 80)  # its answers: only the last
        assert info.value.code == OpenErrCode.CONN_REFUSED          # one passes, to the stub
        assert await client.resolve("nat64.example") == answers[2:]
        await client.close()


def test_non_loopback_listener_needs_auth_or_insecure(token_file) -> None:
    """Decided before anything listens, so nothing is bound here."""
    with pytest.raises(ValueError, match="without auth"):
        Security(GatewayConfig(host="0.0.0.0"))
    Security(GatewayConfig(host="0.0.0.0", insecure=True))
    Security(GatewayConfig(host="0.0.0.0", token_file=token_file))
    Security(GatewayConfig(host="::1"))
    result = subprocess.run([sys.executable, "-m", "ksw1fast", "serve", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "--insecure" in result.stderr


def test_token_issue_command_makes_a_working_token(secret_env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ksw1fast", "token", "issue", "--secret-env", secret_env,
         "--ttl", "1h", "--allow", "db.internal:5432", "--allow-pkcs11"],
        capture_output=True, text=True, timeout=30, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    grant = Security(GatewayConfig(token_secret_env=secret_env)).verify(
        result.stdout.strip().encode())
    assert grant.allows_pkcs11 and grant.allows_open("db.internal", 5432)
    assert not grant.allows_open("db.internal", 5433)
