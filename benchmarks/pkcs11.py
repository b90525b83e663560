"""PKCS#11 through the gateway vs direct PyKCS11, in the same run, on a SoftHSM2 token.

    python -m benchmarks.pkcs11 [--seconds S] [--out FILE]

Operations: GenerateRandom(32) and ECDSA P-256 Sign of 32 bytes.  Direct: N processes,
each with its own PyKCS11 session, calling as fast as they can.  Gateway: N WebSocket
connections to one `ksw1fast serve --pkcs11-lib` process (so N agent processes), each
keeping DEPTH calls in flight (the RPC allows pipelining).  Reports ops/s and the
gateway / direct ratio; the goal is >= 0.8 for sign.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil
import uvloop

from benchmarks.gateway_proc import REPO_ROOT, GatewayProcess
from ksw1fast import client as kclient
from ksw1fast.constants import Pkcs11Status
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer

PIN = "1234"
DEPTH = 16
CONNECTIONS = (1, 8)
P256 = bytes.fromhex("06082a8648ce3d030107")
CKM_EC_KEY_PAIR_GEN, CKM_ECDSA = 0x1040, 0x1041
CKA_TOKEN, CKA_SIGN, CKA_VERIFY, CKA_EC_PARAMS = 0x1, 0x108, 0x10A, 0x180
DATA = bytes(range(32))


def make_token() -> str:
    """Install SoftHSM2 if needed, point SOFTHSM2_CONF at a fresh token store; the module."""
    module = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "softhsm.sh")], check=True,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="ksw1fast-bench-hsm-"))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench",
                    "--pin", PIN, "--so-pin", "5678"], check=True, capture_output=True)
    return module


# -- direct ------------------------------------------------------------------------------

def _direct_worker(module: str, op: str, seconds: float, results: Any, setup: Any,
                   start: Any) -> None:
    import PyKCS11

    with setup:  # SoftHSM's file store is not safe for processes initialising at once
        session, private = _direct_session(PyKCS11, module)
    mechanism = PyKCS11.Mechanism(PyKCS11.CKM_ECDSA)
    call = ((lambda: session.sign(private, DATA, mechanism)) if op == "sign"
            else (lambda: session.generateRandom(32)))
    start.wait()
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        call()
        count += 1
    results.put(count)


def _direct_session(PyKCS11: Any, module: str) -> tuple[Any, Any]:
    lib = PyKCS11.PyKCS11Lib()
    lib.load(module)
    session = lib.openSession(lib.getSlotList(tokenPresent=True)[0],
                              PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(PIN)
    _, private = session.generateKeyPair(
        [(PyKCS11.CKA_EC_PARAMS, P256), (PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_VERIFY, True)],
        [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SIGN, True)],
        mecha=PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN))
    return session, private


def direct_ops(module: str, op: str, processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    results, setup, start = context.Queue(), context.Lock(), context.Barrier(processes)
    workers = [context.Process(target=_direct_worker,
                               args=(module, op, seconds, results, setup, start))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=seconds + 60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    return total / seconds


# -- through the gateway -------------------------------------------------------------------

async def _ok(client: kclient.KSW1Client, fn: str, args: Writer) -> Reader:
    response = await client.pkcs11(F[fn], args.getvalue())
    assert response.status == Pkcs11Status.OK, (fn, response)
    return Reader(response.body)


async def _prepare(address: str) -> tuple[kclient.KSW1Client, bytes, bytes]:
    """A connection with a logged-in session and a P-256 key: the args of both ops."""
    client = await kclient.connect(address)
    slot = (await _ok(client, "GetSlotList", Writer().bool(True))).list(Reader.u64)[0]
    session = (await _ok(client, "OpenSession", Writer().u32(slot).u32(0x3))).u32()
    await _ok(client, "Login", Writer().u32(session).u32(1).bytes(PIN.encode()))
    pair = await _ok(client, "GenerateKeyPair", Writer().u32(session)
                     .mechanism(Mechanism(CKM_EC_KEY_PAIR_GEN))
                     .attributes([Attribute(CKA_EC_PARAMS, Tag.BYTE_STRING, P256),
                                  Attribute(CKA_TOKEN, Tag.BOOLEAN, False),
                                  Attribute(CKA_VERIFY, Tag.BOOLEAN, True)])
                     .attributes([Attribute(CKA_TOKEN, Tag.BOOLEAN, False),
                                  Attribute(CKA_SIGN, Tag.BOOLEAN, True)]))
    pair.u32()
    private = pair.u32()
    sign = Writer().u32(session).mechanism(Mechanism(CKM_ECDSA)).u32(private).bytes(DATA)
    random = Writer().u32(session).u32(32)
    return client, sign.getvalue(), random.getvalue()


async def gateway_ops(address: str, op: str, connections: int, seconds: float) -> float:
    prepared = [await _prepare(address) for _ in range(connections)]
    deadline = time.monotonic() + seconds
    counts = [0] * connections

    async def lane(index: int, client: kclient.KSW1Client, args: bytes) -> None:
        fn = F["Sign" if op == "sign" else "GenerateRandom"]
        while time.monotonic() < deadline:
            response = await client.pkcs11(fn, args)
            assert response.status == Pkcs11Status.OK, response
            counts[index] += 1

    await asyncio.gather(*(lane(i, client, sign if op == "sign" else random)
                           for i, (client, sign, random) in enumerate(prepared)
                           for _ in range(DEPTH)))
    for client, _, _ in prepared:
        await client.close()
    return sum(counts) / seconds


def _wait_for_no_agents(gateway: GatewayProcess, timeout: float = 30.0) -> None:
    """SoftHSM processes starting while others finalise can see the token half-written
    (CKR_TOKEN_NOT_RECOGNIZED): let the gateway's agents end before the next phase."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            agents = [p for p in psutil.Process(gateway.proc.pid).children()
                      if "ksw1fast.pkcs11.agent" in " ".join(p.cmdline())]
        except psutil.Error:
            agents = []
        if not agents:
            return
        time.sleep(0.1)


def run(seconds: float) -> dict[str, Any]:
    module = make_token()
    # no pool: agents start with the connections, outside the timed part
    gateway = GatewayProcess("compiled", "--pkcs11-lib", module, "--pkcs11-pool-size", "0")
    results = []
    try:
        for op in ("random", "sign"):
            for n in CONNECTIONS:
                direct = direct_ops(module, op, n, seconds)
                through = uvloop.run(gateway_ops(gateway.address, op, n, seconds))
                _wait_for_no_agents(gateway)
                results.append({"op": op, "connections": n, "direct_ops_per_s": round(direct),
                                "gateway_ops_per_s": round(through),
                                "ratio": round(through / direct, 3)})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        gateway.stop()
    return {"machine": {"cpu_count": os.cpu_count()}, "depth": DEPTH, "seconds": seconds,
            "results": results}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pkcs11", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    document = json.dumps(run(args.seconds), indent=2)
    print(document)
    if args.out:
        Path(args.out).write_text(document + "\n")


if __name__ == "__main__":
    main()
