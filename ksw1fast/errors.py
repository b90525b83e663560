"""Errors of settings and of starting to serve, and the checks of settings values.
Every ksw1fast error derives from KSW1Error (ksw1fast.protocol.errors)."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Tuple

from ksw1fast.protocol.errors import KSW1Error


class SettingError(KSW1Error, ValueError):
    """One setting has a value it cannot take.  `setting` names it as the config file does
    (`port`, `pkcs11.pool_size`) and `reason` says what is wrong without naming it, so the
    command line can name the flag, environment variable or file line it came from."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting} {reason}")
        self.setting = setting
        self.reason = reason


# a check of one setting: (whether a value passes, what the value must be)
SettingCheck = Tuple[Callable[[Any], bool], str]
POSITIVE: SettingCheck = (lambda v: v > 0, "must be > 0")
NOT_NEGATIVE: SettingCheck = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_1: SettingCheck = (lambda v: v >= 1, "must be >= 1")


def check_settings(settings: object, checks: Mapping[str, SettingCheck],
                   prefix: str = "") -> None:
    """SettingError for the first attribute of `settings` that fails its check (None, an
    unset optional setting, passes)."""
    for name, (passes, must) in checks.items():
        value = getattr(settings, name)
        if value is not None and not passes(value):
            raise SettingError(prefix + name, f"{must}, got {value!r}")


class MissingExtra(KSW1Error):
    """A setting needs an optional package that is not installed; the message is one line
    with the pip command that installs it."""


class StartError(KSW1Error):
    """Serving could not start (a port in use, a worker that died starting); the message
    is one line saying why."""


class ListenError(StartError, OSError):
    """A listener could not be created.  An OSError still, for callers that catch those."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {address}: {_strerror(cause)}")


class TlsError(StartError, OSError):
    """The TLS certificate chain or its key cannot be loaded; one line naming the files."""


def _strerror(exc: OSError) -> str:
    """'address already in use', rather than uvloop's '[Errno 98] error while attempting
    to bind on address ('127.0.0.1', 8088): address already in use'."""
    if exc.errno is not None and exc.errno > 0:  # getaddrinfo's errors are negative
        return os.strerror(exc.errno).lower()
    return str(exc.strerror or exc).lower()
