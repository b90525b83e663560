"""Error mapping of resolve/connect failures (pure functions: no traffic leaves the machine)."""
from __future__ import annotations

import asyncio
import errno

import pytest

from ksw1fast.constants import DnsErrCode, OpenErrCode
from ksw1fast.resolve import ResolveError, lookup, open_error


@pytest.mark.parametrize("exc,code", [
    (ResolveError(DnsErrCode.NX_DOMAIN, "x"), OpenErrCode.RESOLVE_FAIL),
    (asyncio.TimeoutError(), OpenErrCode.TIMEOUT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), OpenErrCode.CONN_REFUSED),
    (OSError(errno.EHOSTUNREACH, "No route to host"), OpenErrCode.UNREACHABLE),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), OpenErrCode.UNREACHABLE),
    (OSError(errno.EACCES, "Permission denied"), OpenErrCode.INTERNAL),
])
def test_open_error_codes(exc, code) -> None:
    assert open_error(exc)[0] == code


async def test_lookup_literals_and_errors() -> None:
    assert [e.sockaddr[0] for e in await lookup("127.0.0.1", 80)] == ["127.0.0.1"]
    with pytest.raises(ResolveError) as info:
        await lookup("no-such-host.invalid", 80)
    assert info.value.dns_code == DnsErrCode.NX_DOMAIN
    with pytest.raises(ResolveError) as info:
        await lookup("127.0.0.1", 80, family=6)  # an IPv4 literal has no IPv6 address
    assert info.value.dns_code in (DnsErrCode.NX_DOMAIN, DnsErrCode.SERVER_FAILURE)
