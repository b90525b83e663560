"""A token's PKCS#11 scope against a real SoftHSM2 token (the pure side is
tests/test_pkcs11_scope.py).

- In this process, a Dispatcher's clients opened with a scope: every rule, on the fast
  and the generic decode of the hot calls.
- Through a real gateway with signed tokens: a token that may only sign with CKM_ECDSA
  and the key labelled "signing-key" signs with it, and everything else it tries
  (generating, wrapping, reading the key's value, another key or mechanism) answers
  AuthDenied and is counted in ksw1fast_pkcs11_scope_refusals.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator
from unittest import mock

import PyKCS11 as ck
import pytest

from ksw1fast import client as kclient
from ksw1fast.pkcs11 import Dispatcher
from ksw1fast.pkcs11.scope import Pkcs11Scope
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer
from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.security.tokens import issue_token

from helpers import GatewayProcess, free_port, http_get, make_softhsm

from .conftest import TOKEN_LABEL, SoftHSM
from .test_functions import AES_KEY, P256, Rpc, flag, number, raw, text

W = Writer
AUTH_DENIED = Pkcs11Status.AUTH_DENIED
ECDSA = Mechanism(ck.CKM_ECDSA)
DIGEST = hashlib.sha256(b"scoped").digest()
SIGN_FUNCTIONS = ["GetSlotList", "GetTokenInfo", "OpenSession", "Login", "FindObjectsInit",
                  "FindObjects", "FindObjectsFinal", "GetAttributeValue", "GetMechanismList",
                  "SignInit", "Sign", "SignUpdate", "SignFinal"]


def sign_only(key: str) -> dict[str, object]:
    """May only sign with CKM_ECDSA using the key labelled `key`."""
    return {"functions": SIGN_FUNCTIONS, "mechanisms": ["CKM_ECDSA"], "keys": [key]}


async def ec_pair(rpc: Rpc, session: int, label: str, token: bool) -> tuple[int, int]:
    """A P-256 pair labelled `label` whose private key is neither sensitive nor
    unextractable: the module would hand out its CKA_VALUE, only a scope stops that."""
    reader = await rpc.ok(F["GenerateKeyPair"], W().u32(session)
                          .mechanism(Mechanism(ck.CKM_EC_KEY_PAIR_GEN))
                          .attributes([raw(ck.CKA_EC_PARAMS, P256), flag(ck.CKA_TOKEN, token),
                                       text(ck.CKA_LABEL, label), flag(ck.CKA_VERIFY, True)])
                          .attributes([flag(ck.CKA_TOKEN, token), text(ck.CKA_LABEL, label),
                                       flag(ck.CKA_PRIVATE, True), flag(ck.CKA_SIGN, True),
                                       flag(ck.CKA_DERIVE, True),
                                       flag(ck.CKA_SENSITIVE, False),
                                       flag(ck.CKA_EXTRACTABLE, True)]))
    return reader.u32(), reader.u32()


async def aes_key(rpc: Rpc, session: int, label: str, token: bool) -> int:
    return await rpc.create(
        session, Attribute(ck.CKA_CLASS, Tag.OBJECT_CLASS, ck.CKO_SECRET_KEY),
        Attribute(ck.CKA_KEY_TYPE, Tag.KEY_KIND, ck.CKK_AES), raw(ck.CKA_VALUE, AES_KEY),
        flag(ck.CKA_TOKEN, token), text(ck.CKA_LABEL, label), flag(ck.CKA_ENCRYPT, True),
        flag(ck.CKA_WRAP, True), flag(ck.CKA_EXTRACTABLE, True),
        flag(ck.CKA_SENSITIVE, False))


async def private_key(rpc: Rpc, session: int, label: str) -> int:
    [key] = await rpc.find(session, number(ck.CKA_CLASS, ck.CKO_PRIVATE_KEY),
                           text(ck.CKA_LABEL, label))
    return key


async def denied(rpc: Rpc, fn: int, args: Writer | bytes, rule: str) -> str:
    """The AuthDenied message of a call the scope refuses by `rule`."""
    message = await rpc.refused(fn, args, AUTH_DENIED)
    assert message.startswith(f"token scope: {rule} "), message
    return message


# --- in this process --------------------------------------------------------------------

class _Client:
    """A P11Client calling one dispatcher client, opened with `scope`, directly."""

    def __init__(self, dispatcher: Dispatcher, scope: dict[str, object] | None) -> None:
        self.dispatcher = dispatcher
        self.id = dispatcher.open_client(None if scope is None else Pkcs11Scope.parse(scope))

    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        return self.dispatcher.call(self.id, fn_id, args)

    async def close(self) -> None:
        self.dispatcher.close_client(self.id)


class Objects:
    """Session objects of the set-up client, which stays logged in (for the process)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        tag = uuid.uuid4().hex[:8]
        self.sign, self.other, self.aes = f"sign-{tag}", f"other-{tag}", f"aes-{tag}"
        self.slot = self.session = self.sign_public = 0


@pytest.fixture(scope="module")
def dispatcher(softhsm: SoftHSM) -> Iterator[Dispatcher]:
    # not closed: unloading would finalise the module under this process's other dispatchers
    yield Dispatcher(softhsm.module)


@pytest.fixture(scope="module")
def objects(dispatcher: Dispatcher) -> Iterator[Objects]:
    objects = Objects(_Client(dispatcher, None))
    asyncio.run(_make_objects(objects))
    yield objects
    asyncio.run(objects.client.close())


async def _make_objects(objects: Objects) -> None:
    rpc = Rpc(objects.client)
    objects.slot = await rpc.slot()
    objects.session = await rpc.user_session()
    objects.sign_public, _ = await ec_pair(rpc, objects.session, objects.sign, token=False)
    await ec_pair(rpc, objects.session, objects.other, token=False)
    await aes_key(rpc, objects.session, objects.aes, token=False)


class Scoped:
    """A client of the test dispatcher held to a scope, with a session on the token."""

    def __init__(self, dispatcher: Dispatcher, objects: Objects) -> None:
        self._dispatcher = dispatcher
        self._objects = objects
        self.clients: list[_Client] = []

    def client(self, scope: dict[str, object]) -> Rpc:
        self.clients.append(_Client(self._dispatcher, scope))
        return Rpc(self.clients[-1])

    async def __call__(self, scope: dict[str, object]) -> tuple[Rpc, int]:
        rpc = self.client(scope)
        return rpc, await rpc.open(self._objects.slot)


@pytest.fixture
async def scoped(dispatcher: Dispatcher, objects: Objects) -> AsyncIterator[Scoped]:
    factory = Scoped(dispatcher, objects)
    yield factory
    for client in factory.clients:
        await client.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
async def test_sign_only(dispatcher: Dispatcher, objects: Objects, scoped: Scoped,
                         fast: bool) -> None:
    rpc, session = await scoped(sign_only(objects.sign))
    key, other = (await private_key(rpc, session, objects.sign),
                  await private_key(rpc, session, objects.other))
    with mock.patch.dict(dispatcher._fast, clear=not fast):  # generic: no fast decoders
        signature = (await rpc.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(key)
                                  .bytes(DIGEST))).bytes()
        assert len(signature) == 64
        # (on a session of its own: SoftHSM keeps an ECDSA sign active past a SignFinal)
        await rpc.done(F["SignInit"], W().u32(await rpc.open(objects.slot)).mechanism(ECDSA)
                       .u32(key))
        assert await denied(rpc, F["Sign"], W().u32(session).mechanism(ECDSA).u32(other)
                            .bytes(DIGEST), "key") == f"token scope: key {objects.other!r} not allowed"
        await denied(rpc, F["SignInit"], W().u32(session).mechanism(ECDSA).u32(other), "key")
        sha256 = Mechanism(ck.CKM_ECDSA_SHA256)
        assert await denied(rpc, F["Sign"], W().u32(session).mechanism(sha256).u32(key)
                            .bytes(b"data"), "mechanism") == (
            "token scope: mechanism CKM_ECDSA_SHA256 not allowed")
    await denied(rpc, F["GenerateKeyPair"], W().u32(session), "function")
    await denied(rpc, F["GenerateKey"], W().u32(session), "function")
    await denied(rpc, F["Verify"], W().u32(session), "function")
    await denied(rpc, F["WrapKey"], W().u32(session).mechanism(Mechanism(ck.CKM_AES_KEY_WRAP))
                 .u32(key).u32(key), "export")
    assert await denied(rpc, F["GetAttributeValue"], W().u32(key).list([ck.CKA_VALUE], W.u32),
                        "export") == "token scope: export of attribute 0x11 not allowed"
    # what is not key material reads as ever, and a public key's values too
    assert await rpc.value(key, ck.CKA_LABEL) == objects.sign
    [public] = await rpc.find(session, number(ck.CKA_CLASS, ck.CKO_PUBLIC_KEY),
                              text(ck.CKA_LABEL, objects.sign))
    assert await rpc.value(public, ck.CKA_EC_POINT)
    # the module itself would have given the value away (to the unlimited client)
    owner = Rpc(objects.client)
    assert await owner.value(await private_key(owner, objects.session, objects.sign),
                             ck.CKA_VALUE)
    # and the signature is good
    await owner.done(F["Verify"], W().u32(objects.session).mechanism(ECDSA)
                     .u32(objects.sign_public).bytes(DIGEST).bytes(signature))


async def test_function_refusals_come_before_the_args_are_read(scoped: Scoped) -> None:
    rpc, session = await scoped({"functions": ["OpenSession", "Sign"]})
    await denied(rpc, F["GenerateKey"], b"\xff", "function")  # malformed: still refused
    assert "malformed Sign args" in await rpc.refused(F["Sign"], b"\xff")
    assert "unknown object handle" in await rpc.refused(
        F["Sign"], W().u32(session).mechanism(ECDSA).u32(999).bytes(DIGEST))


async def test_keys_guard_operations_changes_and_new_labels(objects: Objects,
                                                            scoped: Scoped) -> None:
    rpc, session = await scoped({"keys": [objects.sign]})
    key = await private_key(rpc, session, objects.sign)
    [aes] = await rpc.find(session, text(ck.CKA_LABEL, objects.aes))
    other = await private_key(rpc, session, objects.other)
    await rpc.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(key).bytes(DIGEST))
    await denied(rpc, F["Encrypt"], W().u32(session).mechanism(Mechanism(ck.CKM_AES_ECB))
                 .u32(aes).bytes(b"\0" * 16).u32(16), "key")
    await denied(rpc, F["DeriveKey"], W().u32(session).u32(other)
                 .mechanism(Mechanism(ck.CKM_ECDH1_DERIVE)).attributes([]), "key")
    await denied(rpc, F["DestroyObject"], W().u32(other), "key")
    await denied(rpc, F["SetAttributeValue"],
                 W().u32(other).attributes([text(ck.CKA_LABEL, "renamed")]), "key")
    await denied(rpc, F["CopyObject"], W().u32(session).u32(aes).attributes([]), "key")
    # no new object, nor a changed one, may take the key's label
    data = [number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, False)]
    assert await denied(rpc, F["CreateObject"], W().u32(session).attributes(
        [*data, text(ck.CKA_LABEL, objects.sign)]), "key") == (
        f"token scope: key {objects.sign!r} may not be given to an object")
    await denied(rpc, F["SetAttributeValue"],
                 W().u32(key).attributes([text(ck.CKA_LABEL, objects.sign)]), "key")
    free = await rpc.create(session, *data, text(ck.CKA_LABEL, "free"))
    await denied(rpc, F["DestroyObject"], W().u32(free), "key")  # not one of `keys`

    def pair(label: str) -> Writer:
        return (W().u32(session).mechanism(Mechanism(ck.CKM_EC_KEY_PAIR_GEN))
                .attributes([raw(ck.CKA_EC_PARAMS, P256), flag(ck.CKA_TOKEN, False)])
                .attributes([text(ck.CKA_LABEL, label), flag(ck.CKA_TOKEN, False)]))

    await rpc.ok(F["GenerateKeyPair"], pair("new"))
    await denied(rpc, F["GenerateKeyPair"], pair(objects.sign), "key")


async def test_a_relabelled_key_is_looked_up_again(objects: Objects, scoped: Scoped) -> None:
    label = f"movable-{uuid.uuid4().hex[:8]}"
    owner = Rpc(objects.client)
    await aes_key(owner, objects.session, label, token=False)
    rpc, session = await scoped({"keys": [label], "mechanisms": ["CKM_AES_ECB"]})
    [key] = await rpc.find(session, text(ck.CKA_LABEL, label))
    encrypt = W().u32(session).mechanism(Mechanism(ck.CKM_AES_ECB)).u32(key) \
        .bytes(b"\0" * 16).u32(16)
    await rpc.ok(F["Encrypt"], encrypt)
    await rpc.done(F["SetAttributeValue"], W().u32(key).attributes([text(ck.CKA_LABEL, "gone")]))
    await denied(rpc, F["Encrypt"], encrypt, "key")


async def test_export_of_secret_keys(objects: Objects, scoped: Scoped) -> None:
    rpc, session = await scoped({})
    [aes] = await rpc.find(session, text(ck.CKA_LABEL, objects.aes))
    await denied(rpc, F["GetAttributeValue"], W().u32(aes).list([ck.CKA_VALUE], W.u32),
                 "export")
    assert await rpc.value(aes, ck.CKA_VALUE_LEN) == 16
    await denied(rpc, F["WrapKey"], W().u32(session), "export")
    rpc, session = await scoped({"export": True})
    [aes] = await rpc.find(session, text(ck.CKA_LABEL, objects.aes))
    assert await rpc.value(aes, ck.CKA_VALUE) == AES_KEY
    wrapped = (await rpc.ok(F["WrapKey"], W().u32(session).mechanism(
        Mechanism(ck.CKM_AES_KEY_WRAP)).u32(aes).u32(aes))).bytes()
    assert len(wrapped) == 24


async def test_slots_and_token_labels(objects: Objects, scoped: Scoped) -> None:
    rpc, _ = await scoped({"slots": [objects.slot]})
    assert (await rpc.ok(F["GetSlotList"], W().bool(False))).list(Reader.u64) == [objects.slot]
    rpc = scoped.client({"slots": [objects.slot + 1000]})
    assert (await rpc.ok(F["GetSlotList"], W().bool(True))).list(Reader.u64) == []
    assert await denied(rpc, F["OpenSession"], W().u32(objects.slot).u32(3), "slot") == (
        f"token scope: slot {objects.slot} not allowed")
    await denied(rpc, F["GetTokenInfo"], W().u32(objects.slot), "slot")
    await denied(rpc, F["GetSlotInfo"], W().u32(objects.slot), "slot")
    await denied(rpc, F["GetMechanismList"], W().u32(objects.slot), "slot")

    rpc, _ = await scoped({"labels": [TOKEN_LABEL]})
    slots = (await rpc.ok(F["GetSlotList"], W().bool(False))).list(Reader.u64)
    assert objects.slot in slots
    for slot in slots:
        assert (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info().label == TOKEN_LABEL
    rpc = scoped.client({"labels": ["another-token"]})
    assert (await rpc.ok(F["GetSlotList"], W().bool(False))).list(Reader.u64) == []
    assert await denied(rpc, F["GetTokenInfo"], W().u32(objects.slot), "token") == (
        f"token scope: token {TOKEN_LABEL!r} not allowed")
    await denied(rpc, F["OpenSession"], W().u32(objects.slot).u32(3), "token")
    await denied(rpc, F["GetSlotInfo"], W().u32(0xFFFF), "token")  # no such slot: no token


async def test_mechanism_list_and_info(objects: Objects, scoped: Scoped) -> None:
    rpc, _ = await scoped({"mechanisms": ["CKM_ECDSA", "CKM_AES_ECB", 0x80001234]})
    listed = (await rpc.ok(F["GetMechanismList"], W().u32(objects.slot))).list(Reader.u64)
    assert sorted(listed) == sorted([ck.CKM_ECDSA, ck.CKM_AES_ECB])
    # information about other mechanisms is no use of them
    await rpc.ok(F["GetMechanismInfo"], W().u32(objects.slot).u64(ck.CKM_SHA256))


# --- through a gateway, with signed tokens ------------------------------------------------

SECRET = "pkcs11-scope-test-secret"
SIGNING_KEY, OTHER_KEY, WRAP_KEY = "signing-key", "other-key", "wrap-key"


class Gateway:
    def __init__(self, process: GatewayProcess, metrics_port: int, store: SoftHSM) -> None:
        self.process = process
        self.metrics_port = metrics_port
        self.store = store
        self.label = store.label

    async def client(self, pkcs11: bool | dict[str, object]) -> Rpc:
        token = issue_token(SECRET.encode(), 300, [], pkcs11=pkcs11)
        return Rpc(_WsClient(await kclient.connect(self.process.address,
                                                  token=token.encode())))

    async def metrics(self) -> str:
        status, text = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200
        return text


class _WsClient:
    def __init__(self, client: kclient.KSW1Client) -> None:
        self.ws = client

    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        response = await self.ws.pkcs11(fn_id, args)
        return response.status, response.body

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway (open token mode: the Hello's token decides) on a token store of its own,
    where an unlimited token made the keys: token objects, seen by every agent."""
    store = make_softhsm(Path(tmp_path_factory.mktemp("scope-softhsm")), "scope-token")
    metrics_port = free_port()
    process = GatewayProcess(
        "--pkcs11-lib", store.module, "--token-secret-env", "SCOPE_SECRET", "--open-token",
        "--metrics-port", str(metrics_port),
        env={**store.env, "SCOPE_SECRET": SECRET})
    gateway = Gateway(process, metrics_port, store)
    try:
        asyncio.run(_make_keys(gateway))
        yield gateway
    finally:
        process.stop()


async def _make_keys(gateway: Gateway) -> None:
    rpc = await gateway.client(True)
    session = await rpc.open(await rpc.slot(gateway.label))
    await rpc.login(session)
    await ec_pair(rpc, session, SIGNING_KEY, token=True)
    await ec_pair(rpc, session, OTHER_KEY, token=True)
    await aes_key(rpc, session, WRAP_KEY, token=True)
    await rpc.client.close()


def _counted(metrics: str, fn: str, rule: str) -> float:
    match = re.search(rf'^ksw1fast_pkcs11_scope_refusals_total\{{fn="{fn}",rule="{rule}"\}} '
                      r"(\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


async def test_a_sign_only_token_through_the_gateway(gateway: Gateway) -> None:
    rpc = await gateway.client(sign_only(SIGNING_KEY))
    try:
        slot = await rpc.slot(gateway.label)
        session = await rpc.open(slot)
        await rpc.login(session)
        key = await private_key(rpc, session, SIGNING_KEY)
        other = await private_key(rpc, session, OTHER_KEY)
        [wrapping] = await rpc.find(session, text(ck.CKA_LABEL, WRAP_KEY))
        signature = (await rpc.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(key)
                                  .bytes(DIGEST))).bytes()
        assert len(signature) == 64
        assert (await rpc.ok(F["GetMechanismList"], W().u32(slot))).list(Reader.u64) \
            == [ck.CKM_ECDSA]
        refusals = [
            (F["GenerateKeyPair"], W().u32(session).mechanism(Mechanism(ck.CKM_EC_KEY_PAIR_GEN))
             .attributes([raw(ck.CKA_EC_PARAMS, P256)]).attributes([]), "function"),
            (F["GenerateKey"], W().u32(session).mechanism(Mechanism(ck.CKM_AES_KEY_GEN))
             .attributes([number(ck.CKA_VALUE_LEN, 16)]), "function"),
            (F["WrapKey"], W().u32(session).mechanism(Mechanism(ck.CKM_AES_KEY_WRAP_PAD))
             .u32(wrapping).u32(key), "export"),
            (F["GetAttributeValue"], W().u32(key).list([ck.CKA_VALUE], W.u32), "export"),
            (F["GetAttributeValue"], W().u32(wrapping).list([ck.CKA_VALUE], W.u32), "export"),
            (F["Sign"], W().u32(session).mechanism(ECDSA).u32(other).bytes(DIGEST), "key"),
            (F["SignInit"], W().u32(session).mechanism(ECDSA).u32(other), "key"),
            (F["Sign"], W().u32(session).mechanism(Mechanism(ck.CKM_ECDSA_SHA256)).u32(key)
             .bytes(b"data"), "mechanism"),
        ]
        before = await gateway.metrics()
        for fn, args, rule in refusals:
            await denied(rpc, fn, args, rule)
        after = await gateway.metrics()
        for fn, rule in {(fn, rule) for fn, _, rule in refusals}:
            name = next(n for n, i in F.items() if i == fn)
            expected = sum(1 for f, _, r in refusals if (f, r) == (fn, rule))
            assert _counted(after, name, rule) - _counted(before, name, rule) == expected, \
                (name, rule)
        # still usable after all that
        await rpc.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(key).bytes(DIGEST))
    finally:
        await rpc.client.close()
    # the signature verifies with the key's public half, by a token allowed everything
    owner = await gateway.client(True)
    try:
        session = await owner.open(await owner.slot(gateway.label))
        [public] = await owner.find(session, number(ck.CKA_CLASS, ck.CKO_PUBLIC_KEY),
                                    text(ck.CKA_LABEL, SIGNING_KEY))
        await owner.done(F["Verify"], W().u32(session).mechanism(ECDSA).u32(public)
                         .bytes(DIGEST).bytes(signature))
        # and the module would have handed out the private value: the scope kept it in
        await owner.login(session)
        assert await owner.value(await private_key(owner, session, SIGNING_KEY), ck.CKA_VALUE)
    finally:
        await owner.client.close()
    assert "Traceback" not in "".join(gateway.process.log)


async def test_a_token_for_another_hsm_token_sees_no_slot(gateway: Gateway) -> None:
    rpc = await gateway.client({"labels": ["not-" + gateway.label]})
    try:
        assert (await rpc.ok(F["GetSlotList"], W().bool(True))).list(Reader.u64) == []
        await denied(rpc, F["OpenSession"], W().u32(0).u32(3), "token")
    finally:
        await rpc.client.close()


async def test_scopes_in_a_shared_worker_agent(gateway: Gateway) -> None:
    """Worker isolation: one agent, a client per connection, each with its token's scope."""
    store = gateway.store
    process = await asyncio.to_thread(
        GatewayProcess, "--pkcs11-lib", store.module, "--token-secret-env", "SCOPE_SECRET",
        "--open-token", "--pkcs11-isolation", "worker", "--pkcs11-pin-env", "SCOPE_PIN",
        env={**store.env, "SCOPE_SECRET": SECRET, "SCOPE_PIN": store.user_pin.decode()})
    shared = Gateway(process, 0, store)
    limited, unlimited = await shared.client(sign_only(SIGNING_KEY)), await shared.client(True)
    try:
        slot = await limited.slot(store.label)
        assert (await limited.ok(F["GetMechanismList"], W().u32(slot))).list(Reader.u64) \
            == [ck.CKM_ECDSA]
        assert len((await unlimited.ok(F["GetMechanismList"], W().u32(slot)))
                   .list(Reader.u64)) > 1
        session = await limited.open(slot)
        await limited.login(session, b"")  # the gateway holds the PIN
        key = await private_key(limited, session, SIGNING_KEY)
        await limited.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(key).bytes(DIGEST))
        await denied(limited, F["GenerateKey"], W().u32(session), "function")
        other = await private_key(limited, session, OTHER_KEY)
        await denied(limited, F["Sign"], W().u32(session).mechanism(ECDSA).u32(other)
                     .bytes(DIGEST), "key")
        session = await unlimited.open(slot)  # logged in already: the agent's login
        other = await private_key(unlimited, session, OTHER_KEY)
        await unlimited.ok(F["Sign"], W().u32(session).mechanism(ECDSA).u32(other)
                           .bytes(DIGEST))
    finally:
        await limited.client.close()
        await unlimited.client.close()
        await asyncio.to_thread(process.stop)


async def test_an_identity_learnt_before_a_handle_is_named_again_is_not_trusted(
        dispatcher: Dispatcher, objects: Objects, scoped: Scoped) -> None:
    """Modules reuse handle numbers once objects die (a closed session's): when the module
    names a handle again, what the scope checks learnt of the number before (its class
    and label) is dropped, so a new object cannot pass for an allowed key."""
    rpc, session = await scoped(sign_only(objects.sign))
    other = await private_key(rpc, session, objects.other)
    client = dispatcher._clients[scoped.clients[-1].id]
    handle = client.objects.rows[other].handle
    # as if the number had named the allowed key before, and the module had reused it
    client.identities[handle] = (ck.CKO_PRIVATE_KEY, objects.sign.encode())
    assert await private_key(rpc, session, objects.other) == other  # named again
    assert await denied(rpc, F["Sign"], W().u32(session).mechanism(ECDSA).u32(other)
                        .bytes(DIGEST), "key") == f"token scope: key {objects.other!r} not allowed"
