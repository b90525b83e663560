"""The audit trail (docs/operations.md, "Audit trail"): one line per security-relevant
event on the logger "ksw1fast.audit", so operators can route it: with the log by
default, or appended to its own file (`--audit-log FILE`, ksw1fast.ops.logs).

An event is a name and an outcome, then named fields:

    handshake accepted|refused   the upgrade request (peer, token kind, subject...)
    open      allowed|refused|failed   an Open (dest, proto, address, rule...)
    dns       allowed|refused|failed   a DnsQuery (name, rule...)
    pkcs11    ok|error|refused   Login, Sign, Decrypt, Unwrap... (fn, mechanism, key...)
    limit     reached            a limit refused something (ksw1fast_limit_refusals)

With `--log-format json` the fields sit beside "ts", "level", "logger", "pid" and
"message" ("EVENT OUTCOME"); in text the message is "EVENT OUTCOME key=value ...", a
value quoted (JSON string escapes) unless it is plain.  Callers pass named values
only, never a token, a PIN or payload bytes.

The trail has two levels (`--audit`): "security", the default, is everything but what
is allowed per request; "all" (`routine_enabled`) adds every allowed Open, DNS answer
and PKCS#11 key use, a line per request, which costs about a quarter of an Open's CPU.

`refusal` is for what a client can cause at will (a refused handshake, Open or DNS
query, a limit): those go through the same per-process limiter as the log's refusal
lines (ksw1fast.ops.logs.Throttled, 50 a second in bursts of 200), and the first line
let through after some were dropped says how many (`dropped`).  `record` is for the
rest (an accepted handshake, an allowed Open, a PKCS#11 call), which limits and
authentication bound already: never dropped.
"""
from __future__ import annotations

import logging
import re
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any, Optional

from ksw1fast.ops.logs import AUDIT_LOGGER, Throttled

log = logging.getLogger(AUDIT_LOGGER)
_INFO = logging.INFO
# --audit all: also what is allowed (Opens, DNS answers, PKCS#11 key use), a line per
# request; off by default, since it costs about a quarter of an Open's CPU
_everything = False
_refusals = Throttled(log)
MAX_IDENTITY = 256  # characters of a subject or token id in a line
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@\[\]*,+%#-]+")


def configure(level: str) -> None:
    """The trail's level (ksw1fast.config.AUDIT_LEVELS): "security" or "all"."""
    global _everything
    _everything = level == "all"


def enabled() -> bool:
    """Whether events are written (cheap: the logging module caches it)."""
    return log.isEnabledFor(_INFO)


def routine_enabled() -> bool:
    """Whether what is allowed is written too (`--audit all`)."""
    return _everything and log.isEnabledFor(_INFO)


def record(event: str, outcome: str, **fields: Any) -> None:
    """One event, never dropped; fields that are None are left out."""
    if log.isEnabledFor(_INFO):
        _emit(event, outcome, fields)


def refusal(event: str, outcome: str, **fields: Any) -> None:
    """One event a client can cause at will: bounded (see the module docstring)."""
    if not log.isEnabledFor(_INFO):
        return
    dropped = _refusals.admit()
    if dropped is None:
        return
    if dropped:
        fields["dropped"] = dropped
    _emit(event, outcome, fields)


def identity(grant: Any) -> dict[str, Any]:
    """Who a grant (ksw1fast.security.tokens.Grant) was issued to, never the token:
    its kind (static, signed, jwt; none with auth off) and a JWT's sub and jti."""
    if grant is None:
        return {}
    subject, token_id = getattr(grant, "subject", None), getattr(grant, "token_id", None)
    # a token's issuer chose them, a certificate's subject may be long: bounded per line
    return {"token": grant.kind,
            "subject": subject[:MAX_IDENTITY] if isinstance(subject, str) else subject,
            "token_id": token_id[:MAX_IDENTITY] if isinstance(token_id, str) else token_id}


def host_port(host: str, port: Optional[int]) -> str:
    """`host:port`, an IPv6 address in brackets."""
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


class _Line:
    """The text form of an event, made only if a handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = []
        plain = _PLAIN.fullmatch
        for key, value in self.fields.items():  # (inline: one line per Open)
            kind = type(value)
            if kind is bool:
                text = "true" if value else "false"
            elif kind is int or kind is float:
                text = str(value)
            else:
                text = value if kind is str else str(value)
                # quoted with JSON's escapes: no newline or control character from a
                # client-chosen name can start a line of its own or fake a field
                if not plain(text):
                    text = _quoted(text)
            parts.append(f"{key}={text}")
        parts[:2] = [f"{self.fields['event']} {self.fields['outcome']}"]
        return " ".join(parts)


def _emit(event: str, outcome: str, fields: dict[str, Any]) -> None:
    entry: dict[str, Any] = {"event": event, "outcome": outcome}
    # values as given (a Peer, say): the formatter makes text of them (logs.JsonFormatter)
    entry.update({key: value for key, value in fields.items()
                  if value is not None and value != ""})
    # the record made here, not by log.info: that would walk the stack for a caller
    # no audit line shows (an Open's cost counts)
    record = log.makeRecord(log.name, _INFO, "", 0, "%s", (_Line(entry),), None,
                            extra={"audit": entry})
    log.handle(record)
