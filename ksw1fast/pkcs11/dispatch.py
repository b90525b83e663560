"""Executes PKCS#11 RPC calls (docs/pkcs11.md) against a loaded module.

One `Dispatcher` lives in an agent process and owns the module there:
PyKCS11's low-level API (`CPKCS11Lib`) makes the calls it has and gets
right, `ckapi.Module` (ctypes, same dlopen handle) the rest; ckapi.py says
which and why.

Every call is synchronous and answers a `(status, body)` pair, never an
exception. Each client (one browser connection) has its own handle tables
(handles.py). A call's args are read by its spec (argspecs.py), its values
made PyKCS11's (adaptors.py); the operation families live in operations.py,
and the handlers here are registered by function name (`_fn`).

The hot calls (the one-shots, the Inits, GenerateRandom) first try a
struct-only decode of their args (hotargs); whatever it does not accept
goes through the generic spec-driven parse, which also words every refusal.

A client may be held to its token's PKCS#11 scope (`open_client(scope)`): its
functions are checked with the gateway's own policy, its decoded args before the
module runs the call (enforce.py), and GetSlotList and GetMechanismList answer only
what the scope lets it use.

Threads: the module is initialised by PyKCS11 with NULL arguments, which
promises it one thread at a time, so every module call and table change
runs under one lock. A blocking WaitForSlotEvent (`is_blocking`) polls the
module with CKF_DONT_BLOCK every POLL_INTERVAL seconds, taking the lock only
for each poll: an agent runs it on a side thread while other calls go on. It
ends at an event, at `close_client` of its client (CkError
CKR_FUNCTION_CANCELED) or after `wait_cap` seconds (CkError CKR_NO_EVENT).
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any, Callable, Iterable

import PyKCS11.LowLevel as LL
from PyKCS11 import CKF, CKR, CKU

from ksw1fast.pkcs11 import ckapi, ckbytes, hotargs, wire
from ksw1fast.pkcs11.adaptors import (PkMechanism, Template, bytes_body, pk_bytes, pk_object,
                                      pk_template, u32_list, u64_list, version)
from ksw1fast.pkcs11.args import ARGS, OPS, malformed, unknown_fn
from ksw1fast.pkcs11.argspecs import compile_spec, parse
from ksw1fast.pkcs11.ckapi import CkrError, NativeParameter, check
from ksw1fast.pkcs11.enforce import ScopeCheck
from ksw1fast.pkcs11.handles import Client, Cursor, ObjectRow, Refusal, SessionRow
from ksw1fast.pkcs11.operations import Operations
from ksw1fast.pkcs11.scope import Pkcs11Scope
from ksw1fast.pkcs11.wire import FUNCTION_IDS, FUNCTIONS, HandleKind, Reader, Response, WireError, Writer

DEFAULT_MAX_OUT = 1 << 20
DEFAULT_WAIT_CAP = 300.0
POLL_INTERVAL = 0.1
WAIT_FOR_SLOT_EVENT = FUNCTION_IDS["WaitForSlotEvent"]
GENERATE_RANDOM = FUNCTION_IDS["GenerateRandom"]
DONT_BLOCK = 0x1  # WaitForSlotEvent flags bit0
OPEN_RW = 0x1     # OpenSession flags bit0; bit1 (serial) is always set for the module
# refused with a gateway-held PIN unless allow_admin, and so is Login as anyone but
# the user (_GATEWAY_PIN_USERS, who log in with that PIN)
ADMIN_FUNCTIONS = frozenset({"InitToken", "InitPIN", "SetPIN", "LoginVendor"})
_GATEWAY_PIN_USERS = frozenset({CKU["CKU_USER"], CKU["CKU_CONTEXT_SPECIFIC"]})
CKU_VENDOR_DEFINED = 0x80000000

_CKR_OK = CKR["CKR_OK"]


FastParser = Callable[[Client, bytes], "list[Any] | None"]  # hotargs decoders

_HANDLERS: dict[str, str] = {}  # fn name (wire.FUNCTIONS) -> the Dispatcher method's name


def _fn(name: str) -> Callable[[Callable[..., bytes]], Callable[..., bytes]]:
    """Registers a Dispatcher method as the handler of the fn `name` (wire.FUNCTIONS);
    its args are the words of args.ARGS for each fn id of that name."""
    def register(method: Callable[..., bytes]) -> Callable[..., bytes]:
        _HANDLERS[name] = method.__name__
        return method
    return register


class Dispatcher:
    """The function table over one module; see the module docstring.

    pin: a gateway-held user PIN. Login then ignores the client's PIN and logs
    the user in with this one (CKR_USER_ALREADY_LOGGED_IN counts as success),
    and token administration (InitToken, InitPIN, SetPIN, LoginVendor, Login
    as SO) is AuthDenied unless allow_admin.
    shared: several clients use this dispatcher (worker mode); needs pin.
    Logout is then a successful no-op, since the login state belongs to the
    process and a Logout would end every client's login.
    allow / deny: fn names (as in wire.FUNCTIONS) permitted; None allows all.
    A legacy id shares its name with the current one.
    max_out: the largest output size (max_out, len, max) a client may ask for.
    wait_cap: seconds a blocking WaitForSlotEvent waits at most.
    """

    def __init__(self, lib_path: str, *, pin: bytes | None = None, allow_admin: bool = False,
                 shared: bool = False, allow: Iterable[str] | None = None,
                 deny: Iterable[str] = (), max_out: int = DEFAULT_MAX_OUT,
                 wait_cap: float = DEFAULT_WAIT_CAP) -> None:
        allowed = frozenset(FUNCTION_IDS) if allow is None else wire.check_function_names(allow)
        self._permitted = allowed - wire.check_function_names(deny)
        if shared and pin is None:
            raise ValueError("a shared PKCS#11 agent needs a gateway-held PIN")
        self._pin = pin
        self._allow_admin = allow_admin
        self._shared = shared
        self.max_out = max_out
        self._wait_cap = wait_cap
        self._lib = LL.CPKCS11Lib()
        rv = self._lib.Load(lib_path)  # dlopen + C_Initialize(NULL); already initialised is fine
        if rv != _CKR_OK:
            raise OSError(f"cannot load PKCS#11 module {lib_path}: {ckapi.ckr_name(rv)}")
        self._ck = ckapi.Module(lib_path, max_out)
        self._lock = threading.Lock()
        self._clients: dict[int, Client] = {}
        self._last_client = 0
        self._closed = False
        handlers: dict[str, Callable[..., bytes]] = {
            fn: getattr(self, method) for fn, method in _HANDLERS.items()}
        self._ops = Operations(self._lib, self._ck, max_out)
        self._scope = ScopeCheck(self._lib, self._ck, self._object_session)
        # the hot calls' struct-only decoders (hotargs); the rest take the generic parse
        self._fast: dict[int, FastParser] = {GENERATE_RANDOM: self._fast_random}
        self._add_operations(handlers)
        self._handlers = {fn_id: (compile_spec(spec), handlers[FUNCTIONS[fn_id]])
                          for fn_id, spec in ARGS.items()}

    def _add_operations(self, handlers: dict[str, Callable[..., bytes]]) -> None:
        for op in OPS:
            handlers[op.kind] = partial(self._ops.one_shot, op)
            self._fast[op.one_shot] = partial(self._fast_mechanism, op.keyed, True, op.tail)
            if op.multipart:
                handlers[f"{op.kind}Init"] = partial(self._ops.init_op, op)
                handlers[f"{op.kind}Update"] = partial(self._ops.update, op)
                handlers[f"{op.kind}Final"] = partial(self._ops.final, op)
                handlers[f"{op.kind}Abort"] = partial(self._ops.abort, op)
                self._fast[op.multipart[0]] = partial(self._fast_mechanism, op.keyed, False,
                                                      hotargs.NO_TAIL)

    # --- public API ----------------------------------------------------------------------

    def open_client(self, scope: Pkcs11Scope | None = None) -> int:
        """A new client id: the handle space of one browser connection, whose calls
        `scope` (its token's, ksw1fast.pkcs11.scope) limits; None: no limits."""
        with self._lock:
            self._last_client += 1
            self._clients[self._last_client] = Client(scope)
            return self._last_client

    def is_blocking(self, fn_id: int, args: bytes) -> bool:
        """Whether call() may block: a WaitForSlotEvent without don't-block. Run it off the
        thread that serves other calls."""
        if fn_id != WAIT_FOR_SLOT_EVENT or len(args) != 4:
            return False
        return not Reader(args).u32() & DONT_BLOCK

    def call(self, client: int, fn_id: int, args: bytes) -> Response:
        """Runs one request of a client; never raises. Thread-safe."""
        name = FUNCTIONS.get(fn_id)
        state = self._clients.get(client)
        try:
            if state is None:
                return wire.internal("unknown or closed PKCS#11 client")
            if name is None:
                return wire.protocol_error(unknown_fn(fn_id))
            if name not in self._permitted:
                return wire.auth_denied(f"fn {name} not allowed")
            if name in ADMIN_FUNCTIONS:
                self._check_admin(name)
            scope = state.scope
            if scope is not None and (why := scope.function_refusal(name)) is not None:
                return wire.auth_denied(why)
            parsers, handler = self._handlers[fn_id]
            if fn_id == WAIT_FOR_SLOT_EVENT:  # locks for each poll only
                return wire.ok(handler(state, *parse(self, state, parsers, args)))
            with self._lock:
                if state.closed.is_set():
                    return wire.internal("unknown or closed PKCS#11 client")
                fast = self._fast.get(fn_id)
                values = fast(state, args) if fast is not None else None
                if values is None:
                    values = parse(self, state, parsers, args)
                if scope is not None:
                    self._scope.check(state, scope, fn_id, values)
                return wire.ok(handler(state, *values))
        except Refusal as refusal:
            return refusal.response
        except WireError as exc:
            return wire.protocol_error(malformed(fn_id, exc))
        except CkrError as exc:
            return wire.ck_error(exc.rv, str(exc))
        except ckapi.OutputTooLarge as exc:
            return wire.internal(str(exc))
        except Exception as exc:  # the contract: a call never raises
            return wire.internal(f"{type(exc).__name__}: {exc}")

    def close_client(self, client: int) -> None:
        """Ends the client's waits and closes its sessions. Thread-safe, idempotent."""
        state = self._clients.pop(client, None)
        if state is not None:
            state.closed.set()  # before the lock: a waiting poll lets go of it
            with self._lock:
                self._drop_client(state)

    def close(self) -> None:
        """Closes every client and finalises the module (PyKCS11 unload). Once, at exit."""
        for client in list(self._clients):
            self.close_client(client)
        with self._lock:
            if not self._closed:
                self._closed = True
                self._lib.Unload()

    # --- the hot calls' args without the generic parse -----------------------------------
    # The values parse would give, or None whenever it would refuse the call (a malformed
    # arg, an unknown handle, a size over the cap): it then runs and says why. Handles
    # resolve in the order of the args words (args.ARGS), so an error it raises (a WireError from a
    # mechanism parameter) is the one parse would raise at the same point.

    def _fast_mechanism(self, keyed: bool, data: bool, tail: str, c: Client,
                        args: bytes) -> list[Any] | None:
        """`session mechanism key|- [bytes tail]`: the Init and one-shot calls."""
        raw = hotargs.mechanism_call(args, keyed, data, tail)
        if raw is None:
            return None
        sid, mechanism, parameter, kid, payload, end = raw
        session = c.sessions.rows.get(sid)
        if session is None:
            return None
        native = NativeParameter(wire.Mechanism(mechanism, parameter))
        key = None
        if kid is not None:
            obj = c.objects.rows.get(kid)
            if obj is None:
                return None
            key = obj.handle
        if tail == hotargs.SIZE_TAIL and end > self.max_out:  # type: ignore[operator]
            return None
        return [session, native, key, payload, end] if data else [session, native, key]

    def _fast_random(self, c: Client, args: bytes) -> list[Any] | None:
        """`session size`: GenerateRandom."""
        raw = hotargs.session_u32(args)
        if raw is None:
            return None
        session = c.sessions.rows.get(raw[0])
        if session is None or raw[1] > self.max_out:
            return None
        return [session, raw[1]]

    # --- helpers -------------------------------------------------------------------------

    def _check_admin(self, what: str) -> None:
        if self._pin is not None and not self._allow_admin:
            raise Refusal(wire.auth_denied(f"fn {what} not allowed with a gateway-held PIN"))

    def _drop_client(self, c: Client) -> None:
        for sid in list(c.sessions.rows):
            self._close_session(c, sid, check_rv=False)
        c.objects.rows.clear()
        c.object_ids.clear()
        c.identities.clear()

    def _close_session(self, c: Client, sid: int, check_rv: bool = True) -> None:
        session = c.sessions.pop(sid)
        # its session objects die with it, and the module may give their handles to others:
        # no scope decision may rest on an identity learnt before
        c.identities.clear()
        for cid in [cid for cid, cursor in c.cursors.rows.items() if cursor.session == sid]:
            del c.cursors.rows[cid]
        rv = self._lib.C_CloseSession(session.pk)
        if check_rv:
            check(rv, "C_CloseSession")

    def _mint_object(self, c: Client, session: SessionRow, handle: int) -> int:
        """The client's row for a module object: a new one, or one more reference."""
        # the module just named this handle: it may be another object than the one whose
        # identity (CKA_CLASS, CKA_LABEL) the scope checks learnt under the same number
        c.identities.pop(handle, None)
        rid = c.object_ids.get(handle)
        if rid is None:
            rid = c.objects.add(ObjectRow(handle, [session.id]))
            c.object_ids[handle] = rid
            return rid
        obj = c.objects.rows[rid]
        obj.refs += 1
        if session.id not in obj.sessions:
            obj.sessions.append(session.id)
        return rid

    def _forget_object(self, c: Client, obj: ObjectRow) -> None:
        del c.objects.rows[obj.id]
        del c.object_ids[obj.handle]
        c.identities.pop(obj.handle, None)  # the module may give the handle to another

    def _object_session(self, c: Client, obj: ObjectRow) -> SessionRow:
        for sid in obj.sessions:
            if sid in c.sessions.rows:
                return c.sessions.rows[sid]
        raise Refusal(wire.protocol_error("object handle has no open session"))

    def _new_object(self, c: Client, session: SessionRow, make: Callable[[Any], int],
                    function: str) -> bytes:
        """Runs a PyKCS11 call that creates one object; its u32 handle as the body."""
        out = LL.CK_OBJECT_HANDLE()
        check(make(out), function)
        return Writer().u32(self._mint_object(c, session, out.value())).getvalue()

    # --- slot and token ------------------------------------------------------------------

    @_fn("GetSlotList")
    def _get_slot_list(self, c: Client, token_present: bool) -> bytes:
        slots = LL.ckulonglist()
        check(self._lib.C_GetSlotList(token_present, slots), "C_GetSlotList")
        if c.scope is not None:
            return u64_list(self._scope.slots(c.scope, list(slots)))
        return u64_list(list(slots))

    @_fn("GetSlotInfo")
    def _get_slot_info(self, c: Client, slot: int) -> bytes:
        info = LL.CK_SLOT_INFO()
        check(self._lib.C_GetSlotInfo(slot, info), "C_GetSlotInfo")
        return Writer().slot_info(wire.SlotInfo(
            info.GetSlotDescription(), info.GetManufacturerID(), info.flags,
            version(info.hardwareVersion), version(info.firmwareVersion))).getvalue()

    @_fn("GetTokenInfo")
    def _get_token_info(self, c: Client, slot: int) -> bytes:
        t = LL.CK_TOKEN_INFO()
        check(self._lib.C_GetTokenInfo(slot, t), "C_GetTokenInfo")
        clock = t.flags & CKF["CKF_CLOCK_ON_TOKEN"]
        return Writer().token_info(wire.TokenInfo(
            t.GetLabel(), t.GetManufacturerID(), t.GetModel(), t.GetSerialNumber(), t.flags,
            t.ulMaxSessionCount, t.ulSessionCount, t.ulMaxRwSessionCount, t.ulRwSessionCount,
            t.ulMaxPinLen, t.ulMinPinLen, t.ulTotalPublicMemory, t.ulFreePublicMemory,
            t.ulTotalPrivateMemory, t.ulFreePrivateMemory, version(t.hardwareVersion),
            version(t.firmwareVersion), t.GetUtcTime() if clock else None)).getvalue()

    @_fn("InitToken")
    def _init_token(self, c: Client, slot: int, so_pin: str | None, label: str) -> bytes:
        raw = label.encode("utf-8")
        if len(raw) > 32:
            raise Refusal(wire.protocol_error("token label longer than 32 bytes"))
        # C_InitToken reads exactly 32 bytes, blank padded
        padded = (raw + b" " * (32 - len(raw))).decode("utf-8")
        pin = pk_bytes(so_pin.encode("utf-8") if so_pin is not None else b"")
        check(self._lib.C_InitToken(slot, pin, padded), "C_InitToken")
        return b""

    @_fn("OpenSession")
    def _open_session(self, c: Client, slot: int, flags: int) -> bytes:
        if flags & ~0x3:
            raise Refusal(wire.protocol_error(f"unknown OpenSession flags 0x{flags:x}"))
        ck_flags = CKF["CKF_SERIAL_SESSION"] | (CKF["CKF_RW_SESSION"] if flags & OPEN_RW else 0)
        pk = LL.CK_SESSION_HANDLE()
        check(self._lib.C_OpenSession(slot, ck_flags, pk), "C_OpenSession")
        return Writer().u32(c.sessions.add(SessionRow(pk, slot))).getvalue()

    @_fn("GetMechanismList")
    def _get_mechanism_list(self, c: Client, slot: int) -> bytes:
        mechanisms = LL.ckulonglist()
        check(self._lib.C_GetMechanismList(slot, mechanisms), "C_GetMechanismList")
        allowed = None if c.scope is None else c.scope.mechanisms
        return u64_list([m for m in mechanisms if allowed is None or m in allowed])

    @_fn("Initialize")
    def _initialize(self, c: Client, config: str | None) -> bytes:
        return b""  # the agent initialised the module once for every client; config unused

    @_fn("Finalize")
    def _finalize(self, c: Client) -> bytes:
        self._drop_client(c)  # this client's handles only: the module stays initialised
        return b""

    @_fn("CloseAllSessions")
    def _close_all_sessions(self, c: Client, slot: int) -> bytes:
        for sid in [sid for sid, s in c.sessions.rows.items() if s.slot == slot]:
            self._close_session(c, sid, check_rv=False)
        return b""

    @_fn("GetInfo")
    def _get_info(self, c: Client) -> bytes:
        info = LL.CK_INFO()
        check(self._lib.C_GetInfo(info), "C_GetInfo")
        return Writer().module_info(wire.ModuleInfo(
            version(info.cryptokiVersion), info.GetManufacturerID(), info.flags,
            info.GetLibraryDescription(), version(info.libraryVersion))).getvalue()

    @_fn("WaitForSlotEvent")
    def _wait_for_slot_event(self, c: Client, flags: int) -> bytes:
        deadline = time.monotonic() + self._wait_cap
        while True:
            with self._lock:
                body = self._slot_event()
            if body is not None:
                return body
            if flags & DONT_BLOCK or time.monotonic() >= deadline:
                raise CkrError(CKR["CKR_NO_EVENT"], "C_WaitForSlotEvent")
            if c.closed.wait(POLL_INTERVAL):
                raise CkrError(CKR["CKR_FUNCTION_CANCELED"], "WaitForSlotEvent")

    def _slot_event(self) -> bytes | None:
        """One don't-block poll: the event's body, or None for CKR_NO_EVENT."""
        rv, slot = self._lib.C_WaitForSlotEvent(CKF["CKF_DONT_BLOCK"], 0)
        if rv == CKR["CKR_NO_EVENT"]:
            return None
        check(rv, "C_WaitForSlotEvent")
        info = LL.CK_SLOT_INFO()
        check(self._lib.C_GetSlotInfo(slot, info), "C_GetSlotInfo")
        present = bool(info.flags & CKF["CKF_TOKEN_PRESENT"])
        return Writer().u32(slot).bool(present).getvalue()

    @_fn("GetMechanismInfo")
    def _get_mechanism_info(self, c: Client, slot: int, mechanism: int) -> bytes:
        info = LL.CK_MECHANISM_INFO()
        check(self._lib.C_GetMechanismInfo(slot, mechanism, info), "C_GetMechanismInfo")
        return Writer().mechanism_info(wire.MechanismInfo(
            info.ulMinKeySize, info.ulMaxKeySize, info.flags)).getvalue()

    # --- session, login ------------------------------------------------------------------

    @_fn("Login")
    def _login(self, c: Client, s: SessionRow, user_type: int, pin: bytes) -> bytes:
        if self._pin is not None and user_type in _GATEWAY_PIN_USERS:
            rv = self._lib.C_Login(s.pk, user_type, pk_bytes(self._pin))
            if rv != CKR["CKR_USER_ALREADY_LOGGED_IN"] or user_type != CKU["CKU_USER"]:
                check(rv, "C_Login")
            return b""
        if self._pin is not None:  # the SO, or a vendor's user type
            self._check_admin("Login as SO" if user_type == CKU["CKU_SO"]
                              else f"Login as user type 0x{user_type:x}")
        check(self._lib.C_Login(s.pk, user_type, pk_bytes(pin)), "C_Login")
        return b""

    @_fn("LoginVendor")
    def _login_vendor(self, c: Client, s: SessionRow, user_type: int, pin: bytes) -> bytes:
        if user_type < CKU_VENDOR_DEFINED:
            raise Refusal(wire.protocol_error(
                "LoginVendor takes a vendor-defined user type (0x80000000 and up)"))
        check(self._lib.C_Login(s.pk, user_type, pk_bytes(pin)), "C_Login")
        return b""

    @_fn("Logout")
    def _logout(self, c: Client, s: SessionRow) -> bytes:
        if not self._shared:  # shared: the login is every client's; see the class docstring
            check(self._lib.C_Logout(s.pk), "C_Logout")
        return b""

    @_fn("CloseSession")
    def _close_session_fn(self, c: Client, s: SessionRow) -> bytes:
        self._close_session(c, s.id)
        return b""

    @_fn("InitPIN")
    def _init_pin(self, c: Client, s: SessionRow, pin: bytes) -> bytes:
        check(self._lib.C_InitPIN(s.pk, pk_bytes(pin)), "C_InitPIN")
        return b""

    @_fn("SetPIN")
    def _set_pin(self, c: Client, s: SessionRow, old: bytes, new: bytes) -> bytes:
        check(self._lib.C_SetPIN(s.pk, pk_bytes(old), pk_bytes(new)), "C_SetPIN")
        return b""

    @_fn("GetSessionInfo")
    def _get_session_info(self, c: Client, s: SessionRow) -> bytes:
        info = LL.CK_SESSION_INFO()
        check(self._lib.C_GetSessionInfo(s.pk, info), "C_GetSessionInfo")
        return Writer().session_info(wire.SessionInfo(
            info.slotID, info.state, info.flags, info.ulDeviceError)).getvalue()

    @_fn("CancelFunction")
    def _cancel_function(self, c: Client, s: SessionRow) -> bytes:
        self._ck.call("C_CancelFunction", s.handle)
        return b""

    # --- find ----------------------------------------------------------------------------

    @_fn("FindObjectsInit")
    def _find_objects_init(self, c: Client, s: SessionRow, template: Template) -> bytes:
        check(self._lib.C_FindObjectsInit(s.pk, pk_template(template)), "C_FindObjectsInit")
        return Writer().u32(c.cursors.add(Cursor(s.id))).getvalue()

    @_fn("FindObjects")
    def _find_objects(self, c: Client, cursor: Cursor, count: int) -> bytes:
        session = c.sessions.get(cursor.session)
        if count == 0:  # PyKCS11 would answer CKR_ARGUMENTS_BAD itself
            return u32_list([])
        found = LL.ckulonglist(count)
        check(self._lib.C_FindObjects(session.pk, found), "C_FindObjects")
        ids = [self._mint_object(c, session, handle) for handle in found]
        return u32_list(ids)

    @_fn("FindObjectsFinal")
    def _find_objects_final(self, c: Client, cursor: Cursor) -> bytes:
        c.cursors.pop(cursor.id)
        session = c.sessions.get(cursor.session)
        check(self._lib.C_FindObjectsFinal(session.pk), "C_FindObjectsFinal")
        return b""

    # --- objects and keys ----------------------------------------------------------------

    @_fn("CreateObject")
    def _create_object(self, c: Client, s: SessionRow, template: Template) -> bytes:
        return self._new_object(
            c, s, lambda out: self._lib.C_CreateObject(s.pk, pk_template(template), out),
            "C_CreateObject")

    @_fn("CopyObject")
    def _copy_object(self, c: Client, s: SessionRow, source: int, template: Template) -> bytes:
        handle = self._ck.copy_object(s.handle, source, template)
        return Writer().u32(self._mint_object(c, s, handle)).getvalue()

    @_fn("GenerateKey")
    def _generate_key(self, c: Client, s: SessionRow, mech: NativeParameter,
                      template: Template) -> bytes:
        m = PkMechanism.of(mech)
        return self._new_object(
            c, s, lambda out: self._lib.C_GenerateKey(s.pk, m.ck, pk_template(template), out),
            "C_GenerateKey")

    @_fn("GenerateKeyPair")
    def _generate_key_pair(self, c: Client, s: SessionRow, mech: NativeParameter,
                           public: Template, private: Template) -> bytes:
        pub, priv = LL.CK_OBJECT_HANDLE(), LL.CK_OBJECT_HANDLE()
        m = PkMechanism.of(mech)
        check(self._lib.C_GenerateKeyPair(s.pk, m.ck, pk_template(public),
                                          pk_template(private), pub, priv),
              "C_GenerateKeyPair")
        return (Writer().u32(self._mint_object(c, s, pub.value()))
                .u32(self._mint_object(c, s, priv.value())).getvalue())

    @_fn("DeriveKey")
    def _derive_key(self, c: Client, s: SessionRow, base: int, mech: NativeParameter,
                    template: Template) -> bytes:
        m = PkMechanism.of(mech)
        return self._new_object(
            c, s, lambda out: self._lib.C_DeriveKey(s.pk, m.ck, pk_object(base),
                                                    pk_template(template), out),
            "C_DeriveKey")

    @_fn("WrapKey")
    def _wrap_key(self, c: Client, s: SessionRow, mech: NativeParameter, wrapping: int,
                  key: int) -> bytes:
        m = PkMechanism.of(mech)
        wrapped = LL.ckbytelist()
        for _ in range(2):  # an empty buffer is PyKCS11's length query; then the real call
            check(self._lib.C_WrapKey(s.pk, m.ck, pk_object(wrapping), pk_object(key),
                                      wrapped), "C_WrapKey")
        return bytes_body(ckbytes.to_bytes(wrapped))

    @_fn("UnwrapKey")
    def _unwrap_key(self, c: Client, s: SessionRow, mech: NativeParameter, unwrapping: int,
                    wrapped: bytes, template: Template) -> bytes:
        m = PkMechanism.of(mech)
        return self._new_object(
            c, s, lambda out: self._lib.C_UnwrapKey(s.pk, m.ck, pk_object(unwrapping),
                                                    pk_bytes(wrapped),
                                                    pk_template(template), out),
            "C_UnwrapKey")

    @_fn("DigestKey")
    def _digest_key(self, c: Client, s: SessionRow, key: int) -> bytes:
        check(self._lib.C_DigestKey(s.pk, pk_object(key)), "C_DigestKey")
        return b""

    @_fn("GetAttributeValue")
    def _get_attribute_value(self, c: Client, obj: ObjectRow, types: list[int]) -> bytes:
        session = self._object_session(c, obj)
        values = self._ck.get_attribute_value(session.handle, obj.handle, types)
        return Writer().attributes(ckapi.wire_attribute(t, raw) for t, raw in values).getvalue()

    @_fn("DestroyObject")
    def _destroy_object(self, c: Client, obj: ObjectRow) -> bytes:
        session = self._object_session(c, obj)
        check(self._lib.C_DestroyObject(session.pk, pk_object(obj.handle)), "C_DestroyObject")
        self._forget_object(c, obj)  # every reference: the object is gone
        return b""

    @_fn("GetObjectSize")
    def _get_object_size(self, c: Client, obj: ObjectRow) -> bytes:
        session = self._object_session(c, obj)
        return Writer().u64(self._ck.object_size(session.handle, obj.handle)).getvalue()

    @_fn("SetAttributeValue")
    def _set_attribute_value(self, c: Client, obj: ObjectRow, template: Template) -> bytes:
        session = self._object_session(c, obj)
        c.identities.pop(obj.handle, None)  # its label may change: look it up again
        check(self._lib.C_SetAttributeValue(session.pk, pk_object(obj.handle),
                                            pk_template(template)), "C_SetAttributeValue")
        return b""

    @_fn("ObjectBind")
    def _object_bind(self, c: Client, s: SessionRow, obj: ObjectRow) -> bytes:
        obj.refs += 1
        if s.id not in obj.sessions:
            obj.sessions.append(s.id)
        return Writer().u32(obj.id).getvalue()

    @_fn("HandleDrop")
    def _handle_drop(self, c: Client, kind: int, rid: int) -> bytes:
        if kind == HandleKind.SESSION:
            self._close_session(c, rid)
        elif kind == HandleKind.OBJECT:
            obj = c.objects.get(rid)
            obj.refs -= 1
            if obj.refs == 0:
                self._forget_object(c, obj)
        elif kind == HandleKind.CURSOR:
            self._find_objects_final(c, c.cursors.get(rid))
        else:
            raise Refusal(wire.protocol_error(f"unknown handle kind {kind}"))
        return b""

    # --- random and operation state ------------------------------------------------------

    @_fn("SeedRandom")
    def _seed_random(self, c: Client, s: SessionRow, seed: bytes) -> bytes:
        check(self._lib.C_SeedRandom(s.pk, pk_bytes(seed)), "C_SeedRandom")
        return b""

    @_fn("GenerateRandom")
    def _generate_random(self, c: Client, s: SessionRow, length: int) -> bytes:
        if length == 0:  # PyKCS11 would pass the module a NULL buffer
            return bytes_body(b"")
        data = LL.ckbytelist(length)
        check(self._lib.C_GenerateRandom(s.pk, data), "C_GenerateRandom")
        return bytes_body(ckbytes.to_bytes(data))

    @_fn("GetOperationState")
    def _get_operation_state(self, c: Client, s: SessionRow, size: int) -> bytes:
        return bytes_body(self._ck.output("C_GetOperationState", s.handle, size=size))

    @_fn("SetOperationState")
    def _set_operation_state(self, c: Client, s: SessionRow, state: bytes, encryption_key: int,
                             authentication_key: int) -> bytes:
        self._ck.call("C_SetOperationState", s.handle, state, len(state), encryption_key,
                      authentication_key)
        return b""
