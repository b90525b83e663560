"""A DNS server that never answers, and a gateway that must not care.

Run by tests/test_hostile.py inside a network namespace with only loopback and a
private /etc/resolv.conf naming 127.0.0.53, where this script keeps a UDP socket
that reads queries and never answers. Nothing can leave the namespace. It checks:

- an attacker's Opens of names and DnsQueries hang, yet a control client's Opens of
  127.0.0.1, its echo round trips and its lookup of localhost (/etc/hosts) go on
  quickly all the while;
- hung DnsQueries are answered Timeout after the DNS timeout;
- past --max-lookups a lookup fails at once instead of waiting;
- once c-ares gives the hung queries up, every lookup slot is free again.

Prints one line per failed check and exits 1 if any failed.
"""
from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import sys
import time

import uvloop

import ksw1fast
import ksw1fast.security.resolve
from ksw1fast import client as kclient
from ksw1fast.protocol.errors import DnsError, OpenError

SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
DNS_TIMEOUT = 1.0
MAX_LOOKUPS = 64
HUNG = 16  # names the attacker asks for, by Open and by DnsQuery each
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        print("FAILED:", what, flush=True)


def loopback_up() -> None:
    with socket.socket() as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


async def control(address: str, echo_port: int, attack: asyncio.Future) -> None:
    """Opens of a literal, round trips and a hosts-file lookup while the attack runs."""
    client = await kclient.connect(address)
    rounds = 0
    while not attack.done() and rounds < 200:
        started = time.monotonic()
        stream = await asyncio.wait_for(client.open_connection("127.0.0.1", echo_port), 5)
        stream.write(b"ping")
        assert await asyncio.wait_for(stream.readexactly(4), 5) == b"ping"
        await stream.close()
        addresses = await asyncio.wait_for(client.resolve("localhost", 4), 5)
        took = time.monotonic() - started
        check(took < 3.0, f"control round {rounds} took {took:.2f}s")  # hung: 5 s and more
        check(addresses == ["127.0.0.1"], f"localhost resolved to {addresses}")
        rounds += 1
        await asyncio.sleep(0.05)
    check(rounds >= 5, f"only {rounds} control rounds ran during the attack")
    await client.close()


async def attack(address: str) -> None:
    client = await kclient.connect(address)
    opens = [asyncio.ensure_future(client.open_connection(f"hang-{i}.example", 80))
             for i in range(HUNG)]
    queries = [asyncio.ensure_future(client.resolve(f"hang-q{i}.example")) for i in range(HUNG)]
    started = time.monotonic()
    results = await asyncio.gather(*queries, return_exceptions=True)
    check(all(isinstance(r, DnsError) and r.code == 6 for r in results),
          f"hung DnsQuery answers: {results!r}")  # DnsErr Timeout
    check(time.monotonic() - started < DNS_TIMEOUT * 5, "hung DnsQueries answered late")
    results = await asyncio.gather(*opens, return_exceptions=True)
    check(all(isinstance(r, OpenError) and r.code in (2, 4) for r in results),
          f"hung Opens: {results!r}")  # ResolveFail (c-ares gave up) or Timeout
    await client.close()


async def over_the_cap(resolver: ksw1fast.security.resolve.Resolver) -> None:
    """MAX_LOOKUPS hung lookups take every slot: one more fails at once."""
    hung = [asyncio.ensure_future(resolver.lookup(f"cap-{i}.example"))
            for i in range(MAX_LOOKUPS)]
    # each takes its slot on its first step; c-ares gives them up after DNS_TIMEOUT, so
    # ask the one more as soon as the slots are taken, not after a guessed pause
    deadline = time.monotonic() + DNS_TIMEOUT / 2
    while resolver.in_flight < MAX_LOOKUPS and time.monotonic() < deadline:
        await asyncio.sleep(0)
    check(resolver.in_flight == MAX_LOOKUPS, f"{resolver.in_flight} lookups took a slot")
    started = time.monotonic()
    try:
        await resolver.lookup("one-more.example")
    except ksw1fast.security.resolve.ResolveError as exc:
        check("lookups in flight" in str(exc), f"over the cap: {exc}")
    else:
        check(False, "a lookup over the cap succeeded")
    check(time.monotonic() - started < 0.5, "a lookup over the cap waited")
    for task in hung:
        task.cancel()


async def main() -> None:
    loop = asyncio.get_running_loop()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.53", 53))
    loop.add_reader(silent.fileno(), silent.recv, 4096)  # read, never answer
    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = target.sockets[0].getsockname()[1]
    gateway = await ksw1fast.start_gateway(port=0, dns_timeout=DNS_TIMEOUT,
                                           connect_timeout=2 * DNS_TIMEOUT,
                                           max_lookups=MAX_LOOKUPS)
    attacker = asyncio.ensure_future(attack(gateway.address))
    await control(gateway.address, echo_port, attacker)
    await attacker
    await over_the_cap(gateway.resolver)
    deadline = time.monotonic() + 10  # c-ares gives up on its own
    while gateway.resolver.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    check(gateway.resolver.in_flight == 0,
          f"{gateway.resolver.in_flight} lookup slots still taken after the attack")
    await gateway.close()
    target.close()


if __name__ == "__main__":
    loopback_up()
    uvloop.run(main())
    sys.exit(1 if failures else 0)
