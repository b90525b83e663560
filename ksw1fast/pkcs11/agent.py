"""A PKCS#11 agent process: loads the module and runs calls, outside the relay's event loop.

Started by the gateway as `python -m ksw1fast.pkcs11.agent --lib PATH ...`; speaks the
framing of `ipc.py` on stdin/stdout, answering each burst of pipelined requests with one
write.  PyKCS11 holds the GIL for the whole of each C call,
so a slow call (RSA-4096 generation) would freeze every stream of a relay process: here
it freezes only this agent.  Calls run one at a time in arrival order; a blocking
WaitForSlotEvent runs on its own thread so it cannot hold up the rest.  The PIN comes
from an environment variable named on the command line, never from argv itself.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import threading
from typing import BinaryIO, Optional, Sequence

from ksw1fast.pkcs11 import ipc


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

    def queue(self, op: int, client: int, query: int, body: bytes = b"") -> None:
        with self._lock:
            self._batch.append(ipc.pack(op, client, query, body))

    def flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
            if batch:
                self._out.write(b"".join(batch))
                self._out.flush()

    def send(self, op: int, client: int, query: int, body: bytes = b"") -> None:
        self.queue(op, client, query, body)
        self.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    # stdout carries frames only: whatever the module prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    replies = _Replies(out)
    pin = os.environ.get(args.pin_env, "").encode() if args.pin_env else None
    try:
        from ksw1fast.pkcs11.dispatch import Dispatcher

        dispatcher = Dispatcher(args.lib, max_out=args.max_out, pin=pin or None,
                                allow_admin=args.allow_admin, allow=args.allow, deny=args.deny,
                                shared=args.shared)
    except Exception as exc:  # a missing library, a module that will not initialise...
        replies.send(ipc.OP_FAILED, 0, 0, f"cannot load PKCS#11 module: {exc}".encode())
        return 1
    replies.send(ipc.OP_READY, 0, 0)

    def run(message: ipc.Message) -> None:
        (fn_id,) = struct.unpack_from("<H", message.body)
        status, body = dispatcher.call(message.client, fn_id, message.body[2:])
        replies.queue(ipc.OP_RESULT, message.client, message.query, bytes([status]) + body)

    def run_alone(message: ipc.Message) -> None:
        run(message)
        replies.flush()

    unpacker = ipc.Unpacker()
    stdin = sys.stdin.fileno()
    while data := os.read(stdin, 1 << 16):
        for message in unpacker.feed(data):
            if message.op == ipc.OP_OPEN:
                replies.queue(ipc.OP_OPENED, dispatcher.open_client(), message.query)
            elif message.op == ipc.OP_CALL:
                (fn_id,) = struct.unpack_from("<H", message.body)
                if dispatcher.is_blocking(fn_id, message.body[2:]):
                    threading.Thread(target=run_alone, args=(message,), daemon=True).start()
                else:
                    run(message)
            elif message.op == ipc.OP_CLOSE:
                dispatcher.close_client(message.client)
        replies.flush()
    dispatcher.close()  # the gateway closed our stdin: its worker is going away
    return 0


if __name__ == "__main__":
    sys.exit(main())
