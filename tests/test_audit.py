"""The audit trail (docs/operations.md, "Audit trail"): a real gateway with --audit-log
and --log-format json, driven through every kind of event; every line must parse, the
events must say who, what, where and which rule, and no token, PIN or payload byte may
appear anywhere in the audit file or the log (random markers make sure of it)."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
import websockets

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.ops import audit, logs
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer
from ksw1fast.protocol.constants import DnsErrCode, OpenErrCode, Pkcs11Status
from ksw1fast.protocol.errors import DnsError, OpenError
from ksw1fast.security.egress import DEFAULT_ALLOW, DEFAULT_DENY, EgressPolicy

from helpers import GatewayProcess, SoftHSM, free_port, make_softhsm

pytestmark = pytest.mark.timeout(120)

SECRET_ENV = "KSW1FAST_TEST_AUDIT_SECRET"
SECRET = "an audit test JWT secret, 32+ bytes long"
PIN_ENV = "KSW1FAST_TEST_AUDIT_PIN"


def marker(what: str) -> str:
    """A string that appears nowhere unless we put it there."""
    return f"{what}{secrets.token_hex(8)}"


def issue(subject: str, token_id: str, **claims: Any) -> str:
    now = time.time()
    return jwt.encode({"sub": subject, "jti": token_id, "iat": int(now), "exp": now + 300,
                       **claims}, SECRET, algorithm="HS256")


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every line of the audit file as JSON: one that is not fails the test."""
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        assert {"ts", "level", "logger", "pid", "message", "event", "outcome"} <= event.keys()
        assert event["logger"] == "ksw1fast.audit" and event["level"] == "info"
        assert event["message"] == f"{event['event']} {event['outcome']}"
    return events


def find(events: list[dict[str, Any]], event: str, outcome: str,
         **fields: Any) -> dict[str, Any]:
    """The one event with these fields (a test helper: fails when there is not one)."""
    found = [e for e in events if e["event"] == event and e["outcome"] == outcome
             and all(e.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, (event, outcome, fields, found or events)
    return found[0]


def assert_nothing_secret(texts: list[str], secrets_: list[str]) -> None:
    for text in texts:
        for secret in secrets_:
            assert secret not in text, secret


async def refused_status(address: str, **kwargs: Any) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(address, **kwargs):
            pass
    return info.value.response.status_code


# --- units --------------------------------------------------------------------------------

def test_decisions_name_the_rule_that_decided() -> None:
    policy = EgressPolicy(["deny any 10.0.0.0/8", "allow tcp db.internal:5432",
                           "allow tcp 192.0.2.0/24:443", "allow 169.254.169.254:80"])
    assert policy.check_name("db.internal", 5432, "tcp").rule == "allow tcp db.internal:5432"
    assert policy.check_address("10.1.2.3", 22, "tcp").rule == "deny any 10.0.0.0/8"
    assert policy.check_address("192.0.2.7", 443, "tcp").rule == "allow tcp 192.0.2.0/24:443"
    assert policy.check_address("198.51.100.1", 80, "tcp").rule == DEFAULT_DENY
    assert policy.check_address("169.254.169.254", 80, "tcp").rule == \
        "allow any 169.254.169.254:80"
    assert policy.check_address("169.254.1.1", 80, "tcp").rule == \
        "special address: link-local (cloud metadata)"
    assert policy.check_name("bad..name", 80).rule == "invalid host name"
    assert EgressPolicy().check_address("192.0.2.1", 80, "tcp").rule == DEFAULT_ALLOW
    assert EgressPolicy().check_address("224.0.0.1", 80, "udp").rule == \
        "special address: multicast"
    # an IPv6 address carrying a refused IPv4: the IPv4's rule is the one that decided
    nat64 = EgressPolicy(["deny 10.0.0.0/8", "allow [64:ff9b::/96]"])
    assert nat64.check_address("64:ff9b::a00:1", 80, "tcp").rule == "deny any 10.0.0.0/8"


@pytest.fixture
def audit_to(tmp_path: Path) -> Iterator[Any]:
    """`configure(fmt)` sends this process's audit trail to a file, whose path it returns;
    the logging set-up is put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logger = logging.getLogger(logs.AUDIT_LOGGER)

    def configure(fmt: str) -> Path:
        path = tmp_path / f"audit.{fmt}"
        logs.configure("warning", fmt, str(path))
        return path

    yield configure
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    root.handlers[:], level = saved
    root.setLevel(level)


def test_text_lines_are_key_value_and_quote_what_a_client_chose(audit_to: Any) -> None:
    path = audit_to("text")  # the file takes info lines even with the log at warning
    audit.record("dns", "refused", peer="127.0.0.1:5000", name="evil\nname.example x=1",
                 rule="default: deny (no allow rule matches)", code="refused", stream=3,
                 subject=None, token="jwt")
    (line,) = path.read_text().splitlines()
    assert line.endswith(
        ']: dns refused peer=127.0.0.1:5000 name="evil\\nname.example x=1" '
        'rule="default: deny (no allow rule matches)" code=refused stream=3 token=jwt'), line
    assert " INFO ksw1fast.audit[" in line and "subject" not in line  # None: left out


def test_json_lines_have_the_fields_beside_the_usual_keys(audit_to: Any) -> None:
    path = audit_to("json")
    audit.record("open", "allowed", peer="[::1]:5000", dest="db.internal:5432", stream=1,
                 rule="allow tcp db.internal:5432")
    (event,) = read_audit(path)
    assert event["message"] == "open allowed" and event["stream"] == 1
    assert event["peer"] == "[::1]:5000" and event["rule"] == "allow tcp db.internal:5432"


async def test_refusals_are_bounded_by_the_log_limiter(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A client can cause refusals at will: the audit takes what the log's limiter lets
    through (here 5 at once, then 10 a second) and says how many it dropped."""
    now = [1000.0]
    from ksw1fast.server import limits

    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(audit, "_refusals", logs.Throttled(audit.log, rate=10, burst=5))
    caplog.set_level(logging.INFO, logger=logs.AUDIT_LOGGER)
    for i in range(50):
        audit.refusal("open", "refused", stream=i)
    audit.record("open", "allowed", stream=99)  # what is allowed is never dropped
    now[0] += 1.0
    audit.refusal("open", "refused", stream=50)
    events = [r.audit for r in caplog.records if r.name == logs.AUDIT_LOGGER]  # type: ignore[attr-defined]
    assert [e["stream"] for e in events] == [0, 1, 2, 3, 4, 99, 50]
    assert events[-1]["dropped"] == 45


def test_an_audit_log_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ksw1fast", "serve", "--port", "0",
         "--audit-log", str(tmp_path / "missing" / "audit.log")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"ksw1fast serve: error: cannot open the audit log {tmp_path / 'missing' / 'audit.log'}: "
        "No such file or directory"), result.stderr


# --- a gateway ----------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["all", "security"])
async def test_the_audit_trail_of_a_gateway(tmp_path: Path, echo_port: int, level: str) -> None:
    """`--audit all` has every event; "security" (the default) all but what is allowed
    per request (Opens, DNS answers): those are a line per request."""
    audit_log = tmp_path / "audit.log"
    closed_port = free_port()
    subject, token_id = marker("subject-"), marker("jti-")
    token = issue(subject, token_id, ksw1={"allow": ["127.0.0.0/8", "localhost", "*.example"],
                                           "dns": True})
    bad_token, query_token = marker("badtoken"), marker("querytoken")
    payload = marker("payload-").encode()
    gateway = await asyncio.to_thread(
        GatewayProcess, "--audit-log", str(audit_log), "--log-format", "json",
        "--audit", level, "--jwt-secret-env", SECRET_ENV, "--max-connections-per-ip", "2",
        "--egress", "deny any 127.0.0.2", "--egress", "deny *.example", "--egress", f"allow tcp 127.0.0.1:{echo_port}",
        "--egress", f"allow tcp 127.0.0.1:{closed_port}", "--egress", "allow any localhost",
        env={SECRET_ENV: SECRET})
    try:
        address = gateway.address
        base = address.rsplit("/", 1)[0]
        # refused handshakes: a bad token (two carriers), none, a foreign Origin, a wrong
        # path carrying a token in its query
        assert await refused_status(address, subprotocols=[f"auth-{bad_token}"]) == 403
        assert await refused_status(f"{address}?token={query_token}") == 403
        assert await refused_status(address) == 401
        assert await refused_status(address, subprotocols=[f"auth-{token}"],
                                    origin="https://evil.example") == 403
        assert await refused_status(f"{base}/elsewhere?token={query_token}") == 404

        client = await kclient.connect(address,
                                       extra_headers={"Sec-WebSocket-Protocol": f"auth-{token}"})
        stream = await client.open_connection("127.0.0.1", echo_port)
        stream.write(payload)
        assert await stream.readexactly(len(payload)) == payload
        by_name = await client.open_connection("localhost", echo_port)
        by_name.write(payload)
        assert await by_name.readexactly(len(payload)) == payload
        for host, port, code in (("127.0.0.2", 80, OpenErrCode.BLOCKED),
                                 ("127.0.0.1", echo_port + 1, OpenErrCode.BLOCKED),
                                 ("192.0.2.1", 80, OpenErrCode.AUTH_FAILED),
                                 ("127.0.0.1", closed_port, OpenErrCode.CONN_REFUSED)):
            with pytest.raises(OpenError) as info:
                await client.open_connection(host, port)
            assert info.value.code == code, (host, port)
        assert "127.0.0.1" in await client.resolve("localhost")
        with pytest.raises(DnsError) as dns:
            await client.resolve("nothing.example")
        assert dns.value.code == DnsErrCode.REFUSED
        # a limit: a third connection from this address
        second = await kclient.connect(f"{address}?token={token}")
        assert await refused_status(f"{address}?token={token}") == 503
        await second.close()
        await client.close()
    finally:
        log = await asyncio.to_thread(gateway.stop)

    events = read_audit(audit_log)
    assert_nothing_secret([audit_log.read_text(), log],
                          [token, *token.split("."), bad_token, query_token, payload.decode(),
                           SECRET])
    assert '"logger": "ksw1fast.audit"' not in log  # the file has them, not the log

    for reason, status in (("invalid", 403), ("missing", 401)):
        refused = [e for e in events if e["event"] == "handshake"
                   and e["outcome"] == "refused" and e.get("reason") == reason]
        assert refused and all(e["status"] == status for e in refused), events
        assert all(e["peer"].startswith("127.0.0.1:") for e in refused)
    assert len([e for e in events if e.get("reason") == "invalid"]) == 2
    find(events, "handshake", "refused", reason="origin", origin="https://evil.example")
    find(events, "handshake", "refused", status=404, reason="unknown path", path="/elsewhere")
    accepted = [e for e in events if e["event"] == "handshake" and e["outcome"] == "accepted"]
    assert len(accepted) == 2
    assert all((e["token"], e["subject"], e["token_id"]) == ("jwt", subject, token_id)
               for e in accepted)

    identity = {"token": "jwt", "subject": subject, "token_id": token_id}
    if level == "security":
        assert not [e for e in events if e["outcome"] == "allowed"], events
    else:
        assert_allowed(events, identity, echo_port)
    denied = find(events, "open", "refused", dest="127.0.0.2:80", **identity)
    assert (denied["code"], denied["rule"]) == ("blocked", "deny any 127.0.0.2")
    assert find(events, "open", "refused", dest=f"127.0.0.1:{echo_port + 1}")["rule"] == \
        DEFAULT_DENY
    scope = find(events, "open", "refused", dest="192.0.2.1:80")
    assert (scope["code"], scope["rule"]) == ("auth_failed", "token scope")
    failed = find(events, "open", "failed", dest=f"127.0.0.1:{closed_port}")
    assert failed["code"] == "conn_refused"
    assert find(events, "dns", "refused", name="nothing.example")["rule"] == "deny any *.example"
    limit = find(events, "limit", "reached", limit="connections_per_ip")
    assert limit["peer"].startswith("127.0.0.1:")
    find(events, "handshake", "refused", status=503, reason="connections_per_ip")
    assert len({e["pid"] for e in events}) == 1


def assert_allowed(events: list[dict[str, Any]], identity: dict[str, str],
                   echo_port: int) -> None:
    direct = find(events, "open", "allowed", dest=f"127.0.0.1:{echo_port}", **identity)
    assert direct["proto"] == "tcp" and direct["address"] == f"127.0.0.1:{echo_port}"
    assert direct["rule"] == f"allow tcp 127.0.0.1:{echo_port}"
    named = find(events, "open", "allowed", dest=f"localhost:{echo_port}")
    assert named["address"] == f"127.0.0.1:{echo_port}"  # resolved; ::1 has no echo server
    assert named["rule"] == f"allow tcp 127.0.0.1:{echo_port}"
    find(events, "dns", "allowed", name="localhost", **identity)


async def test_sighup_reopens_the_audit_log(tmp_path: Path) -> None:
    """logrotate moves the file away and sends SIGHUP: the next lines go to a new file at
    the configured path, none to the moved one."""
    audit_log, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
    gateway = await asyncio.to_thread(GatewayProcess, "--audit-log", str(audit_log),
                                      "--log-format", "json")
    try:
        await (await kclient.connect(gateway.address)).close()
        audit_log.rename(rotated)
        gateway.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not audit_log.exists():  # reopened when the reload ran
            assert time.monotonic() < deadline, "the audit log was not reopened"
            await asyncio.sleep(0.05)
        await (await kclient.connect(gateway.address)).close()
    finally:
        await asyncio.to_thread(gateway.stop)
    assert len([e for e in read_audit(rotated) if e["event"] == "handshake"]) == 1
    assert len([e for e in read_audit(audit_log) if e["event"] == "handshake"]) == 1


async def test_workers_append_whole_lines_to_one_file(tmp_path: Path) -> None:
    """Several processes append to one file: every line whole, none lost."""
    audit_log = tmp_path / "audit.log"
    gateway = await asyncio.to_thread(GatewayProcess, "--workers", "2", "--audit-log",
                                      str(audit_log), "--log-format", "json")
    try:
        clients = await asyncio.gather(*(kclient.connect(gateway.address) for _ in range(40)))
        for client in clients:
            await client.close()
    finally:
        await asyncio.to_thread(gateway.stop)
    accepted = [e for e in read_audit(audit_log) if e["event"] == "handshake"]
    assert len(accepted) == 40
    assert all(e["outcome"] == "accepted" and e["token"] == "none" for e in accepted)


async def test_without_audit_log_the_events_go_with_the_log(tmp_path: Path) -> None:
    gateway = await asyncio.to_thread(GatewayProcess)  # text, info
    try:
        client = await kclient.connect(gateway.address)
        with pytest.raises(DnsError):
            await client.resolve("bad name..x")
        await client.close()
    finally:
        log = await asyncio.to_thread(gateway.stop)
    assert " INFO ksw1fast.audit[" in log
    assert 'ksw1fast.audit' in log and 'dns refused peer=127.0.0.1:' in log
    assert 'name="bad name..x" code=refused rule="invalid host name" token=none' in log


# --- PKCS#11 ------------------------------------------------------------------------------

CKU_USER = 1
CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_SHA256_RSA_PKCS = 0x0, 0x40
CKA_TOKEN, CKA_LABEL, CKA_PRIVATE, CKA_SIGN, CKA_VERIFY = 0x1, 0x3, 0x2, 0x108, 0x10A
CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT = 0x121, 0x122
CKR_PIN_INCORRECT = 0xA0


@pytest.fixture(scope="module")
def random_pin_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    """A SoftHSM2 token whose user PIN is a marker."""
    return make_softhsm(tmp_path_factory.mktemp("softhsm-audit"), "ksw1fast-audit",
                        user_pin=marker("").encode())


async def call(client: kclient.KSW1Client, fn: str, args: Writer) -> Reader:
    response = await client.pkcs11(F[fn], args.getvalue())
    assert response.status == Pkcs11Status.OK, (fn, response)
    return Reader(response.body)


@pytest.mark.softhsm
@pytest.mark.parametrize("level", ["all", "security"])
async def test_pkcs11_login_and_sign_are_audited(tmp_path: Path, random_pin_token: SoftHSM,
                                                 level: str) -> None:
    """Logins at every level; a Sign that worked only with `--audit all`."""
    store = random_pin_token
    audit_log = tmp_path / "audit.log"
    subject, token_id = marker("subject-"), marker("jti-")
    token = issue(subject, token_id)
    key_label = marker("key-")
    wrong_pin = marker("").encode()
    signed = marker("signed-").encode()
    gateway = await asyncio.to_thread(
        GatewayProcess, "--audit-log", str(audit_log), "--log-format", "json",
        "--audit", level, "--jwt-secret-env", SECRET_ENV, "--pkcs11-lib", store.module,
        env={SECRET_ENV: SECRET, **store.env})
    try:
        client = await kclient.connect(f"{gateway.address}?token={token}")
        slots = (await call(client, "GetSlotList", Writer().bool(True))).list(Reader.u64)
        labels = [(await call(client, "GetTokenInfo", Writer().u32(s))).token_info().label
                  for s in slots]
        slot = slots[labels.index(store.label)]
        session = (await call(client, "OpenSession", Writer().u32(slot).u32(0x3))).u32()
        response = await client.pkcs11(F["Login"], Writer().u32(session).u32(CKU_USER)
                                       .bytes(wrong_pin).getvalue())
        assert response.status == Pkcs11Status.CK_ERROR
        await call(client, "Login", Writer().u32(session).u32(CKU_USER).bytes(store.user_pin))
        label = Attribute(CKA_LABEL, Tag.STRING, key_label)
        pair = await call(client, "GenerateKeyPair", Writer().u32(session)
                          .mechanism(Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN))
                          .attributes([Attribute(CKA_MODULUS_BITS, Tag.UINT64, 1024),
                                       Attribute(CKA_PUBLIC_EXPONENT, Tag.BYTE_STRING,
                                                 b"\x01\x00\x01"),
                                       Attribute(CKA_TOKEN, Tag.BOOLEAN, False),
                                       Attribute(CKA_VERIFY, Tag.BOOLEAN, True), label])
                          .attributes([Attribute(CKA_TOKEN, Tag.BOOLEAN, False),
                                       Attribute(CKA_PRIVATE, Tag.BOOLEAN, True),
                                       Attribute(CKA_SIGN, Tag.BOOLEAN, True), label]))
        _, private = pair.u32(), pair.u32()
        signature = (await call(client, "Sign", Writer().u32(session)
                                .mechanism(Mechanism(CKM_SHA256_RSA_PKCS)).u32(private)
                                .bytes(signed))).bytes()
        await call(client, "GenerateRandom", Writer().u32(session).u32(16))  # not audited
        await client.close()
    finally:
        log = await asyncio.to_thread(gateway.stop)

    events = read_audit(audit_log)
    assert_nothing_secret([audit_log.read_text(), log],
                          [token, *token.split("."), store.user_pin.decode(), wrong_pin.decode(),
                           signed.decode(), signature.hex(), SECRET])
    calls = [e for e in events if e["event"] == "pkcs11"]
    if level == "security":
        assert [e["fn"] for e in calls] == ["Login", "Login"]
        calls.append({})
    else:
        assert [e["fn"] for e in calls] == ["Login", "Login", "Sign"]  # the audited ones only
    refused_login, login, sign = calls
    calls = [e for e in calls if e]
    assert (refused_login["outcome"], refused_login["status"], refused_login["ckr"]) == \
        ("error", "ck_error", "CKR_PIN_INCORRECT")
    for event in calls:
        assert (event["subject"], event["token_id"], event["token"]) == \
            (subject, token_id, "jwt")
        assert event["peer"].startswith("127.0.0.1:") and event["session"] == session
    assert (login["outcome"], login["status"], login["user"]) == ("ok", "ok", "user")
    if level == "security":
        return
    assert sign["outcome"] == "ok" and sign["mechanism"] == "CKM_SHA256_RSA_PKCS"
    assert (sign["key"], sign["key_label"]) == (private, key_label)
