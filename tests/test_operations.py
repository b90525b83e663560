"""Workers and their supervisor, graceful drain, metrics and health, JSON logs."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import websockets

import ksw1fast
from ksw1fast import client as kclient
from ksw1fast.ops import metrics
from ksw1fast.ops.backoff import Backoff
from ksw1fast.ops.health import OpsServer

from helpers import GatewayProcess, RawClient, free_port, http_get, port_of, serve_tcp

pytestmark = pytest.mark.timeout(120)


def _workers(proc: GatewayProcess) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children()


def _worker_of(worker_pids: list[int], gateway_port: int, client_port: int) -> int:
    """Which worker holds the connection from our client_port."""
    for pid in worker_pids:
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr and c.laddr.port == gateway_port and c.raddr and c.raddr.port == client_port:
                return pid
    raise LookupError(client_port)


async def _echo_once(client: kclient.KSW1Client, port: int, payload: bytes) -> bytes:
    stream = await client.open_connection("127.0.0.1", port)
    stream.write(payload)
    data = await asyncio.wait_for(stream.readexactly(len(payload)), 10)
    await stream.close()
    return data


async def test_a_killed_worker_is_replaced_and_others_never_notice(echo_port,
                                                                   spawn_gateway) -> None:
    metrics_port = free_port()
    proc = await spawn_gateway("--workers", "2", "--metrics-port", str(metrics_port))
    gateway_port = int(proc.address.rsplit(":", 1)[1].split("/")[0])
    for _ in range(300):  # both workers listening (a busy 2-core machine starts them slowly)
        if "".join(proc.log).count("ksw1fast serving") >= 2:
            break
        await asyncio.sleep(0.1)
    assert "".join(proc.log).count("ksw1fast serving") >= 2, "workers did not start"
    pids = [w.pid for w in _workers(proc)]
    clients = [await kclient.connect(proc.address) for _ in range(20)]
    owner = {}
    for c in clients:
        local_port = c.ws.underlying_transport.get_extra_info("sockname")[1]
        owner[c] = await asyncio.to_thread(_worker_of, pids, gateway_port, local_port)
    assert set(owner.values()) == set(pids), "connections did not spread over both workers"
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    survivors = [c for c in clients if owner[c] != victim]
    for round_ in range(5):
        for c in survivors:
            assert await _echo_once(c, echo_port, b"round %d" % round_) == b"round %d" % round_
    fresh = await kclient.connect(proc.address)
    assert await _echo_once(fresh, echo_port, b"new") == b"new"
    for _ in range(300):  # the supervisor starts a replacement within seconds
        if len(_workers(proc)) == 2 and victim not in [w.pid for w in _workers(proc)]:
            break
        await asyncio.sleep(0.1)
    assert len(_workers(proc)) == 2 and victim not in [w.pid for w in _workers(proc)], \
        "no replacement worker"
    status, text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    total = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("ksw1fast_connections_total"))
    assert total >= 21, text  # aggregated over the workers, the dead one included
    assert "ksw1fast_streams_total" in text and "ksw1fast_open_seconds_bucket" in text
    for _ in range(100):  # the dead worker's build info goes with the supervisor's next reap
        status, body = await asyncio.to_thread(http_get,
                                               f"http://127.0.0.1:{metrics_port}/healthz")
        listed = {w["pid"] for w in json.loads(body)["workers"]}
        if status == 200 and listed == {w.pid for w in _workers(proc)}:
            break
        await asyncio.sleep(0.1)
    assert status == 200 and victim not in listed and len(listed) == 2, body
    assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}/readyz"))[0] == 200
    for c in [*survivors, fresh]:
        await c.close()


def test_restart_backoff_doubles_while_a_child_dies_young_resets_after_a_long_life() -> None:
    backoff = Backoff()
    quick = [backoff.after_death(1.0) for _ in range(8)]
    assert quick == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.after_death(31.0) == 0.5
    assert backoff.after_death(1.0) == 1.0


async def test_sigterm_drains_a_transfer_and_refuses_new_connections(spawn_gateway) -> None:
    total = 8 * 1024 * 1024

    async def slow_source(reader, writer):
        block = bytes(256 * 1024)
        for _ in range(total // len(block)):  # about 1.6 s in all
            writer.write(block)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    metrics_port = free_port()
    proc = await spawn_gateway("--drain-timeout", "20", "--metrics-port", str(metrics_port))
    async with await serve_tcp(slow_source) as source:
        client = await kclient.connect(proc.address)
        stream = await client.open_connection("127.0.0.1", port_of(source))
        first = await stream.read()
        proc.proc.send_signal(signal.SIGTERM)
        for _ in range(50):  # readiness goes false first
            if (await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}/readyz"))[0] == 503:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("/readyz never turned 503 while draining")
        with pytest.raises(OSError):
            await kclient.connect(proc.address, timeout=3)
        rest = await asyncio.wait_for(stream.read_until_eof(), 30)
        assert len(first) + len(rest) == total
        await client.close()
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0


async def test_drain_timeout_closes_the_rest_with_1001() -> None:


    proc = await asyncio.to_thread(GatewayProcess, "--drain-timeout", "0.5")
    async with RawClient(proc.address) as raw:
        await raw.hello()
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert await raw.close_code(timeout=15) == 1001
        assert time.monotonic() - started < 15
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0


async def test_healthz_and_build_info_say_the_version_and_codec(gw) -> None:
    ops = await OpsServer(lambda: gw.ready).start("127.0.0.1", 0)
    try:
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{ops.port}/healthz")
    finally:
        await ops.close()
    assert status == 200
    assert json.loads(body) == {"status": "ok", "version": ksw1fast.__version__,
                                "codec": "compiled"}
    text = metrics.render()[0].decode()
    assert f'ksw1fast_build_info{{codec="compiled",version="{ksw1fast.__version__}"}} 1.0' in text


async def test_json_logs(echo_port, spawn_gateway) -> None:
    proc = await spawn_gateway("--log-format", "json")
    client = await kclient.connect(proc.address)
    await _echo_once(client, echo_port, b"x")
    await client.close()
    log = await asyncio.to_thread(proc.stop)
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("connection open peer=") for m in messages)
    assert all({"ts", "level", "logger", "pid", "message"} <= e.keys() for e in entries)


def test_throttled_log_lines_are_bounded_and_say_what_was_dropped(caplog, monkeypatch) -> None:
    import logging

    from ksw1fast.ops import logs

    now = [1000.0]
    from ksw1fast.server import limits

    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    throttled = logs.Throttled(logging.getLogger("ksw1fast.test"), rate=10, burst=5)
    with caplog.at_level(logging.INFO, "ksw1fast.test"):
        for i in range(100):  # a flood within one instant: the burst only
            throttled.info("refused %d", i)
        now[0] += 1.0         # a second later: 10 more lines' worth
        for i in range(100, 120):
            throttled.info("refused %d", i)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"refused {i}" for i in range(5)]
    assert lines[5] == "refused 100 (95 similar lines dropped)"
    assert len(lines) == 10  # the burst refilled, no more


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("listener", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_and_stops_even_a_supervisor(listener: str,
                                                                workers: str) -> None:
    """Before, a traceback; with workers, restarts with back-off for ever (the run would
    outlast the timeout)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", listener: str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "ksw1fast", "serve", "--workers", workers,
             *(arg for flag_value in ports.items() for arg in flag_value)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    error = f"ksw1fast: cannot listen on 127.0.0.1:{port}: address already in use"
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == error, result.stderr
    assert result.stderr.count("cannot listen") == 1  # said once, for all the workers
    assert "Traceback" not in result.stderr and "restarting" not in result.stderr


def test_a_worker_that_never_serves_stops_the_supervisor_with_its_exit(tmp_path) -> None:
    """A worker that dies starting without a word on its status pipe (here ended at once
    by a sitecustomize.py that acts in workers only) still stops the supervisor."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif '--worker-process' in sys.argv:\n    os._exit(3)\n")
    result = subprocess.run(
        [sys.executable, "-m", "ksw1fast", "serve", "--port", "0", "--workers", "2"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] in (
        f"ksw1fast: worker {i} exited with 3 before it was serving" for i in (0, 1))


async def test_a_wrong_path_is_logged_once_without_its_query(spawn_gateway) -> None:
    proc = await spawn_gateway()
    wrong = proc.address.rsplit("/", 1)[0] + "/elsewhere?token=not-for-the-log"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with RawClient(wrong):
            pass
    assert info.value.response.status_code == 404
    log = await asyncio.to_thread(proc.stop)
    assert len(re.findall(r"handshake refused peer=127\.0\.0\.1:\d+ status=404 "
                          r"reason=unknown path '/elsewhere'", log)) == 1, log
    assert "not-for-the-log" not in log
