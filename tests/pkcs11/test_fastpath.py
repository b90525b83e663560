"""The Dispatcher's fast path for the hot calls answers what its generic path answers.

Every case runs the same call twice on one client and session, with the fast decoders
and with them switched off, and compares status and body: well-formed calls, every
truncation and a trailing byte, bad option flags, unknown handles, sizes over the cap
and the module's own errors (CkError).
"""
from __future__ import annotations

import asyncio
from typing import Iterator
from unittest import mock

import PyKCS11 as ck
import pytest

from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.pkcs11 import Dispatcher
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer
from ksw1fast.pkcs11.wire import Response, encode_parameter, error_of

from .conftest import SoftHSM
from .test_functions import AES_CT, AES_IV, AES_PT, Rpc, flag, raw

W = Writer
CAP = 4096
SHA256 = Mechanism(ck.CKM_SHA256)
CBC = Mechanism(ck.CKM_AES_CBC, AES_IV)
HMAC = Mechanism(ck.CKM_SHA256_HMAC)
ECDSA = Mechanism(ck.CKM_ECDSA)
UNKNOWN_MECHANISM = Mechanism(0x7FFF_FFF0)
GCM = Mechanism(ck.CKM_AES_GCM, encode_parameter(ck.CKM_AES_GCM, b"\x01" * 12, 96, b"aad", 128))
BAD_GCM = Mechanism(ck.CKM_AES_GCM, b"\x05\x00")  # not the fields of a GCM parameter


class _Client:
    """A P11Client calling one dispatcher client directly (for Rpc's set-up helpers)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.id = dispatcher.open_client()

    async def call(self, fn_id: int, args: bytes) -> tuple[int, bytes]:
        return self.dispatcher.call(self.id, fn_id, args)

    async def close(self) -> None:
        self.dispatcher.close_client(self.id)


class Keys:
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.session = self.aes = self.hmac = self.ec = self.mac = 0


@pytest.fixture(scope="module")
def dispatcher(softhsm: SoftHSM) -> Iterator[Dispatcher]:
    # not closed: unloading would finalise the module under this process's other dispatchers
    yield Dispatcher(softhsm.module, max_out=CAP)


@pytest.fixture(scope="module")
def keys(dispatcher: Dispatcher) -> Iterator[Keys]:
    keys = Keys(_Client(dispatcher))
    asyncio.run(_make_keys(keys))
    yield keys
    asyncio.run(keys.client.close())


async def _make_keys(keys: Keys) -> None:
    rpc = Rpc(keys.client)
    keys.session = await rpc.user_session()
    keys.aes = await rpc.aes_key(keys.session)
    keys.hmac = await rpc.create(
        keys.session, Attribute(ck.CKA_CLASS, Tag.OBJECT_CLASS, ck.CKO_SECRET_KEY),
        Attribute(ck.CKA_KEY_TYPE, Tag.KEY_KIND, ck.CKK_GENERIC_SECRET),
        raw(ck.CKA_VALUE, b"k" * 32), flag(ck.CKA_TOKEN, False), flag(ck.CKA_SIGN, True),
        flag(ck.CKA_VERIFY, True))
    _, keys.ec = await rpc.ec_pair(keys.session)
    keys.mac = (await rpc.ok(F["Sign"], W().u32(keys.session).mechanism(HMAC).u32(keys.hmac)
                             .bytes(b"message"))).bytes()


def call(dispatcher: Dispatcher, keys: Keys, fn: str, args: bytes,
         fast: bool = True) -> Response:
    if fast:
        return dispatcher.call(keys.client.id, F[fn], args)
    with mock.patch.dict(dispatcher._fast, clear=True):  # the generic parse for every fn
        return dispatcher.call(keys.client.id, F[fn], args)


def takes_fast_path(dispatcher: Dispatcher, keys: Keys, fn: str, args: bytes) -> bool:
    return dispatcher._fast[F[fn]](dispatcher._clients[keys.client.id], args) is not None


def same_answer(dispatcher: Dispatcher, keys: Keys, fn: str, args: bytes) -> Response:
    fast = call(dispatcher, keys, fn, args)
    generic = call(dispatcher, keys, fn, args, fast=False)
    assert fast == generic, (fn, args, error_of(*fast) if fast[0] else fast)
    return fast


def variants(args: bytes) -> list[bytes]:
    """The args, every truncation of them and the args with a trailing byte."""
    return [args, *(args[:cut] for cut in range(len(args))), args + b"\x00"]


def one_shots(k: Keys) -> list[tuple[str, bytes]]:
    s = W().u32(k.session)
    return [
        ("Digest", W().u32(k.session).mechanism(SHA256).bytes(b"abc").getvalue()),
        ("Digest", W().u32(k.session).mechanism(SHA256).bytes(b"").getvalue()),
        ("Encrypt", W().u32(k.session).mechanism(CBC).u32(k.aes).bytes(AES_PT).u32(16).getvalue()),
        ("Decrypt", W().u32(k.session).mechanism(CBC).u32(k.aes).bytes(AES_CT).u32(16).getvalue()),
        ("Encrypt", W().u32(k.session).mechanism(GCM).u32(k.aes).bytes(b"gcm").u32(64).getvalue()),
        ("Sign", W().u32(k.session).mechanism(HMAC).u32(k.hmac).bytes(b"message").getvalue()),
        ("Verify", W().u32(k.session).mechanism(HMAC).u32(k.hmac).bytes(b"message")
         .bytes(k.mac).getvalue()),
        ("SignRecover", W().u32(k.session).mechanism(HMAC).u32(k.hmac).bytes(b"m").u32(64)
         .getvalue()),
        ("VerifyRecover", W().u32(k.session).mechanism(HMAC).u32(k.hmac).bytes(k.mac).u32(64)
         .getvalue()),
        ("GenerateRandom", s.u32(0).getvalue()),
    ]


def test_one_shots_answer_the_same_for_any_shape(dispatcher: Dispatcher, keys: Keys) -> None:
    for fn, args in one_shots(keys):
        assert takes_fast_path(dispatcher, keys, fn, args), fn
        for variant in variants(args):
            same_answer(dispatcher, keys, fn, variant)
    # the answers themselves: the known vectors
    digest = same_answer(dispatcher, keys, *one_shots(keys)[0])
    assert digest[0] == Pkcs11Status.OK and Reader(digest[1]).bytes().hex().startswith("ba7816bf")
    encrypted = same_answer(dispatcher, keys, *one_shots(keys)[2])
    assert Reader(encrypted[1]).bytes() == AES_CT


def test_randomised_outputs_have_the_same_shape(dispatcher: Dispatcher, keys: Keys) -> None:
    sign = W().u32(keys.session).mechanism(ECDSA).u32(keys.ec).bytes(b"x" * 32).getvalue()
    random = W().u32(keys.session).u32(32).getvalue()
    for fn, args, size in (("Sign", sign, 64), ("GenerateRandom", random, 32)):
        assert takes_fast_path(dispatcher, keys, fn, args), fn
        for fast in (True, False):
            status, body = call(dispatcher, keys, fn, args, fast)
            assert status == Pkcs11Status.OK and len(Reader(body).bytes()) == size


def test_refusals_and_module_errors_are_the_same(dispatcher: Dispatcher, keys: Keys) -> None:
    k = keys
    cases = [  # (fn, args, what the answer says)
        ("Sign", W().u32(999).mechanism(HMAC).u32(k.hmac).bytes(b"m"), "unknown session"),
        ("Sign", W().u32(k.session).mechanism(HMAC).u32(999).bytes(b"m"), "unknown object"),
        ("Sign", W().u32(k.session).mechanism(HMAC).u32(999).u8(1), "unknown object"),
        ("Sign", W().u32(k.session).u64(ck.CKM_ECDSA).u8(2).u32(k.ec).bytes(b"m"), "option"),
        ("Encrypt", W().u32(k.session).mechanism(CBC).u32(k.aes).bytes(AES_PT).u32(CAP + 1),
         "cap"),
        ("Encrypt", W().u32(k.session).mechanism(BAD_GCM).u32(k.aes).bytes(AES_PT).u32(64),
         "truncated"),
        ("Encrypt", W().u32(k.session).mechanism(BAD_GCM).u32(999).bytes(AES_PT).u32(64),
         "truncated"),  # the parameter comes before the key
        ("GenerateRandom", W().u32(k.session).u32(CAP + 1), "cap"),
        ("GenerateRandom", W().u32(999).u32(CAP + 1), "unknown session"),
        ("Sign", W().u32(k.session).mechanism(UNKNOWN_MECHANISM).u32(k.ec).bytes(b"m"),
         ck.CKR_MECHANISM_INVALID),
        ("Sign", W().u32(k.session).mechanism(HMAC).u32(k.ec).bytes(b"m"),
         ck.CKR_KEY_TYPE_INCONSISTENT),
        ("Verify", W().u32(k.session).mechanism(HMAC).u32(k.hmac).bytes(b"other").bytes(k.mac),
         ck.CKR_SIGNATURE_INVALID),
        ("Encrypt", W().u32(k.session).mechanism(CBC).u32(k.aes).bytes(AES_PT).u32(8),
         ck.CKR_BUFFER_TOO_SMALL),
        ("SignInit", W().u32(k.session).mechanism(UNKNOWN_MECHANISM).u32(k.ec),
         ck.CKR_MECHANISM_INVALID),
        ("DigestInit", W().u32(k.session).mechanism(UNKNOWN_MECHANISM), ck.CKR_MECHANISM_INVALID),
        ("SignInit", W().u32(k.session).mechanism(ECDSA).u32(999), "unknown object"),
        ("EncryptInit", W().u32(k.session).mechanism(CBC).u32(k.aes).u8(0), "trailing"),
    ]
    for fn, args, expected in cases:
        status, body = same_answer(dispatcher, keys, fn, args.getvalue())
        code, message = error_of(status, body)
        if isinstance(expected, str):
            assert status == Pkcs11Status.PROTOCOL_ERROR and expected in message, (fn, message)
        else:
            assert (status, code) == (Pkcs11Status.CK_ERROR, expected), (fn, message)
    # a failed one-shot left no operation behind on either path
    same_answer(dispatcher, keys, *one_shots(keys)[2])


@pytest.mark.parametrize("init, abort, mechanism, key", [
    ("SignInit", "SignAbort", ECDSA, "ec"), ("VerifyInit", "VerifyAbort", HMAC, "hmac"),
    ("EncryptInit", "EncryptAbort", CBC, "aes"), ("DecryptInit", "DecryptAbort", CBC, "aes"),
    ("DigestInit", "DigestAbort", SHA256, None)])
def test_inits_answer_the_same(dispatcher: Dispatcher, keys: Keys, init: str, abort: str,
                               mechanism: Mechanism, key: str | None) -> None:
    args = W().u32(keys.session).mechanism(mechanism)
    if key is not None:
        args.u32(getattr(keys, key))
    assert takes_fast_path(dispatcher, keys, init, args.getvalue())
    abort_args = W().u32(keys.session).getvalue()
    answers = []
    for fast in (True, False):
        answers.append(call(dispatcher, keys, init, args.getvalue(), fast))
        assert call(dispatcher, keys, init, args.getvalue(), fast)[0] == Pkcs11Status.CK_ERROR
        assert call(dispatcher, keys, abort, abort_args)[0] == Pkcs11Status.OK  # active, ended
    assert answers[0] == answers[1] == (Pkcs11Status.OK, b"")
    for variant in variants(args.getvalue())[1:]:
        same_answer(dispatcher, keys, init, variant)
