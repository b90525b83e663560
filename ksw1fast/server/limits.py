"""What an operator caps per worker: connections in all and per client address, and
the rate of Opens and DNS queries per connection. Pure bookkeeping, no I/O."""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional


class ConnectionLimits:
    """Connections of one worker, counted in all and per (real) client address."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self._per_address: Counter[str] = Counter()

    def admit(self, address: str) -> Optional[str]:
        """Count one more connection of `address`; the limit it would break (then it is
        not counted), or None."""
        if self.total >= self.max_connections:
            return "connections"
        if self._per_address[address] >= self.max_per_address:
            return "connections_per_ip"
        self.total += 1
        self._per_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        self._per_address[address] -= 1
        if not self._per_address[address]:
            del self._per_address[address]  # the table holds live addresses only


class Rate:
    """A token bucket: `per_second` events a second on average, bursts of `burst` (as
    many as a second's by default); a rate of 0 lets everything through."""

    __slots__ = ("per_second", "burst", "_tokens", "_last")

    def __init__(self, per_second: float, burst: Optional[float] = None) -> None:
        self.per_second = per_second
        self.burst = per_second if burst is None else burst
        self._tokens = self.burst
        self._last = time.monotonic()

    def allow(self) -> bool:
        if not self.per_second:
            return True
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
