"""Every fn of the PKCS#11 RPC against a real SoftHSM2 token, through the `p11` client
interface only (see conftest.py): args built and bodies read with ksw1fast.pkcs11.wire."""
from __future__ import annotations

import asyncio
import hashlib
import uuid

import PyKCS11 as ck
import pytest

from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.pkcs11 import Dispatcher
from ksw1fast.pkcs11.wire import (FUNCTION_IDS as F, Attribute, HandleKind, Mechanism, Reader,
                                  SessionInfo, Tag, Writer, encode_parameter, error_of)

from .conftest import SO_PIN, TOKEN_LABEL, USER_PIN, ClientFactory, P11Client, SoftHSM

W = Writer
CKU_SO, CKU_USER = 0, 1
CKS_RW_PUBLIC_SESSION, CKS_RW_USER_FUNCTIONS = 2, 3
P256 = bytes.fromhex("06082a8648ce3d030107")  # DER OID of prime256v1
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# NIST SP 800-38A F.2.1, AES-128-CBC, first block
AES_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
AES_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
AES_PT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
AES_CT = bytes.fromhex("7649abac8119b246cee98e9b12e9197d")


def flag(cka: int, value: bool) -> Attribute:
    return Attribute(cka, Tag.BOOLEAN, value)


def number(cka: int, value: int) -> Attribute:
    return Attribute(cka, Tag.UINT64, value)


def raw(cka: int, value: bytes) -> Attribute:
    return Attribute(cka, Tag.BYTE_STRING, value)


def text(cka: int, value: str) -> Attribute:
    return Attribute(cka, Tag.STRING, value)


class Rpc:
    """Calls through a client, asserting the answer's status."""

    def __init__(self, client: P11Client) -> None:
        self.client = client

    async def call(self, fn: int, args: Writer | bytes = b"") -> tuple[int, bytes]:
        return await self.client.call(fn, args.getvalue() if isinstance(args, Writer) else args)

    async def ok(self, fn: int, args: Writer | bytes = b"") -> Reader:
        status, body = await self.call(fn, args)
        assert status == Pkcs11Status.OK, (hex(fn), status, error_of(status, body))
        return Reader(body)

    async def done(self, fn: int, args: Writer | bytes = b"") -> None:
        """Ok with an empty body."""
        (await self.ok(fn, args)).end()

    async def ckr(self, fn: int, args: Writer | bytes = b"") -> int:
        status, body = await self.call(fn, args)
        assert status == Pkcs11Status.CK_ERROR, (hex(fn), status, body)
        code, message = error_of(status, body)
        assert message  # says which call failed
        return code  # type: ignore[return-value]

    async def refused(self, fn: int, args: Writer | bytes = b"",
                      status: int = Pkcs11Status.PROTOCOL_ERROR) -> str:
        got, body = await self.call(fn, args)
        assert got == status, (hex(fn), got, body)
        return error_of(got, body)[1]

    # frequent calls
    async def slot(self, label: str = TOKEN_LABEL) -> int:
        reader = await self.ok(F["GetSlotList"], W().bool(True))
        for slot in reader.list(Reader.u64):
            if (await self.ok(F["GetTokenInfo"], W().u32(slot))).token_info().label == label:
                return slot
        raise AssertionError(f"no token {label}")

    async def open(self, slot: int, flags: int = 0x3) -> int:
        return (await self.ok(F["OpenSession"], W().u32(slot).u32(flags))).u32()

    async def login(self, session: int, pin: bytes = USER_PIN, user: int = CKU_USER) -> None:
        await self.done(F["Login"], W().u32(session).u32(user).bytes(pin))

    async def user_session(self) -> int:
        session = await self.open(await self.slot())
        await self.login(session)
        return session

    async def session_info(self, session: int) -> SessionInfo:
        return (await self.ok(F["GetSessionInfo"], W().u32(session))).session_info()

    async def attributes(self, obj: int, *types: int) -> dict[int, Attribute]:
        reader = await self.ok(F["GetAttributeValue"], W().u32(obj).list(types, Writer.u32))
        return {a.type: a for a in reader.attributes()}

    async def value(self, obj: int, cka: int) -> object:
        return (await self.attributes(obj, cka))[cka].value

    async def create(self, session: int, *template: Attribute) -> int:
        return (await self.ok(F["CreateObject"], W().u32(session).attributes(template))).u32()

    async def find(self, session: int, *template: Attribute, count: int = 100) -> list[int]:
        cursor = (await self.ok(F["FindObjectsInit"],
                                W().u32(session).attributes(template))).u32()
        reader = await self.ok(F["FindObjects"], W().u32(cursor).u32(count))
        found = reader.list(Reader.u32)
        await self.done(F["FindObjectsFinal"], W().u32(cursor))
        return found

    async def rsa_pair(self, session: int, *, token: bool = False,
                       label: str = "rsa") -> tuple[int, int]:
        reader = await self.ok(F["GenerateKeyPair"], W().u32(session)
                               .mechanism(Mechanism(ck.CKM_RSA_PKCS_KEY_PAIR_GEN))
                               .attributes([number(ck.CKA_MODULUS_BITS, 1024),
                                            raw(ck.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
                                            flag(ck.CKA_TOKEN, token), text(ck.CKA_LABEL, label),
                                            flag(ck.CKA_VERIFY, True), flag(ck.CKA_ENCRYPT, True)])
                               .attributes([flag(ck.CKA_TOKEN, token), text(ck.CKA_LABEL, label),
                                            flag(ck.CKA_PRIVATE, True),
                                            flag(ck.CKA_SENSITIVE, True),
                                            flag(ck.CKA_SIGN, True), flag(ck.CKA_DECRYPT, True)]))
        return reader.u32(), reader.u32()

    async def ec_pair(self, session: int) -> tuple[int, int]:
        reader = await self.ok(F["GenerateKeyPair"], W().u32(session)
                               .mechanism(Mechanism(ck.CKM_EC_KEY_PAIR_GEN))
                               .attributes([raw(ck.CKA_EC_PARAMS, P256), flag(ck.CKA_TOKEN, False),
                                            flag(ck.CKA_VERIFY, True)])
                               .attributes([flag(ck.CKA_TOKEN, False), flag(ck.CKA_SIGN, True),
                                            flag(ck.CKA_DERIVE, True)]))
        return reader.u32(), reader.u32()

    async def aes_key(self, session: int, value: bytes = AES_KEY, **flags: bool) -> int:
        """A session AES key of known value, its type tags as ObjectClass / KeyKind."""
        extra = [flag(getattr(ck, f"CKA_{name.upper()}"), on) for name, on in flags.items()]
        return await self.create(
            session, Attribute(ck.CKA_CLASS, Tag.OBJECT_CLASS, ck.CKO_SECRET_KEY),
            Attribute(ck.CKA_KEY_TYPE, Tag.KEY_KIND, ck.CKK_AES), raw(ck.CKA_VALUE, value),
            flag(ck.CKA_TOKEN, False), flag(ck.CKA_ENCRYPT, True), flag(ck.CKA_DECRYPT, True),
            *extra)


def rsa_pkcs1_sha256_valid(modulus: bytes, exponent: bytes, message: bytes,
                           signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 with SHA-256, checked in plain Python from the public key."""
    n, e = int.from_bytes(modulus, "big"), int.from_bytes(exponent, "big")
    size = len(modulus)
    encoded = pow(int.from_bytes(signature, "big"), e, n).to_bytes(size, "big")
    info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return encoded == b"\x00\x01" + b"\xff" * (size - 3 - len(info)) + b"\x00" + info


@pytest.fixture
def rpc(p11: P11Client) -> Rpc:
    return Rpc(p11)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the reference client sequence ------------------------------------------------------

async def test_reference_sequence(rpc: Rpc) -> None:
    reader = await rpc.ok(F["GetSlotList"], W().bool(True))
    slots = reader.list(Reader.u64)
    slot = await rpc.slot()
    assert slot in slots
    reader = await rpc.ok(F["GetMechanismList"], W().u32(slot))
    assert ck.CKM_SHA256 in reader.list(Reader.u64)
    session = await rpc.open(slot, 0x3)
    await rpc.login(session, USER_PIN)
    assert (await rpc.session_info(session)).state == CKS_RW_USER_FUNCTIONS
    random = (await rpc.ok(F["GenerateRandom"], W().u32(session).u32(16))).bytes()
    assert len(random) == 16
    await rpc.done(F["SeedRandom"], W().u32(session).bytes(b"deterministic-seed"))
    await rpc.done(F["Logout"], W().u32(session))
    assert (await rpc.session_info(session)).state == CKS_RW_PUBLIC_SESSION
    await rpc.done(F["CloseSession"], W().u32(session))
    assert await rpc.refused(F["GetSessionInfo"], W().u32(session)) == "unknown session handle"


# --- slot manager -----------------------------------------------------------------------

async def test_info_records(rpc: Rpc) -> None:
    slot = await rpc.slot()
    module = (await rpc.ok(F["GetInfo"])).module_info()
    assert module.manufacturer == "SoftHSM" and module.cryptoki == (2, 40)
    assert module.library_description == "Implementation of PKCS11"  # padding trimmed
    slot_info = (await rpc.ok(F["GetSlotInfo"], W().u32(slot))).slot_info()
    assert slot_info.description.startswith("SoftHSM slot ID")
    assert not slot_info.description.endswith(" ")
    assert slot_info.flags & ck.CKF_TOKEN_PRESENT
    token = (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info()
    assert (token.label, token.model) == (TOKEN_LABEL, "SoftHSM v2")
    assert token.flags & ck.CKF_TOKEN_INITIALIZED and token.flags & ck.CKF_USER_PIN_INITIALIZED
    assert token.total_public_mem is None  # SoftHSM: CK_UNAVAILABLE_INFORMATION
    assert token.utc_time is None  # no CKF_CLOCK_ON_TOKEN
    mech = (await rpc.ok(F["GetMechanismInfo"], W().u32(slot).u64(ck.CKM_RSA_PKCS_KEY_PAIR_GEN))
            ).mechanism_info()
    assert mech.min_key_size <= 1024 <= mech.max_key_size
    assert mech.flags & ck.CKF_GENERATE_KEY_PAIR
    assert await rpc.ckr(F["GetMechanismInfo"], W().u32(slot).u64(0x7FFF0000)) \
        == ck.CKR_MECHANISM_INVALID


async def test_legacy_info_ids_take_a_u64_slot(rpc: Rpc) -> None:
    slot = await rpc.slot()
    assert (await rpc.ok(0x0001, W().u64(slot))).slot_info() \
        == (await rpc.ok(F["GetSlotInfo"], W().u32(slot))).slot_info()
    legacy = (await rpc.ok(0x0002, W().u64(slot))).token_info()
    assert legacy.label == TOKEN_LABEL and legacy.serial \
        == (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info().serial


async def test_open_session_is_always_serial(rpc: Rpc) -> None:
    slot = await rpc.slot()
    read_only = await rpc.session_info(await rpc.open(slot, 0x0))
    assert read_only.flags == ck.CKF_SERIAL_SESSION and read_only.slot == slot
    read_write = await rpc.session_info(await rpc.open(slot, 0x1))
    assert read_write.flags == ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION
    assert "flags" in await rpc.refused(F["OpenSession"], W().u32(slot).u32(0x6))


async def test_initialize_is_idempotent(rpc: Rpc) -> None:
    session = await rpc.open(await rpc.slot())
    await rpc.done(F["Initialize"], W().option(None, Writer.string))
    await rpc.done(F["Initialize"], W().option("ignored", Writer.string))
    assert (await rpc.session_info(session)).flags & ck.CKF_SERIAL_SESSION


async def test_finalize_and_close_all_act_on_this_client_only(p11_client: ClientFactory) -> None:
    a, b = Rpc(await p11_client()), Rpc(await p11_client())
    slot = await a.slot()
    a1, a2, b1 = await a.open(slot), await a.open(slot), await b.open(slot)
    await a.done(F["CloseAllSessions"], W().u32(slot))
    for session in (a1, a2):
        assert await a.refused(F["GetSessionInfo"], W().u32(session)) == "unknown session handle"
    await b.session_info(b1)
    a3 = await a.open(slot)
    await a.done(F["Finalize"])
    assert await a.refused(F["GetSessionInfo"], W().u32(a3)) == "unknown session handle"
    await b.session_info(b1)
    await a.open(slot)  # the module is still initialised for this client too


async def test_wait_for_slot_event_dont_block(rpc: Rpc) -> None:
    # SoftHSM has no slot events: the poll answers CKR_NO_EVENT
    assert await rpc.ckr(F["WaitForSlotEvent"], W().u32(1)) == ck.CKR_NO_EVENT


async def test_blocking_wait_ends_when_its_client_closes(p11_client: ClientFactory) -> None:
    waiter, other = await p11_client(), Rpc(await p11_client())
    wait = asyncio.create_task(waiter.call(F["WaitForSlotEvent"], W().u32(0).getvalue()))
    await asyncio.sleep(0.3)
    assert not wait.done()
    await other.ok(F["GetInfo"])  # other calls go on meanwhile
    await waiter.close()
    try:
        status, body = await asyncio.wait_for(wait, 5)
    except ConnectionError:
        return  # a backend whose closed client cannot answer any more
    assert status == Pkcs11Status.CK_ERROR
    assert error_of(status, body)[0] == ck.CKR_FUNCTION_CANCELED


# --- login and PINs ---------------------------------------------------------------------

async def test_login_errors(rpc: Rpc) -> None:
    session = await rpc.open(await rpc.slot())
    assert await rpc.ckr(F["Login"], W().u32(session).u32(CKU_USER).bytes(b"0000")) \
        == ck.CKR_PIN_INCORRECT
    await rpc.login(session)
    assert await rpc.ckr(F["Login"], W().u32(session).u32(CKU_USER).bytes(USER_PIN)) \
        == ck.CKR_USER_ALREADY_LOGGED_IN
    # vendor user types only, and SoftHSM has none
    assert await rpc.ckr(F["LoginVendor"], W().u32(session).u32(0x80000001).bytes(USER_PIN)) \
        == ck.CKR_USER_TYPE_INVALID
    assert "vendor" in await rpc.refused(F["LoginVendor"],
                                         W().u32(session).u32(CKU_USER).bytes(USER_PIN))


async def uninitialised_slot(rpc: Rpc) -> int:
    reader = await rpc.ok(F["GetSlotList"], W().bool(True))
    for slot in reader.list(Reader.u64):
        info = (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info()
        if not info.flags & ck.CKF_TOKEN_INITIALIZED:
            return slot
    raise AssertionError("SoftHSM offers no free token")


async def test_token_administration(rpc: Rpc) -> None:
    """InitToken, InitPIN and SetPIN, on SoftHSM's free token (the test token is left alone)."""
    slot = await uninitialised_slot(rpc)
    label = unique("admin")
    await rpc.done(F["InitToken"],
                   W().u32(slot).option(SO_PIN.decode(), Writer.string).string(label))
    token = (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info()
    assert token.label == label and token.flags & ck.CKF_TOKEN_INITIALIZED
    assert not token.flags & ck.CKF_USER_PIN_INITIALIZED
    session = await rpc.open(slot)
    await rpc.login(session, SO_PIN, CKU_SO)
    await rpc.done(F["InitPIN"], W().u32(session).bytes(b"1111"))
    await rpc.done(F["Logout"], W().u32(session))
    assert (await rpc.ok(F["GetTokenInfo"], W().u32(slot))).token_info().flags \
        & ck.CKF_USER_PIN_INITIALIZED
    await rpc.login(session, b"1111")
    assert await rpc.ckr(F["SetPIN"], W().u32(session).bytes(b"9999").bytes(b"2222")) \
        == ck.CKR_PIN_INCORRECT
    await rpc.done(F["SetPIN"], W().u32(session).bytes(b"1111").bytes(b"2222"))
    await rpc.done(F["Logout"], W().u32(session))
    assert await rpc.ckr(F["Login"], W().u32(session).u32(CKU_USER).bytes(b"1111")) \
        == ck.CKR_PIN_INCORRECT
    await rpc.login(session, b"2222")
    assert "32 bytes" in await rpc.refused(
        F["InitToken"], W().u32(slot).option(None, Writer.string).string("x" * 33))


async def test_gateway_held_pin(p11_client: ClientFactory) -> None:
    rpc = Rpc(await p11_client(pin=USER_PIN))
    slot = await rpc.slot()
    session = await rpc.open(slot)
    await rpc.login(session, b"")  # the PIN stays at the gateway
    assert (await rpc.session_info(session)).state == CKS_RW_USER_FUNCTIONS
    await rpc.login(session, b"anything")  # already logged in counts as success
    admin = {
        "InitToken": W().u32(slot).option(None, Writer.string).string("x"),
        "InitPIN": W().u32(session).bytes(b"1"),
        "SetPIN": W().u32(session).bytes(b"1").bytes(b"2"),
        "LoginVendor": W().u32(session).u32(0x80000001).bytes(b""),
    }
    for name, args in admin.items():
        message = await rpc.refused(F[name], args, Pkcs11Status.AUTH_DENIED)
        assert name in message and "1234" not in message
    await rpc.refused(F["Login"], W().u32(session).u32(CKU_SO).bytes(SO_PIN),
                      Pkcs11Status.AUTH_DENIED)
    await rpc.done(F["Logout"], W().u32(session))  # not shared: a real logout
    assert (await rpc.session_info(session)).state == CKS_RW_PUBLIC_SESSION


async def test_gateway_held_pin_admin_allowed(p11_client: ClientFactory) -> None:
    rpc = Rpc(await p11_client(pin=USER_PIN, allow_admin=True))
    session = await rpc.open(await rpc.slot())
    # reaches the module now: a wrong old PIN is the token's answer, not AuthDenied
    assert await rpc.ckr(F["SetPIN"], W().u32(session).bytes(b"9999").bytes(b"2222")) \
        == ck.CKR_PIN_INCORRECT


async def test_shared_agent_logout_is_a_no_op(p11_client: ClientFactory) -> None:
    rpc = Rpc(await p11_client(pin=USER_PIN, shared=True))
    session = await rpc.open(await rpc.slot())
    await rpc.login(session, b"")
    await rpc.done(F["Logout"], W().u32(session))
    assert (await rpc.session_info(session)).state == CKS_RW_USER_FUNCTIONS


# --- policy, malformed input, caps -------------------------------------------------------

async def test_fn_policy(p11_client: ClientFactory) -> None:
    denied = Rpc(await p11_client(deny=["Sign", "GenerateRandom"]))
    session = await denied.user_session()
    assert await denied.refused(F["Sign"], b"", Pkcs11Status.AUTH_DENIED) == "fn Sign not allowed"
    assert await denied.refused(F["GenerateRandom"], W().u32(session).u32(4),
                                Pkcs11Status.AUTH_DENIED) == "fn GenerateRandom not allowed"
    await denied.done(F["SeedRandom"], W().u32(session).bytes(b"x"))
    only = Rpc(await p11_client(allow=["GetInfo", "GetSlotList", "GetSlotInfo"]))
    await only.ok(F["GetInfo"])
    await only.ok(F["GetSlotList"], W().bool(True))
    await only.refused(F["OpenSession"], W().u32(0).u32(0), Pkcs11Status.AUTH_DENIED)


def test_policy_names_and_modes_are_validated(softhsm: SoftHSM) -> None:
    with pytest.raises(ValueError, match="Sing"):
        Dispatcher(softhsm.module, deny=["Sing"])
    with pytest.raises(ValueError, match="Nope"):
        Dispatcher(softhsm.module, allow=["GetInfo", "Nope"])
    with pytest.raises(ValueError, match="PIN"):
        Dispatcher(softhsm.module, shared=True)


async def test_malformed_requests(rpc: Rpc) -> None:
    assert await rpc.refused(0x7777) == "unknown fn id 0x7777"
    slot = await rpc.slot()
    assert "truncated" in await rpc.refused(F["OpenSession"], W().u32(slot).u16(0))
    assert "trailing" in await rpc.refused(F["OpenSession"], W().u32(slot).u32(1).u8(0))
    assert "trailing" in await rpc.refused(F["GetSlotInfo"], W().u64(slot))  # args are u32
    session = await rpc.open(slot)
    bad_tag = W().u32(session).u32(1).u32(ck.CKA_LABEL).u8(99).getvalue()
    assert "unknown attribute tag 99" in await rpc.refused(F["FindObjectsInit"], bad_tag)
    assert "option" in await rpc.refused(F["Initialize"], W().u8(2))
    too_many = W().u32(session).u32(1000).getvalue()  # a list count beyond the bytes sent
    assert "truncated" in await rpc.refused(F["FindObjectsInit"], too_many)
    assert "handle kind" in await rpc.refused(F["HandleDrop"], W().u8(9).u32(1))
    assert await rpc.refused(F["GetSessionInfo"], W().u32(999)) == "unknown session handle"
    assert await rpc.refused(F["DestroyObject"], W().u32(999)) == "unknown object handle"
    assert await rpc.refused(F["FindObjects"], W().u32(999).u32(1)) == "unknown cursor handle"


async def test_output_sizes_are_capped(p11_client: ClientFactory) -> None:
    rpc = Rpc(await p11_client(max_out=64))
    session = await rpc.user_session()
    assert len((await rpc.ok(F["GenerateRandom"], W().u32(session).u32(64))).bytes()) == 64
    assert "cap" in await rpc.refused(F["GenerateRandom"], W().u32(session).u32(65))
    key = await rpc.aes_key(session)
    encrypt = W().u32(session).mechanism(Mechanism(ck.CKM_AES_CBC, AES_IV)).u32(key)
    assert "cap" in await rpc.refused(F["Encrypt"], encrypt.bytes(AES_PT).u32(1 << 20))
    assert "cap" in await rpc.refused(F["GetOperationState"], W().u32(session).u32(65))


# --- objects and attributes -------------------------------------------------------------

async def test_create_copy_find_destroy(rpc: Rpc) -> None:
    session = await rpc.user_session()
    label = unique("data")
    data = [number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, False),
            flag(ck.CKA_PRIVATE, False), raw(ck.CKA_VALUE, b"hello")]
    first = await rpc.create(session, text(ck.CKA_LABEL, label), *data)
    second = await rpc.create(session, text(ck.CKA_LABEL, label), *data)
    other = await rpc.create(session, text(ck.CKA_LABEL, label + "-other"), *data)
    # the same module object keeps its id for this client
    assert sorted(await rpc.find(session, text(ck.CKA_LABEL, label))) == sorted([first, second])
    cursor = (await rpc.ok(F["FindObjectsInit"],
                           W().u32(session).attributes([text(ck.CKA_LABEL, label)]))).u32()
    pages = []
    for _ in range(3):
        reader = await rpc.ok(F["FindObjects"], W().u32(cursor).u32(1))
        pages.append(reader.list(Reader.u32))
    assert [len(page) for page in pages] == [1, 1, 0]
    await rpc.done(F["FindObjectsFinal"], W().u32(cursor))
    assert await rpc.refused(F["FindObjects"], W().u32(cursor).u32(1)) \
        == "unknown cursor handle"
    copy = (await rpc.ok(F["CopyObject"], W().u32(session).u32(other)
                         .attributes([text(ck.CKA_LABEL, label + "-copy")]))).u32()
    assert await rpc.value(copy, ck.CKA_LABEL) == label + "-copy"
    assert await rpc.value(copy, ck.CKA_VALUE) == b"hello"
    await rpc.done(F["DestroyObject"], W().u32(first))
    assert await rpc.refused(F["GetAttributeValue"], W().u32(first).u32(0)) \
        == "unknown object handle"
    assert await rpc.find(session, text(ck.CKA_LABEL, label)) == [second]
    size = (await rpc.ok(F["GetObjectSize"], W().u32(second))).u64()
    assert size == (1 << 64) - 1  # SoftHSM answers CK_UNAVAILABLE_INFORMATION


async def test_attribute_tags(rpc: Rpc) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.rsa_pair(session, label="tagged")
    await rpc.done(F["SetAttributeValue"], W().u32(pub).attributes(
        [text(ck.CKA_LABEL, "renamed"), raw(ck.CKA_ID, b"\x01\x02")]))
    invalid = 0x7FFF_FF00
    got = await rpc.attributes(pub, ck.CKA_CLASS, ck.CKA_KEY_TYPE, ck.CKA_TOKEN,
                               ck.CKA_MODULUS_BITS, ck.CKA_LABEL, ck.CKA_ID,
                               ck.CKA_KEY_GEN_MECHANISM, ck.CKA_START_DATE, ck.CKA_MODULUS,
                               invalid)
    assert got[ck.CKA_CLASS] == Attribute(ck.CKA_CLASS, Tag.OBJECT_CLASS, ck.CKO_PUBLIC_KEY)
    assert got[ck.CKA_KEY_TYPE] == Attribute(ck.CKA_KEY_TYPE, Tag.KEY_KIND, ck.CKK_RSA)
    assert got[ck.CKA_TOKEN] == Attribute(ck.CKA_TOKEN, Tag.BOOLEAN, False)
    assert got[ck.CKA_MODULUS_BITS] == Attribute(ck.CKA_MODULUS_BITS, Tag.UINT64, 1024)
    assert got[ck.CKA_LABEL] == Attribute(ck.CKA_LABEL, Tag.STRING, "renamed")
    assert got[ck.CKA_ID] == Attribute(ck.CKA_ID, Tag.BYTE_STRING, b"\x01\x02")
    assert got[ck.CKA_KEY_GEN_MECHANISM] == Attribute(
        ck.CKA_KEY_GEN_MECHANISM, Tag.MECHANISM_TYPE, ck.CKM_RSA_PKCS_KEY_PAIR_GEN)
    assert got[ck.CKA_START_DATE].tag == Tag.DATE_STRING
    assert got[ck.CKA_MODULUS].tag == Tag.BYTE_STRING and len(got[ck.CKA_MODULUS].value) == 128
    assert invalid not in got  # CKR_ATTRIBUTE_TYPE_INVALID: left out
    secret = await rpc.attributes(priv, ck.CKA_PRIVATE_EXPONENT, ck.CKA_SENSITIVE, ck.CKA_ID)
    assert ck.CKA_PRIVATE_EXPONENT not in secret  # sensitive: left out
    assert secret[ck.CKA_SENSITIVE].value is True
    assert secret[ck.CKA_ID] == Attribute(ck.CKA_ID, Tag.BYTE_STRING, b"")  # empty, not missing


async def test_objects_follow_their_sessions(rpc: Rpc) -> None:
    slot = await rpc.slot()
    first, second = await rpc.open(slot), await rpc.open(slot)
    await rpc.login(first)
    label = unique("bound")
    obj = await rpc.create(first, number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, True),
                           flag(ck.CKA_PRIVATE, False), text(ck.CKA_LABEL, label))
    assert (await rpc.ok(F["ObjectBind"], W().u32(second).u32(obj))).u32() == obj
    await rpc.done(F["CloseSession"], W().u32(first))
    assert await rpc.value(obj, ck.CKA_LABEL) == label  # through the bound session
    await rpc.done(F["HandleDrop"], W().u8(HandleKind.OBJECT).u32(obj))  # 2 references -> 1
    assert await rpc.value(obj, ck.CKA_LABEL) == label
    third = await rpc.open(slot, 0x1)  # (with no session left, module handles may lapse)
    await rpc.done(F["CloseSession"], W().u32(second))
    assert await rpc.refused(F["GetAttributeValue"], W().u32(obj).u32(0)) \
        == "object handle has no open session"
    [found] = await rpc.find(third, text(ck.CKA_LABEL, label))
    assert found == obj  # found again: the same row, now bound to `third`
    await rpc.done(F["DestroyObject"], W().u32(obj))


async def test_handle_drop(rpc: Rpc) -> None:
    session = await rpc.open(await rpc.slot())
    cursor = (await rpc.ok(F["FindObjectsInit"], W().u32(session).attributes([]))).u32()
    await rpc.done(F["HandleDrop"], W().u8(HandleKind.CURSOR).u32(cursor))
    assert await rpc.refused(F["FindObjects"], W().u32(cursor).u32(1)) == "unknown cursor handle"
    # the find was finalised: a new one may start on the session
    await rpc.ok(F["FindObjectsInit"], W().u32(session).attributes([]))
    obj = await rpc.create(session, number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, False),
                           flag(ck.CKA_PRIVATE, False))
    await rpc.done(F["HandleDrop"], W().u8(HandleKind.OBJECT).u32(obj))
    assert await rpc.refused(F["GetObjectSize"], W().u32(obj)) == "unknown object handle"
    await rpc.done(F["HandleDrop"], W().u8(HandleKind.SESSION).u32(session))
    assert await rpc.refused(F["GetSessionInfo"], W().u32(session)) == "unknown session handle"
    assert await rpc.refused(F["HandleDrop"], W().u8(HandleKind.SESSION).u32(session)) \
        == "unknown session handle"


# --- keys and cryptography --------------------------------------------------------------

async def test_rsa_sign_verify(rpc: Rpc) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.rsa_pair(session)
    message = b"signed over KSW1"
    mech = Mechanism(ck.CKM_SHA256_RSA_PKCS)
    signature = (await rpc.ok(F["Sign"], W().u32(session).mechanism(mech).u32(priv)
                              .bytes(message))).bytes()
    key = await rpc.attributes(pub, ck.CKA_MODULUS, ck.CKA_PUBLIC_EXPONENT)
    assert rsa_pkcs1_sha256_valid(key[ck.CKA_MODULUS].value, key[ck.CKA_PUBLIC_EXPONENT].value,
                                  message, signature)
    verify = W().u32(session).mechanism(mech).u32(pub).bytes(message)
    await rpc.done(F["Verify"], W().u32(session).mechanism(mech).u32(pub).bytes(message)
                   .bytes(signature))
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    assert await rpc.ckr(F["Verify"], verify.bytes(forged)) == ck.CKR_SIGNATURE_INVALID
    # multipart, with an empty part, gives the same signature
    await rpc.done(F["SignInit"], W().u32(session).mechanism(mech).u32(priv))
    for part in (message[:5], b"", message[5:]):
        await rpc.done(F["SignUpdate"], W().u32(session).bytes(part).bool(False))
    assert (await rpc.ok(F["SignFinal"], W().u32(session))).bytes() == signature
    await rpc.done(F["VerifyInit"], W().u32(session).mechanism(mech).u32(pub))
    await rpc.done(F["VerifyUpdate"], W().u32(session).bytes(message).bool(True))
    await rpc.done(F["VerifyFinal"], W().u32(session).bytes(signature))
    await rpc.done(F["VerifyInit"], W().u32(session).mechanism(mech).u32(pub))
    await rpc.done(F["VerifyUpdate"], W().u32(session).bytes(message).bool(True))
    assert await rpc.ckr(F["VerifyFinal"], W().u32(session).bytes(forged)) \
        == ck.CKR_SIGNATURE_INVALID


async def test_ecdsa_sign_verify(rpc: Rpc) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.ec_pair(session)
    digest = hashlib.sha256(b"ec").digest()
    mech = Mechanism(ck.CKM_ECDSA)
    signature = (await rpc.ok(F["Sign"], W().u32(session).mechanism(mech).u32(priv)
                              .bytes(digest))).bytes()
    assert len(signature) == 64  # r || s on P-256
    await rpc.done(F["Verify"], W().u32(session).mechanism(mech).u32(pub).bytes(digest)
                   .bytes(signature))
    assert await rpc.ckr(F["Verify"], W().u32(session).mechanism(mech).u32(pub)
                         .bytes(hashlib.sha256(b"other").digest()).bytes(signature)) \
        == ck.CKR_SIGNATURE_INVALID


async def test_sign_recover_verify_recover(rpc: Rpc) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.rsa_pair(session)
    mech = Mechanism(ck.CKM_RSA_PKCS)
    # SoftHSM implements neither
    assert await rpc.ckr(F["SignRecover"], W().u32(session).mechanism(mech).u32(priv)
                         .bytes(b"m").u32(128)) == ck.CKR_FUNCTION_NOT_SUPPORTED
    assert await rpc.ckr(F["VerifyRecover"], W().u32(session).mechanism(mech).u32(pub)
                         .bytes(bytes(128)).u32(128)) == ck.CKR_FUNCTION_NOT_SUPPORTED


async def test_aes_encrypt_decrypt(rpc: Rpc) -> None:
    session = await rpc.user_session()
    key = await rpc.aes_key(session)
    cbc = Mechanism(ck.CKM_AES_CBC, AES_IV)
    assert (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(cbc).u32(key).bytes(AES_PT)
                         .u32(16))).bytes() == AES_CT  # the NIST vector
    assert (await rpc.ok(F["Decrypt"], W().u32(session).mechanism(cbc).u32(key).bytes(AES_CT)
                         .u32(16))).bytes() == AES_PT
    # too small an output: the module's CKR, and no operation left behind
    assert await rpc.ckr(F["Encrypt"], W().u32(session).mechanism(cbc).u32(key).bytes(AES_PT)
                         .u32(8)) == ck.CKR_BUFFER_TOO_SMALL
    padded = Mechanism(ck.CKM_AES_CBC_PAD, AES_IV)
    message = b"a message of more than one block, in parts"
    one_shot = (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(padded).u32(key)
                             .bytes(message).u32(64))).bytes()
    first_block = (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(cbc).u32(key)
                                .bytes(message[:16]).u32(16))).bytes()
    assert len(one_shot) == 48 and one_shot[:16] == first_block  # and no operation was left
    await rpc.done(F["EncryptInit"], W().u32(session).mechanism(padded).u32(key))
    parts = []
    for part in (message[:7], b"", message[7:30], message[30:]):
        parts.append((await rpc.ok(F["EncryptUpdate"], W().u32(session).bytes(part)
                                   .bool(False))).bytes())
    parts.append((await rpc.ok(F["EncryptFinal"], W().u32(session).u32(16))).bytes())
    assert b"".join(parts) == one_shot
    await rpc.done(F["DecryptInit"], W().u32(session).mechanism(padded).u32(key))
    plain = [(await rpc.ok(F["DecryptUpdate"], W().u32(session).bytes(one_shot[i:i + 20])
                           .bool(i + 20 >= 48))).bytes() for i in range(0, 48, 20)]
    plain.append((await rpc.ok(F["DecryptFinal"], W().u32(session).u32(32))).bytes())
    assert b"".join(plain) == message


async def test_rsa_encrypt_decrypt(rpc: Rpc) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.rsa_pair(session)
    mech = Mechanism(ck.CKM_RSA_PKCS)
    sealed = (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(mech).u32(pub)
                           .bytes(b"secret").u32(128))).bytes()
    assert len(sealed) == 128
    assert (await rpc.ok(F["Decrypt"], W().u32(session).mechanism(mech).u32(priv).bytes(sealed)
                         .u32(128))).bytes() == b"secret"


async def test_digest_and_digest_key(rpc: Rpc) -> None:
    session = await rpc.user_session()
    sha256 = Mechanism(ck.CKM_SHA256)
    assert (await rpc.ok(F["Digest"], W().u32(session).mechanism(sha256).bytes(b""))).bytes() \
        == hashlib.sha256(b"").digest()
    await rpc.done(F["DigestInit"], W().u32(session).mechanism(sha256))
    for part in (b"ab", b"", b"c"):
        await rpc.done(F["DigestUpdate"], W().u32(session).bytes(part).bool(False))
    assert (await rpc.ok(F["DigestFinal"], W().u32(session))).bytes() \
        == hashlib.sha256(b"abc").digest()
    key = await rpc.aes_key(session, sensitive=False, extractable=True)
    await rpc.done(F["DigestInit"], W().u32(session).mechanism(sha256))
    await rpc.done(F["DigestUpdate"], W().u32(session).bytes(b"prefix").bool(False))
    await rpc.done(F["DigestKey"], W().u32(session).u32(key))
    assert (await rpc.ok(F["DigestFinal"], W().u32(session))).bytes() \
        == hashlib.sha256(b"prefix" + AES_KEY).digest()


async def test_generate_wrap_unwrap(rpc: Rpc) -> None:
    session = await rpc.user_session()
    wrapping = (await rpc.ok(F["GenerateKey"], W().u32(session)
                             .mechanism(Mechanism(ck.CKM_AES_KEY_GEN))
                             .attributes([number(ck.CKA_VALUE_LEN, 16), flag(ck.CKA_TOKEN, False),
                                          flag(ck.CKA_WRAP, True), flag(ck.CKA_UNWRAP, True)]))
                ).u32()
    assert await rpc.value(wrapping, ck.CKA_VALUE_LEN) == 16
    target = await rpc.aes_key(session, extractable=True)
    wrap = Mechanism(ck.CKM_AES_KEY_WRAP)
    wrapped = (await rpc.ok(F["WrapKey"], W().u32(session).mechanism(wrap).u32(wrapping)
                            .u32(target))).bytes()
    assert len(wrapped) == 24 and AES_KEY not in wrapped
    unwrapped = (await rpc.ok(F["UnwrapKey"], W().u32(session).mechanism(wrap).u32(wrapping)
                              .bytes(wrapped).attributes([
                                  number(ck.CKA_CLASS, ck.CKO_SECRET_KEY),
                                  number(ck.CKA_KEY_TYPE, ck.CKK_AES),
                                  flag(ck.CKA_TOKEN, False), flag(ck.CKA_ENCRYPT, True)]))).u32()
    cbc = Mechanism(ck.CKM_AES_CBC, AES_IV)
    assert (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(cbc).u32(unwrapped)
                         .bytes(AES_PT).u32(16))).bytes() == AES_CT


async def test_ecdh_derive(rpc: Rpc) -> None:
    session = await rpc.user_session()
    (pub_a, priv_a), (pub_b, priv_b) = await rpc.ec_pair(session), await rpc.ec_pair(session)

    async def derive(private: int, peer_public: int) -> bytes:
        point = await rpc.value(peer_public, ck.CKA_EC_POINT)
        parameter = encode_parameter(ck.CKM_ECDH1_DERIVE, ck.CKD_NULL, b"", point)
        secret = (await rpc.ok(F["DeriveKey"], W().u32(session).u32(private)
                               .mechanism(Mechanism(ck.CKM_ECDH1_DERIVE, parameter))
                               .attributes([number(ck.CKA_CLASS, ck.CKO_SECRET_KEY),
                                            number(ck.CKA_KEY_TYPE, ck.CKK_GENERIC_SECRET),
                                            number(ck.CKA_VALUE_LEN, 32),
                                            flag(ck.CKA_TOKEN, False),
                                            flag(ck.CKA_SENSITIVE, False),
                                            flag(ck.CKA_EXTRACTABLE, True)]))).u32()
        return await rpc.value(secret, ck.CKA_VALUE)  # type: ignore[return-value]

    shared = await derive(priv_a, pub_b)
    assert len(shared) == 32 and shared == await derive(priv_b, pub_a)


async def test_operation_state(rpc: Rpc) -> None:
    session = await rpc.user_session()
    await rpc.done(F["DigestInit"], W().u32(session).mechanism(Mechanism(ck.CKM_SHA256)))
    # SoftHSM implements neither
    assert await rpc.ckr(F["GetOperationState"], W().u32(session).u32(4096)) \
        == ck.CKR_FUNCTION_NOT_SUPPORTED
    assert await rpc.ckr(F["SetOperationState"], W().u32(session).bytes(b"state")
                         .option(None, Writer.u32).option(None, Writer.u32)) \
        == ck.CKR_FUNCTION_NOT_SUPPORTED


async def test_cancel_function(rpc: Rpc) -> None:
    session = await rpc.open(await rpc.slot())
    # legacy: PKCS#11 v2.40 modules answer CKR_FUNCTION_NOT_PARALLEL
    assert await rpc.ckr(F["CancelFunction"], W().u32(session)) == ck.CKR_FUNCTION_NOT_PARALLEL


@pytest.mark.parametrize("kind, mechanism, key_role, data", [
    ("Encrypt", Mechanism(ck.CKM_AES_CBC_PAD, AES_IV), "aes", b"x" * 20),
    ("Decrypt", Mechanism(ck.CKM_AES_CBC_PAD, AES_IV), "aes", b"y" * 32),
    ("Sign", Mechanism(ck.CKM_SHA256_RSA_PKCS), "private", b"z"),
    ("Verify", Mechanism(ck.CKM_SHA256_RSA_PKCS), "public", b"z"),
    ("Digest", Mechanism(ck.CKM_SHA256), None, b"w"),
    ("Sign", Mechanism(ck.CKM_RSA_PKCS), "private", b""),  # single-part only
    ("Encrypt", Mechanism(ck.CKM_RSA_PKCS), "public", b""),
])
async def test_abort_leaves_no_operation(rpc: Rpc, kind: str, mechanism: Mechanism,
                                         key_role: str | None, data: bytes) -> None:
    session = await rpc.user_session()
    pub, priv = await rpc.rsa_pair(session)
    keys = {"aes": await rpc.aes_key(session), "public": pub, "private": priv}
    init = W().u32(session).mechanism(mechanism)
    if key_role:
        init.u32(keys[key_role])
    await rpc.done(F[f"{kind}Abort"], W().u32(session))  # nothing active: fine
    await rpc.done(F[f"{kind}Init"], init.getvalue())
    assert await rpc.ckr(F[f"{kind}Init"], init.getvalue()) == ck.CKR_OPERATION_ACTIVE
    if data:
        await rpc.ok(F[f"{kind}Update"], W().u32(session).bytes(data).bool(False))
    await rpc.done(F[f"{kind}Abort"], W().u32(session))
    await rpc.done(F[f"{kind}Init"], init.getvalue())  # a new one starts
    await rpc.done(F[f"{kind}Abort"], W().u32(session))


# --- two clients ------------------------------------------------------------------------

async def test_clients_do_not_share_handles(p11_client: ClientFactory) -> None:
    a, b = Rpc(await p11_client()), Rpc(await p11_client())
    slot = await a.slot()
    session = await a.open(slot, 0x1)
    obj = await a.create(session, number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, False),
                         flag(ck.CKA_PRIVATE, False))
    cursor = (await a.ok(F["FindObjectsInit"], W().u32(session).attributes([]))).u32()
    assert await b.refused(F["GetSessionInfo"], W().u32(session)) == "unknown session handle"
    assert await b.refused(F["CloseSession"], W().u32(session)) == "unknown session handle"
    assert await b.refused(F["GetAttributeValue"], W().u32(obj).u32(0)) \
        == "unknown object handle"
    assert await b.refused(F["FindObjects"], W().u32(cursor).u32(1)) == "unknown cursor handle"
    own = await b.open(slot, 0x0)
    assert own == session  # the same number, B's own read-only session
    assert not (await b.session_info(own)).flags & ck.CKF_RW_SESSION
    assert (await a.session_info(session)).flags & ck.CKF_RW_SESSION


async def test_private_keys_stay_with_the_client_that_logged_in(
        p11_client: ClientFactory) -> None:
    a, b = Rpc(await p11_client()), Rpc(await p11_client())
    session = await a.user_session()
    label = unique("mine")
    pub, priv = await a.rsa_pair(session, token=True, label=label)
    try:
        b_session = await b.open(await b.slot())
        found = await b.find(b_session, number(ck.CKA_CLASS, ck.CKO_PRIVATE_KEY),
                             text(ck.CKA_LABEL, label))
        if p11_client.isolated:  # PKCS#11 login state is per process
            assert found == []
            assert await b.refused(F["Sign"], W().u32(b_session)
                                   .mechanism(Mechanism(ck.CKM_SHA256_RSA_PKCS)).u32(priv)
                                   .bytes(b"x")) == "unknown object handle"
        else:
            assert len(found) == 1  # in one process B shares A's login
    finally:
        for key in (pub, priv):
            await a.done(F["DestroyObject"], W().u32(key))


async def test_closing_a_client_closes_its_sessions(p11_client: ClientFactory) -> None:
    a, b = await p11_client(), Rpc(await p11_client())
    rpc_a = Rpc(a)
    slot = await rpc_a.slot()
    label = unique("session-object")
    a_session = await rpc_a.open(slot, 0x1)
    await rpc_a.create(a_session, number(ck.CKA_CLASS, ck.CKO_DATA), flag(ck.CKA_TOKEN, False),
                       flag(ck.CKA_PRIVATE, False), text(ck.CKA_LABEL, label))
    b_session = await b.open(slot)
    before = await b.find(b_session, text(ck.CKA_LABEL, label))
    # a session object lives while its session is open, and is visible to the whole process
    assert len(before) == (0 if p11_client.isolated else 1)
    await a.close()
    assert await b.find(b_session, text(ck.CKA_LABEL, label)) == []


async def test_pointer_parameters_gcm_and_oaep(rpc: Rpc) -> None:
    session = await rpc.user_session()
    key = await rpc.aes_key(session)

    def gcm(aad: bytes) -> Mechanism:
        return Mechanism(ck.CKM_AES_GCM, encode_parameter(ck.CKM_AES_GCM, b"\x01" * 12, 96,
                                                          aad, 128))

    sealed = (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(gcm(b"aad")).u32(key)
                           .bytes(b"gcm plaintext").u32(64))).bytes()
    assert len(sealed) == len(b"gcm plaintext") + 16  # the tag
    assert (await rpc.ok(F["Decrypt"], W().u32(session).mechanism(gcm(b"aad")).u32(key)
                         .bytes(sealed).u32(64))).bytes() == b"gcm plaintext"
    # a failed tag check: SoftHSM answers CKR_GENERAL_ERROR
    assert await rpc.ckr(F["Decrypt"], W().u32(session).mechanism(gcm(b"other")).u32(key)
                         .bytes(sealed).u32(64)) == ck.CKR_GENERAL_ERROR
    pub, priv = await rpc.rsa_pair(session)
    oaep = Mechanism(ck.CKM_RSA_PKCS_OAEP, encode_parameter(
        ck.CKM_RSA_PKCS_OAEP, ck.CKM_SHA_1, ck.CKG_MGF1_SHA1, ck.CKZ_DATA_SPECIFIED, b""))
    sealed = (await rpc.ok(F["Encrypt"], W().u32(session).mechanism(oaep).u32(pub)
                           .bytes(b"oaep").u32(128))).bytes()
    assert (await rpc.ok(F["Decrypt"], W().u32(session).mechanism(oaep).u32(priv)
                         .bytes(sealed).u32(128))).bytes() == b"oaep"
