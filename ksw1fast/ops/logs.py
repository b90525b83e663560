"""Log set-up for `serve`: text or one JSON object per line."""
from __future__ import annotations

import json
import logging
import time

from ksw1fast.server.limits import Rate


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "pid", "message"}: the message never holds payload bytes,
    tokens or PINs (the code that logs makes sure of that)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # picows logs every accept on its own; our connection lines say the same with more
    logging.getLogger("picows").setLevel(max(root.level, logging.WARNING))


class Throttled:
    """Log lines a client can cause at will (a refused Open, a refused handshake): at most
    `rate` a second with bursts of `burst`, so a flood of refusals cannot flood the log
    or block the event loop on a slow log pipe. The first line let through after some
    were dropped says how many."""

    def __init__(self, logger: logging.Logger, rate: float = 50.0, burst: float = 200.0) -> None:
        self._logger = logger
        self._rate = Rate(rate, burst)
        self._dropped = 0

    def info(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._rate.allow():
            self._dropped += 1
            return
        if self._dropped:
            message += " (%d similar lines dropped)"
            args += (self._dropped,)
            self._dropped = 0
        self._logger.info(message, *args)
