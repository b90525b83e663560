"""Reading a call's args by its spec (args.ARGS): a handler declares its args as words,
Reader methods (u8, u32, u64, bool, bytes, string) or one of the resolvers here, which
also turn a client's handle ids into its rows and check sizes against the cap."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Protocol

from ksw1fast.pkcs11 import ckapi, wire
from ksw1fast.pkcs11.ckapi import NativeParameter
from ksw1fast.pkcs11.handles import Client, Refusal
from ksw1fast.pkcs11.wire import Reader


class Capped(Protocol):
    max_out: int  # the largest output size a client may ask for


def _size(d: Capped, c: Client, r: Reader) -> int:
    size = r.u32()
    if size > d.max_out:
        raise Refusal(wire.protocol_error(
            f"requested size {size} exceeds the cap of {d.max_out}"))
    return size


def _key(d: Capped, c: Client, r: Reader) -> int:
    return c.objects.get(r.u32()).handle


_RESOLVERS: dict[str, Callable[[Capped, Client, Reader], Any]] = {
    "-": lambda d, c, r: None,  # an argument this variant does not have
    "session": lambda d, c, r: c.sessions.get(r.u32()),
    "object": lambda d, c, r: c.objects.get(r.u32()),
    "cursor": lambda d, c, r: c.cursors.get(r.u32()),
    "key": _key,
    "opt_key": lambda d, c, r: r.option(partial(_key, d, c)) or 0,  # 0: CK_INVALID_HANDLE
    "size": _size,
    "mechanism": lambda d, c, r: NativeParameter(r.mechanism()),
    "template": lambda d, c, r: [(a.type, ckapi.native_value(a)) for a in r.attributes()],
    "types": lambda d, c, r: r.list(Reader.u32),
    "opt_string": lambda d, c, r: r.option(Reader.string),
}


Parser = Callable[[Capped, Client, Reader], Any]


def compile_spec(spec: str) -> tuple[Parser, ...]:
    """The readers of an args spec, looked up once rather than on every call."""
    return tuple(_RESOLVERS[word] if word in _RESOLVERS
                 else (lambda d, c, r, read=getattr(Reader, word): read(r))
                 for word in spec.split())


def parse(d: Capped, c: Client, parsers: tuple[Parser, ...], args: bytes) -> list[Any]:
    reader = Reader(args)
    values = [read(d, c, reader) for read in parsers]
    reader.end()
    return values
