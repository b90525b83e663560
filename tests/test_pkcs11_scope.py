"""A token's PKCS#11 scope without a module: parsing (ksw1fast.pkcs11.scope), the
decisions it makes, the tokens and the CLI that carry it, and what the gateway does with
it before any agent (a backend that cannot keep to it; the refusals it counts).
The SoftHSM2 end of it is tests/pkcs11/test_scope.py."""
from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import jwt
import pytest

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.ops import metrics
from ksw1fast.pkcs11 import scope as pkcs11_scope
from ksw1fast.pkcs11.mechanisms import MECHANISMS, mechanism_name
from ksw1fast.pkcs11.scope import NOTHING, Pkcs11Scope, parse_claim, refusal, rule_of
from ksw1fast.pkcs11 import wire
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, error_of
from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.protocol.errors import AuthError
from ksw1fast.security.jwt_tokens import JwtVerifier
from ksw1fast.security.tokens import TokenVerifier, issue_token
from ksw1fast.cli.token import main as token_main

SECRET = b"scope-test-secret"
JWT_SECRET = b"j" * 32
CKM_ECDSA, CKM_ECDSA_SHA256 = 0x1041, 0x1044
CKA_LABEL, CKA_VALUE, CKA_MODULUS, CKA_PRIVATE_EXPONENT = 0x03, 0x11, 0x120, 0x123
CKO_CERTIFICATE, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY, CKO_DATA = 1, 2, 3, 4, 0

SIGN_ONLY = {"functions": ["OpenSession", "Login", "FindObjectsInit", "FindObjects",
                           "FindObjectsFinal", "SignInit", "Sign"],
             "mechanisms": ["CKM_ECDSA"], "keys": ["signing-key"]}


# --- parsing ----------------------------------------------------------------------------

def test_a_full_scope_parses_and_round_trips() -> None:
    scope = Pkcs11Scope.parse({"slots": [0, 3], "labels": ["app-token"],
                               "functions": ["Sign", "SignInit"],
                               "mechanisms": ["CKM_ECDSA", 0x1044, "0x80000001"],
                               "keys": ["signing-key"], "export": False})
    assert scope.slots == {0, 3} and scope.labels == {"app-token"}
    assert scope.functions == {"Sign", "SignInit"}
    assert scope.mechanisms == {CKM_ECDSA, CKM_ECDSA_SHA256, 0x80000001}
    assert scope.keys == {"signing-key"} and not scope.export
    as_json = scope.to_json()
    assert as_json["mechanisms"] == ["CKM_ECDSA", "CKM_ECDSA_SHA256", 0x80000001]
    assert "export" not in as_json  # false is the default
    assert Pkcs11Scope.parse(as_json) == scope
    assert Pkcs11Scope.from_wire(scope.to_wire()) == scope


def test_absent_keys_are_no_limit_and_empty_lists_allow_nothing() -> None:
    everything = Pkcs11Scope.parse({})
    assert everything == Pkcs11Scope() and everything.to_json() == {}
    assert everything.function_refusal("GenerateKey") is None
    assert everything.mechanism_refusal(CKM_ECDSA) is None
    assert everything.key_refusal(None) is None
    nothing = Pkcs11Scope.parse({"functions": [], "mechanisms": [], "keys": []})
    assert nothing.function_refusal("GetInfo") is not None
    assert nothing.mechanism_refusal(CKM_ECDSA) is not None
    assert nothing.key_refusal(b"any") is not None


def test_the_pkcs11_claim_is_a_flag_or_a_scope() -> None:
    assert parse_claim(True) == (True, None)
    assert parse_claim(False) == (False, None)
    assert parse_claim({"keys": ["k"]}) == (True, Pkcs11Scope(keys=frozenset({"k"})))
    for bad in (None, 1, "true", ["Sign"]):
        with pytest.raises(ValueError, match="must be an object"):
            parse_claim(bad)


@pytest.mark.parametrize("value, message", [
    ({"functions": ["Sgn"]}, "unknown PKCS#11 function name 'Sgn'"),
    ({"functions": "Sign"}, "functions must be a list"),
    ({"functions": [1]}, "functions must be names"),
    ({"mechanisms": ["CKM_ECDSAA"]}, "unknown mechanism 'CKM_ECDSAA'"),
    ({"mechanisms": ["ecdsa"]}, "unknown mechanism 'ecdsa'"),
    ({"mechanisms": ["0xZZ"]}, "unknown mechanism '0xZZ'"),
    ({"mechanisms": [-1]}, "unknown mechanism -1"),
    ({"mechanisms": [True]}, "unknown mechanism True"),
    ({"mechanisms": [1 << 64]}, "unknown mechanism"),
    ({"slots": ["0"]}, "slots must be slot ids"),
    ({"slots": [True]}, "slots must be slot ids"),
    ({"slots": [-1]}, "slots must be slot ids"),
    ({"labels": ["x" * 33]}, "can never match"),
    ({"labels": ["padded "]}, "can never match"),
    ({"labels": [""]}, "labels must be non-empty strings"),
    ({"keys": [b"k".decode(), 5]}, "keys must be non-empty strings"),
    ({"export": "yes"}, "export must be true or false"),
    ({"functions": ["WrapKey"]}, "functions lists WrapKey"),
    ({"mechanism": ["CKM_ECDSA"]}, "unknown key 'mechanism' in the PKCS#11 scope"),
])
def test_malformed_scopes_say_what_is_wrong(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Pkcs11Scope.parse(value)


def test_wrap_key_with_export() -> None:
    scope = Pkcs11Scope.parse({"functions": ["WrapKey"], "export": True})
    assert scope.function_refusal("WrapKey") is None
    assert scope.to_json() == {"functions": ["WrapKey"], "export": True}


def test_saved_operation_state_needs_naming_when_keys_or_mechanisms_are_limited() -> None:
    """Get/SetOperationState move an operation's mechanism and key inside an opaque blob
    no check can read: refused under a key or mechanism limit unless `functions` names
    them; other scopes leave them as they were."""
    for limited in ({"mechanisms": ["CKM_ECDSA"]}, {"keys": ["k"]}):
        scope = Pkcs11Scope.parse(limited)
        for name in ("GetOperationState", "SetOperationState"):
            message = scope.function_refusal(name)
            assert message is not None and message.startswith("token scope: function ")
        assert scope.function_refusal("Sign") is None
        named = Pkcs11Scope.parse({**limited, "functions": ["SetOperationState"]})
        assert named.function_refusal("SetOperationState") is None
    assert Pkcs11Scope.parse({"slots": [0]}).function_refusal("SetOperationState") is None


def test_the_mechanism_table_is_pykcs11s() -> None:
    ck = pytest.importorskip("PyKCS11")
    theirs = {name: value for name, value in ck.CKM.items()
              if isinstance(name, str) and name.startswith("CKM_") and name != "CKM_VENDOR_DEFINED"}
    missing = {name: value for name, value in theirs.items() if MECHANISMS.get(name) != value}
    assert not missing
    assert mechanism_name(CKM_ECDSA) == "CKM_ECDSA" and mechanism_name(0x80000001) == "0x80000001"


# --- decisions --------------------------------------------------------------------------

def test_decisions_and_their_rules() -> None:
    scope = Pkcs11Scope.parse({"slots": [1], "labels": ["app"], **SIGN_ONLY})
    assert scope.function_refusal("Sign") is None
    assert rule_of(scope.function_refusal("GenerateKeyPair") or "") == "function"
    assert rule_of(scope.function_refusal("WrapKey") or "") == "export"  # export off
    assert scope.slot_refusal(1) is None
    assert scope.slot_refusal(0) == "token scope: slot 0 not allowed"
    assert scope.token_refusal("app") is None
    assert scope.token_refusal("other") == "token scope: token 'other' not allowed"
    assert scope.token_refusal(None) == "token scope: token not present"
    assert scope.mechanism_refusal(CKM_ECDSA) is None
    assert (scope.mechanism_refusal(CKM_ECDSA_SHA256)
            == "token scope: mechanism CKM_ECDSA_SHA256 not allowed")
    assert scope.key_refusal(b"signing-key") is None
    assert scope.key_refusal(b"other-key") == "token scope: key 'other-key' not allowed"
    assert rule_of(scope.key_refusal(None) or "") == "key"
    assert scope.template_refusal([(CKA_LABEL, b"other")]) is None
    assert rule_of(scope.template_refusal([(CKA_VALUE, b"signing-key"),
                                           (CKA_LABEL, b"signing-key")]) or "") == "key"


def test_export_covers_key_material_of_non_public_objects() -> None:
    scope = Pkcs11Scope.parse({})
    for cls in (CKO_PRIVATE_KEY, CKO_SECRET_KEY, CKO_DATA, None, 0x80000001):
        assert rule_of(scope.attributes_refusal([CKA_LABEL, CKA_VALUE], cls) or "") == "export"
        assert scope.attributes_refusal([CKA_PRIVATE_EXPONENT], cls) is not None
        assert scope.attributes_refusal([0x80000010], cls) is not None  # vendor-defined
        assert scope.attributes_refusal([CKA_LABEL, CKA_MODULUS], cls) is None
    for cls in (CKO_CERTIFICATE, CKO_PUBLIC_KEY):
        assert scope.attributes_refusal([CKA_VALUE], cls) is None
    assert Pkcs11Scope(export=True).attributes_refusal([CKA_VALUE], CKO_SECRET_KEY) is None


def test_refusal_messages_name_their_rule() -> None:
    for rule in pkcs11_scope.RULES:
        assert rule_of(refusal(rule, "x not allowed")) == rule
    assert rule_of("fn Sign not allowed") is None  # --pkcs11-deny's: not the token's
    assert rule_of("token scope: nonsense") is None
    assert NOTHING.function_refusal("GetInfo") is not None


# --- tokens that carry it ---------------------------------------------------------------

def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_signed_tokens_carry_the_scope() -> None:
    token = issue_token(SECRET, 60, [], pkcs11=SIGN_ONLY)
    assert _payload(token)["pkcs11"]["mechanisms"] == ["CKM_ECDSA"]
    grant = TokenVerifier(secret=SECRET).verify(token)
    assert grant.allows_pkcs11 and grant.pkcs11_scope == Pkcs11Scope.parse(SIGN_ONLY)
    plain = TokenVerifier(secret=SECRET).verify(issue_token(SECRET, 60, [], pkcs11=True))
    assert plain.allows_pkcs11 and plain.pkcs11_scope is None
    with pytest.raises(ValueError, match="unknown mechanism 'CKM_NOPE'"):
        issue_token(SECRET, 60, [], pkcs11={"mechanisms": ["CKM_NOPE"]})


def _signed(claims: dict[str, Any]) -> str:
    """A token signed with SECRET whose payload issue_token would not write."""
    from ksw1fast.security import tokens

    payload = tokens._b64encode(json.dumps(claims).encode())
    return f"ksw1.{payload}.{tokens._b64encode(tokens._mac(SECRET, payload))}"


def test_a_signed_scope_with_unknown_names_refuses_the_token(
        caplog: pytest.LogCaptureFixture) -> None:
    verifier = TokenVerifier(secret=SECRET)
    exp = time.time() + 60
    assert verifier.verify(_signed({"exp": exp, "pkcs11": {"keys": ["k"]}})).allows_pkcs11
    for scope, why in (({"functions": ["Sgin"]}, "unknown PKCS#11 function name 'Sgin'"),
                       ({"mechanisms": ["CKM_NOPE"]}, "unknown mechanism 'CKM_NOPE'"),
                       ({"keys": "k"}, "keys must be a list"),
                       ("sign", None)):
        token = _signed({"exp": exp, "pkcs11": scope})
        caplog.clear()
        with caplog.at_level(logging.INFO, "ksw1fast"):
            with pytest.raises(AuthError) as info:
                verifier.verify(token)
        assert info.value.kind == "invalid"
        if why is not None:  # the log says why; the client only that it is invalid
            [record] = caplog.records
            assert record.getMessage().startswith(f"signed token refused: PKCS#11 scope: {why}")
            assert token not in caplog.text


def test_jwts_carry_the_scope_in_their_ksw1_claim(caplog: pytest.LogCaptureFixture) -> None:
    verifier = JwtVerifier(secret=JWT_SECRET)
    now = time.time()

    def verify(pkcs11: object) -> Any:
        token = jwt.encode({"exp": now + 60, "ksw1": {"pkcs11": pkcs11}}, JWT_SECRET, "HS256")
        return verifier.verify(token, now)

    assert verify(SIGN_ONLY).pkcs11_scope == Pkcs11Scope.parse(SIGN_ONLY)
    assert verify(True).pkcs11_scope is None
    with caplog.at_level(logging.INFO, "ksw1fast"):
        with pytest.raises(AuthError, match="not recognised"):
            verify({"functions": ["Sign", "SignX"]})
    assert "jwt token refused: PKCS#11 scope: unknown PKCS#11 function name 'SignX'" \
        in caplog.text


# --- ksw1fast token issue ---------------------------------------------------------------

def _issue(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert token_main(["token", "issue", "--secret-env", "SCOPE_SECRET", *args]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(secret=SECRET).verify(token).allows_pkcs11
    return _payload(token)


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit):
        token_main(["token", "issue", "--secret-env", "SCOPE_SECRET", *args])
    return capsys.readouterr().err


def test_token_issue_scope_options(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    assert _issue(capsys, "--pkcs11-function", "Sign", "--pkcs11-function", "SignInit",
                  "--pkcs11-mechanism", "CKM_ECDSA", "--pkcs11-mechanism", "4164",
                  "--pkcs11-key", "signing-key", "--pkcs11-slot", "0",
                  "--pkcs11-token", "app")["pkcs11"] == {
        "slots": [0], "labels": ["app"], "functions": ["Sign", "SignInit"],
        "mechanisms": ["CKM_ECDSA", "CKM_ECDSA_SHA256"], "keys": ["signing-key"]}
    # the flags add to --pkcs11-scope's lists
    assert _issue(capsys, "--pkcs11-scope", json.dumps(SIGN_ONLY), "--pkcs11-key", "b",
                  "--pkcs11-export")["pkcs11"]["keys"] == ["b", "signing-key"]
    assert _issue(capsys, "--pkcs11-export")["pkcs11"] == {"export": True}
    assert _issue(capsys, "--allow-pkcs11")["pkcs11"] is True
    assert "unknown PKCS#11 function name 'Sgn'" in _fails(capsys, "--pkcs11-function", "Sgn")
    assert "unknown mechanism 'CKM_X'" in _fails(capsys, "--pkcs11-mechanism", "CKM_X")
    assert "--pkcs11-scope: not JSON" in _fails(capsys, "--pkcs11-scope", "{")
    assert "must be a JSON object" in _fails(capsys, "--pkcs11-scope", "[]")
    assert "--pkcs11-slot takes slot ids" in _fails(capsys, "--pkcs11-slot", "first")
    assert "functions lists WrapKey" in _fails(capsys, "--pkcs11-function", "WrapKey")
    assert "would allow nothing" in _fails(capsys)


# --- the gateway, before any agent ------------------------------------------------------

class _Backend:
    """A custom backend: answers every call Ok, remembering what it was asked."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        self.calls.append(fn_id)
        return Pkcs11Status.OK, b""


class _ScopedOkBackend(_Backend):
    """... can take a scope, and answers Ok."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[Pkcs11Scope] = []

    def limit(self, scope: Pkcs11Scope) -> None:
        self.scopes.append(scope)


class _ScopedBackend(_ScopedOkBackend):
    """... and refuses Sign whatever the scope says."""

    async def handle(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        self.calls.append(fn_id)
        return wire.auth_denied("token scope: function Sign not allowed")


class _Provider:
    def __init__(self, backend: type[_Backend]) -> None:
        self.backends: list[_Backend] = []
        self._make = backend

    def for_connection(self) -> _Backend:
        self.backends.append(self._make())
        return self.backends[-1]


def _refusals(fn: str, rule: str) -> float:
    if not metrics.AVAILABLE:
        return 0.0
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ksw1fast_pkcs11_scope_refusals_total",
                                     {"fn": fn, "rule": rule}) or 0.0


async def _scoped_refused_then_plain(backend: Any, refusal: str, tries: int = 1) -> None:
    """Through a gateway over `backend`: a scoped token's GetInfo answers AuthDenied with
    `refusal` (`tries` times), then a plain token's GetInfo answers Ok.  open_token: the
    Hello's token decides (the other tests: the handshake's)."""
    scoped = issue_token(SECRET, 60, [], pkcs11=SIGN_ONLY).encode()
    plain = issue_token(SECRET, 60, [], pkcs11=True).encode()
    async with await ksw1fast.start_gateway(port=0, token_secret_env="SCOPE_SECRET",
                                            open_token=True, pkcs11_backend=backend) as gw:
        client = await kclient.connect(gw.address, token=scoped)
        for _ in range(tries):
            response = await client.pkcs11(F["GetInfo"], b"")
            assert response.status == Pkcs11Status.AUTH_DENIED
            assert error_of(response.status, response.body)[1] == refusal
        await client.close()
        client = await kclient.connect(gw.address, token=plain)
        assert (await client.pkcs11(F["GetInfo"], b"")).status == Pkcs11Status.OK
        await client.close()


async def test_a_backend_that_cannot_keep_a_scope_gets_no_call_of_a_scoped_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    provider = _Provider(_Backend)
    before = _refusals("GetInfo", "backend")
    await _scoped_refused_then_plain(
        provider, "token scope: backend cannot hold calls to the token's scope", tries=2)
    assert provider.backends[0].calls == [] and provider.backends[1].calls == [F["GetInfo"]]
    if metrics.AVAILABLE:
        assert _refusals("GetInfo", "backend") == before + 2


async def test_a_scoped_backend_gets_the_scope_before_the_first_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    provider = _Provider(_ScopedBackend)
    scoped = issue_token(SECRET, 60, [], pkcs11=SIGN_ONLY)
    before = _refusals("Sign", "function")
    async with await ksw1fast.start_gateway(port=0, token_secret_env="SCOPE_SECRET",
                                            pkcs11_backend=provider) as gw:
        client = await kclient.connect(
            gw.address, extra_headers={"Sec-WebSocket-Protocol": f"auth-{scoped}"})
        for _ in range(3):
            response = await client.pkcs11(F["Sign"], b"")
            assert response.status == Pkcs11Status.AUTH_DENIED
        await client.close()
    backend = provider.backends[0]
    assert isinstance(backend, _ScopedBackend)
    assert backend.scopes == [Pkcs11Scope.parse(SIGN_ONLY)] and len(backend.calls) == 3
    if metrics.AVAILABLE:
        assert _refusals("Sign", "function") == before + 3


class _BrokenScopedBackend(_Backend):
    def limit(self, scope: Pkcs11Scope) -> None:
        raise RuntimeError("cannot")


async def test_a_backend_whose_limit_fails_gets_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    provider = _Provider(_BrokenScopedBackend)
    scoped = issue_token(SECRET, 60, [], pkcs11=SIGN_ONLY).encode()
    async with await ksw1fast.start_gateway(port=0, token_secret_env="SCOPE_SECRET",
                                            open_token=True, pkcs11_backend=provider) as gw:
        client = await kclient.connect(gw.address, token=scoped)
        response = await client.pkcs11(F["Sign"], b"")
        await client.close()
    assert error_of(response.status, response.body) == (
        None, "token scope: backend failed to take the token's scope")
    assert provider.backends[0].calls == []


async def test_a_shared_backend_gets_no_call_of_a_scoped_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One backend for every connection (no provider): its `handle` cannot tell whose
    scope a call is under, so a scoped token's calls never reach it, even with `limit`."""
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    shared = _ScopedOkBackend()
    await _scoped_refused_then_plain(
        shared, "token scope: backend is shared: it cannot hold one token's scope")
    assert shared.scopes == [] and shared.calls == [F["GetInfo"]]


async def test_a_scope_refusal_is_in_the_audit_trail(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A call the token's scope refused is an audit event of its own ("refused", with
    the rule), at the trail's default level, and not a second "error" event."""
    monkeypatch.setenv("SCOPE_SECRET", SECRET.decode())
    provider = _Provider(_ScopedBackend)
    scoped = issue_token(SECRET, 60, [], pkcs11=SIGN_ONLY).encode()
    caplog.set_level(logging.INFO, logger="ksw1fast.audit")
    async with await ksw1fast.start_gateway(port=0, token_secret_env="SCOPE_SECRET",
                                            open_token=True, pkcs11_backend=provider) as gw:
        client = await kclient.connect(gw.address, token=scoped)
        assert (await client.pkcs11(F["Sign"], b"")).status == Pkcs11Status.AUTH_DENIED
        await client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ksw1fast.audit"]
    pkcs11 = [line for line in lines if line.startswith("pkcs11 ")]
    assert len(pkcs11) == 1 and pkcs11[0].startswith("pkcs11 refused"), lines
    assert "fn=Sign" in pkcs11[0] and "rule=function" in pkcs11[0]
