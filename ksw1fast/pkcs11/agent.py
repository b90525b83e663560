"""A PKCS#11 agent process: loads the module and runs calls, outside the relay's event loop.

Started by the gateway as `python -m ksw1fast.pkcs11.agent --lib PATH ...` would run it,
but on the gateway's own package (ksw1fast/ops/children.py); speaks the framing of `ipc.py`
on stdin/stdout, answering each burst of pipelined requests with one write.  PyKCS11
holds the GIL for the whole of each C call, so a slow call (RSA-4096 generation) would
freeze every stream of a relay process: here it freezes only this agent.  Calls run one
at a time in arrival order; a blocking WaitForSlotEvent runs on its own thread so it
cannot hold up the rest, one per client and MAX_WAITS in all (`_Waits`).  The PIN comes
from an environment variable named on the command line, never from argv itself.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import BinaryIO, Optional, Sequence

from ksw1fast.pkcs11 import ipc, wire
from ksw1fast.pkcs11.scope import NOTHING, Pkcs11Scope

# blocking calls on side threads at once, all clients together: in worker isolation one
# agent serves many connections, and each wait is a thread polling the module 10 times/s
MAX_WAITS = 32
# the answer to a blocking call over a bound: among the codes PKCS#11 lists for
# C_WaitForSlotEvent, so a caller written to the PKCS#11 standard handles it, and unlike
# CKR_NO_EVENT ("nothing yet") it does not invite an immediate retry
CKR_FUNCTION_FAILED = 0x6


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ksw1fast.pkcs11.agent")
    parser.add_argument("--lib", required=True, help="PKCS#11 module to load")
    parser.add_argument("--max-out", type=int, default=1 << 20)
    parser.add_argument("--pin-env", help="environment variable holding the user PIN")
    parser.add_argument("--allow-admin", action="store_true")
    parser.add_argument("--allow", action="append")
    parser.add_argument("--deny", action="append", default=[])
    parser.add_argument("--shared", action="store_true", help="several clients share the login")
    return parser.parse_args(argv)


class _Replies:
    """Answers to the gateway, written in batches: everything a burst of pipelined
    requests produced goes out in one write.  Side threads answer too, hence the lock."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._batch: list[bytes] = []

    def queue(self, frame: bytes) -> None:
        with self._lock:
            self._batch.append(frame)

    def flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
            if batch:
                self._out.write(b"".join(batch))
                self._out.flush()

    def send(self, frame: bytes) -> None:
        self.queue(frame)
        self.flush()


class _Waits:
    """Which clients have a blocking call on a side thread.  One per client: PKCS#11 has
    one event queue, so a second wait of one connection could only race the first for
    the same events; excess calls are refused at once instead of each taking a thread."""

    def __init__(self, limit: int = MAX_WAITS) -> None:
        self._limit = limit
        self._clients: set[int] = set()
        self._lock = threading.Lock()  # side threads leave while the main thread enters

    def enter(self, client: int) -> Optional[str]:
        """Take a side thread for the client's blocking call; None, or why not."""
        with self._lock:
            if client in self._clients:
                return "this connection already has a blocking WaitForSlotEvent running"
            if len(self._clients) >= self._limit:
                return (f"{self._limit} blocking WaitForSlotEvent calls already running "
                        "in this PKCS#11 agent")
            self._clients.add(client)
            return None

    def leave(self, client: int) -> None:
        with self._lock:
            self._clients.discard(client)


def _scope(body: bytes) -> Optional[Pkcs11Scope]:
    """The scope an OPEN carries; one that does not parse allows nothing (the gateway
    sends only scopes it parsed: this would be a bug, and must not widen anything)."""
    if not body:
        return None
    try:
        return Pkcs11Scope.from_wire(body)
    except ValueError as exc:
        print(f"PKCS#11 agent: a client's scope does not parse ({exc}): it may call "
              "nothing", file=sys.stderr)
        return NOTHING


def main(argv: Optional[Sequence[str]] = None) -> int:
    # exec gave SIGHUP its default (end the process): a reload sent to the process
    # group, or a terminal that closes, is the worker's business, not the agent's
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    options = _parse(argv)
    # stdout carries frames only: whatever the module prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    replies = _Replies(out)
    pin = os.environ.get(options.pin_env, "").encode() if options.pin_env else None
    try:
        from ksw1fast.pkcs11.dispatch import Dispatcher

        dispatcher = Dispatcher(options.lib, max_out=options.max_out, pin=pin or None,
                                allow_admin=options.allow_admin, allow=options.allow,
                                deny=options.deny, shared=options.shared)
    except Exception as exc:  # a missing library, a module that will not initialise...
        replies.send(ipc.pack(ipc.OP_FAILED, 0, 0,
                              f"cannot load PKCS#11 module: {exc}".encode()))
        return 1
    replies.send(ipc.pack(ipc.OP_READY, 0, 0))

    def run(client: int, query: int, fn_id: int, args: bytes) -> None:
        replies.queue(ipc.pack_result(client, query, *dispatcher.call(client, fn_id, args)))

    waits = _Waits()

    def run_alone(client: int, query: int, fn_id: int, args: bytes) -> None:
        try:
            run(client, query, fn_id, args)
        finally:
            waits.leave(client)
        replies.flush()

    def run_blocking(client: int, query: int, fn_id: int, args: bytes) -> None:
        refusal = waits.enter(client)
        if refusal is None:
            threading.Thread(target=run_alone, args=(client, query, fn_id, args),
                             daemon=True).start()
        else:
            replies.queue(ipc.pack_result(client, query,
                                          *wire.ck_error(CKR_FUNCTION_FAILED, refusal)))

    unpacker = ipc.Unpacker()
    stdin = sys.stdin.fileno()
    while data := os.read(stdin, 1 << 16):
        for op, client, query, body in unpacker.feed(data):
            if op == ipc.OP_CALL:
                fn_id, args = ipc.split_call(body)
                if dispatcher.is_blocking(fn_id, args):
                    run_blocking(client, query, fn_id, args)
                else:
                    run(client, query, fn_id, args)
            elif op == ipc.OP_OPEN:
                replies.queue(ipc.pack(ipc.OP_OPENED, dispatcher.open_client(_scope(body)),
                                       query))
            elif op == ipc.OP_CLOSE:
                dispatcher.close_client(client)
        replies.flush()
    dispatcher.close()  # the gateway closed our stdin: its worker is going away
    return 0


if __name__ == "__main__":
    sys.exit(main())
