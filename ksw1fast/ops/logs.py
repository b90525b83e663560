"""Log set-up for `serve`: text or one JSON object per line."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from ksw1fast.server.limits import Rate

AUDIT_LOGGER = "ksw1fast.audit"
_JSON_TYPES = (str, int, float, bool)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "pid", "message"}: the message never holds payload bytes,
    tokens or PINs (the code that logs makes sure of that).  An audit event
    (ksw1fast.ops.audit) adds its fields beside these, its message "EVENT OUTCOME"."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "audit", None)
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                              time.gmtime(second))
        entry = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": (record.getMessage() if fields is None
                        else f"{fields['event']} {fields['outcome']}"),
        }
        if fields is not None:
            entry.update({key: value if type(value) in _JSON_TYPES else str(value)
                          for key, value in fields.items()})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s`, its time made
    with strftime once a second rather than once a line."""

    _second = -1
    _stamp = ""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(
                "%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str, audit_log: Optional[str] = None) -> None:
    """The log on stderr at `level` in `fmt` ("text" or "json"); the audit trail
    (ksw1fast.ops.audit) with it, or appended to the file `audit_log` at info level
    whatever `level` is (OSError when it cannot be opened)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # picows logs every accept on its own; our connection lines say the same with more
    logging.getLogger("picows").setLevel(max(root.level, logging.WARNING))
    audit = logging.getLogger(AUDIT_LOGGER)
    for old in audit.handlers:
        old.close()
    audit.handlers[:] = []
    audit.propagate = True
    audit.setLevel(logging.NOTSET)
    if audit_log:
        appender = AppendFile(audit_log)
        appender.setFormatter(_formatter(fmt))
        audit.handlers[:] = [appender]
        audit.propagate = False
        audit.setLevel(logging.INFO)


class AppendFile(logging.Handler):
    """Each record as one line written by one O_APPEND write: lines from several
    processes (workers) appending to the same file land whole, one after another, and
    a file rotated by copytruncate is written at its new end."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._fd: Optional[int] = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o640)

    def reopen(self) -> None:
        """Write to the file at `path` from now on (on SIGHUP: logrotate moved the old
        one away); OSError, and the old file kept, when it cannot be opened."""
        fd = self._open()
        self.acquire()
        try:
            old, self._fd = self._fd, fd
        finally:
            self.release()
        if old is not None:
            os.close(old)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\n", "\\n") + "\n"
            if self._fd is not None:
                os.write(self._fd, line.encode("utf-8", "backslashreplace"))
        except Exception:  # as logging's own handlers: never into the caller
            self.handleError(record)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        super().close()


def reopen_audit_log() -> None:
    """Reopen the audit trail's file, if it has one (`--audit-log`); a failure is logged
    and the old file kept."""
    for handler in logging.getLogger(AUDIT_LOGGER).handlers:
        if isinstance(handler, AppendFile):
            try:
                handler.reopen()
            except OSError as exc:
                logging.getLogger("ksw1fast").warning(
                    "cannot reopen the audit log %s: %s; still writing the old one",
                    handler.path, exc.strerror or exc)


class Throttled:
    """Log lines a client can cause at will (a refused Open, a refused handshake): at most
    `rate` a second with bursts of `burst`, so a flood of refusals cannot flood the log
    or block the event loop on a slow log pipe. The first line let through after some
    were dropped says how many."""

    def __init__(self, logger: logging.Logger, rate: float = 50.0, burst: float = 200.0) -> None:
        self._logger = logger
        self._rate = Rate(rate, burst)
        self._dropped = 0

    def admit(self) -> Optional[int]:
        """May one more line go out? None if not (it is counted as dropped), else how
        many were dropped since the last one that went out."""
        if not self._rate.allow():
            self._dropped += 1
            return None
        dropped, self._dropped = self._dropped, 0
        return dropped

    def info(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        dropped = self.admit()
        if dropped is None:
            return
        if dropped:
            message += " (%d similar lines dropped)"
            args += (dropped,)
        self._logger.info(message, *args)
