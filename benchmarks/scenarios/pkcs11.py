"""PKCS#11 through the gateway vs direct PyKCS11, in the same run, on a SoftHSM2 token.

Operations: GenerateRandom(32) and ECDSA P-256 Sign of 32 bytes.  Direct: N processes,
each with its own PyKCS11 session, calling as fast as they can.  Gateway: N WebSocket
connections to one `ksw1fast serve --pkcs11-lib` process (so N agent processes), each
keeping DEPTH calls in flight (the RPC allows pipelining); the client is
`ksw1fast.client` in this process (the agent, not the client, is the bottleneck).
Reports ops/s and the gateway / direct ratio; the goal is >= 0.8 for sign.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import uvloop

from benchmarks.context import Context, Sizes
from benchmarks.gateway_proc import GatewayProcess
from benchmarks.measure import cpu_figures
from benchmarks.procs import REPO_ROOT, CpuSnapshot, cpu_between
from ksw1fast import client as kclient
from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Attribute, Mechanism, Reader, Tag, Writer

NAME = "pkcs11"
PIN = "1234"
DEPTH = 16
CONNECTIONS = (1, 8)
OPS = ("random", "sign")
P256 = bytes.fromhex("06082a8648ce3d030107")
CKM_EC_KEY_PAIR_GEN, CKM_ECDSA = 0x1040, 0x1041
CKA_TOKEN, CKA_SIGN, CKA_VERIFY, CKA_EC_PARAMS = 0x1, 0x108, 0x10A, 0x180
DATA = bytes(range(32))


def make_token(root: Path) -> str:
    """Install SoftHSM2 if needed, point SOFTHSM2_CONF at a fresh token store in `root`
    (inherited by the gateway and the direct workers); the module's path."""
    module = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "softhsm.sh")], check=True,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
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


async def gateway_ops(address: str, op: str, connections: int, seconds: float,
                      server_cpu: Callable[[], CpuSnapshot]) -> tuple[float, dict[str, Any]]:
    """(ops/s, CPU cores of the gateway with its agents and of this client) over `seconds`."""
    prepared = [await _prepare(address) for _ in range(connections)]
    server_before, client_before = server_cpu(), time.process_time()
    started = time.perf_counter()
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
    wall = time.perf_counter() - started  # the last calls end after the deadline
    cores = cpu_figures({"server": cpu_between(server_before, server_cpu()),
                         "client": time.process_time() - client_before}, wall)
    for client, _, _ in prepared:
        await client.close()
    return sum(counts) / wall, cores


def _wait_for_no_agents(gateway: GatewayProcess, timeout: float = 30.0) -> None:
    """SoftHSM processes starting while others finalise can see the token half-written
    (CKR_TOKEN_NOT_RECOGNIZED): let the gateway's agents end before the next phase."""
    deadline = time.monotonic() + timeout
    while gateway.agents() and time.monotonic() < deadline:
        time.sleep(0.1)


def steps(sizes: Sizes, gateways: int) -> int:
    return len(OPS) * len(CONNECTIONS) * (gateways - 1)  # every gateway but the pure one


def step_seconds(sizes: Sizes) -> float:
    # direct, then through the gateway: processes and agents start, keys are made
    return 2 * sizes.pkcs11_seconds + 4


def run(ctx: Context) -> list[dict[str, Any]]:
    store = Path(tempfile.mkdtemp(prefix="ksw1fast-bench-hsm-"))
    seconds = ctx.sizes.pkcs11_seconds
    rows = []
    try:
        module = make_token(store)
        for impl in ctx.gateway_impls:
            if impl == "pure":  # the agent is the same Python code either way
                continue
            rows += _measure(ctx, impl, module, seconds)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return rows


def _measure(ctx: Context, impl: str, module: str, seconds: float) -> list[dict[str, Any]]:
    """Every op and connection count through one gateway, each next to direct PyKCS11."""
    rows = []
    # no pool: agents start with the connections, outside the timed part
    gateway = ctx.fresh_gateway(impl, "--pkcs11-lib", module, "--pkcs11-pool-size", "0")
    try:
        for op in OPS:
            for n in CONNECTIONS:
                ctx.progress.step(f"PKCS#11 {op} x{n} ({impl})")
                direct = direct_ops(module, op, n, seconds)
                through, cores = uvloop.run(gateway_ops(gateway.address, op, n, seconds,
                                                        gateway.cpu))
                _wait_for_no_agents(gateway)
                rows.append({"impl": impl, "op": op, "connections": n,
                             "direct_ops_per_s": round(direct),
                             "gateway_ops_per_s": round(through),
                             "ratio": round(through / direct, 3),
                             **{f"gateway_{k}": v for k, v in cores.items()}})
    finally:
        gateway.stop()
    return rows
