"""Every error ksw1fast raises to a user or an embedder shares one base, KSW1Error."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import ksw1fast
from ksw1fast.protocol.errors import KSW1Error

# control flow inside a module, never raised out of it
INTERNAL = {"ksw1fast.pkcs11.handles.Refusal", "ksw1fast.cli.config_file._BadItem"}
OPTIONAL = ("ksw1fast.pkcs11.",)  # need the pkcs11 extra (PyKCS11)


def _modules():
    for info in pkgutil.walk_packages(ksw1fast.__path__, "ksw1fast."):
        if info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:
            if not info.name.startswith(OPTIONAL):
                raise


def test_every_error_class_of_the_package_is_a_ksw1error() -> None:
    found = {}
    for module in _modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == module.__name__ and issubclass(cls, BaseException)):
                found[f"{cls.__module__}.{name}"] = cls
    assert "ksw1fast.pkcs11.wire.WireError" in found
    strays = sorted(name for name, cls in found.items()
                    if name not in INTERNAL and not issubclass(cls, KSW1Error))
    assert strays == []
