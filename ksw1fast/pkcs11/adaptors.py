"""Wire values as PyKCS11 wants them, and module answers as wire bodies.

Object handles and parameterless mechanisms are wrapped once and reused, and byte
strings cross SWIG in one copy (ckbytes): the agent spends its time in the module.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import PyKCS11.LowLevel as LL

from ksw1fast.pkcs11 import ckbytes, wire
from ksw1fast.pkcs11.ckapi import NativeParameter
from ksw1fast.pkcs11.wire import U32, Writer

Template = list[tuple[int, bytes]]  # (CKA, the value as the module's C type)


def bytes_body(data: bytes) -> bytes:
    return U32.pack(len(data)) + data


@lru_cache(maxsize=4096)
def pk_object(handle: int) -> Any:
    """PyKCS11's wrapper of an object handle, an input only: built once, not per call."""
    obj = LL.CK_OBJECT_HANDLE()
    obj.assign(handle)
    return obj


pk_bytes = ckbytes.from_bytes


def pk_template(template: Template) -> Any:
    """A PyKCS11 template of the values as they are: native_value already made them C."""
    attrs = LL.ckattrlist(len(template))
    for index, (cka, value) in enumerate(template):
        attrs[index].SetBin(cka, pk_bytes(value))  # indexing gives the element, iterating a copy
    return attrs


class PkMechanism:
    """A CK_MECHANISM for PyKCS11 (`.ck`), holding the parameter buffers it points to:
    keep this object, not just `.ck`, alive for the whole call. `of` reuses the one of a
    mechanism without a parameter: the module only reads it."""

    def __init__(self, native: NativeParameter) -> None:
        self._native = native
        self.ck = LL.CK_MECHANISM()
        self.ck.mechanism = native.type
        if native.blob:
            self._param = pk_bytes(native.blob)
            self.ck.pParameter = self._param
            self.ck.ulParameterLen = len(native.blob)

    @staticmethod
    def of(native: NativeParameter) -> "PkMechanism":
        return PkMechanism(native) if native.blob else bare_mechanism(native.type)


@lru_cache(maxsize=256)
def bare_mechanism(mechanism: int) -> PkMechanism:
    return PkMechanism(NativeParameter(wire.Mechanism(mechanism)))


def version(version: Any) -> wire.Version:
    return version.major, version.minor


def u64_list(values: list[int]) -> bytes:
    return Writer().list(values, Writer.u64).getvalue()


def u32_list(values: list[int]) -> bytes:
    return Writer().list(values, Writer.u32).getvalue()
