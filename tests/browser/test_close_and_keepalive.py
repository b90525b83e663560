"""How the browser's WebSocket ends (protocol.md §11), as the page's own close event reports it:
after the page's close() without a code, after a gateway shutdown, and after an idle
spell on a gateway that pings. Each against the compiled relay and its pure-Python twin."""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
import trustme

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

ECHOED = {"ok": True, "bytes": 256 * 1024}


def clean_close(code: int, reason: str = "") -> list[dict]:
    """results.events of a page whose one WebSocket closed cleanly, with no error event."""
    return [{"type": "close", "code": code, "reason": reason, "wasClean": True}]


def errors(console: list[str]) -> list[str]:
    # Chromium logs a failed or unclean WebSocket as a console error
    return [line for line in console if line.startswith(("error", "uncaught"))]


async def test_close_without_code_reads_1005_clean(chromium, pages, serve, echo_port) -> None:
    gw = await serve()
    run = await chromium.run(pages.url("/page.html", gateway=gw.address, steps="echo",
                                       echo=echo_port, close="empty"))
    assert run.results["echo"] == ECHOED
    assert run.results["close"] == {"ok": True}
    # the gateway's answer carries no code either (RFC 6455 §5.5.1): the page reads 1005
    assert run.results["events"] == clean_close(1005)
    assert not errors(run.console)


async def test_gateway_shutdown_reads_1001_clean(chromium, pages, serve, echo_port) -> None:
    gw = await serve("--drain-timeout", "0.2")
    page = await chromium.open(pages.url("/page.html", gateway=gw.address, steps="echo",
                                         echo=echo_port, close="gateway"))
    await page.wait_for_function("window.results.echo !== undefined")
    log = await asyncio.to_thread(gw.stop)  # SIGTERM: drain 0.2 s, then 1001 to the page
    assert gw.proc.returncode == 0, log
    run = await chromium.results(page)
    assert run.results["echo"] == ECHOED
    assert run.results["close"] == {"ok": True}
    assert run.results["events"] == clean_close(1001, "gateway shutting down")
    assert not errors(run.console)


async def _never_answering(address: str) -> bytes:
    """A WebSocket on the same gateway that answers no ping: the first two frames it gets
    (the server's frames are unmasked and these are short: a 2-byte header each)."""
    url = urlsplit(address)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        frames = b""
        for _ in range(2):
            frame_head = await asyncio.wait_for(reader.readexactly(2), 10)
            frames += frame_head + await reader.readexactly(frame_head[1] & 0x7F)
        return frames
    finally:
        writer.close()


async def test_idle_page_answers_pings_and_stays_open(chromium, pages, serve,
                                                      echo_port) -> None:
    """Two seconds of silence are five ping periods: the browser answers each ping by
    itself and its connection lives on, while a client that answers none, on the same
    gateway at the same time, is closed with 1001."""
    gw = await serve("--idle-ping", "0.4")
    run, silent = await asyncio.gather(
        chromium.run(pages.url("/page.html", gateway=gw.address, steps="idle,echo",
                               idle=2000, echo=echo_port, close="empty")),
        _never_answering(gw.address))
    assert silent == b"\x89\x00" + b"\x88\x13\x03\xe9no answer to ping"  # ping, Close 1001
    assert run.results["idle"] == {"ok": True}
    assert run.results["echo"] == ECHOED
    assert run.results["events"] == clean_close(1005)
    assert not errors(run.console)


@pytest.mark.parametrize("setup", ["workers", "tls"])
async def test_close_without_code_through_workers_and_tls(chromium, pages, spawn_gateway,
                                                          echo_port, tmp_path, setup) -> None:
    """The same close as above, against `--workers 2` and against the gateway's own TLS."""
    args, ca_pem = ["--workers", "2"], None
    if setup == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        chain, key, ca_pem = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
        cert.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_pem))
        args = ["--tls-cert", str(chain), "--tls-key", str(key)]
    gw = await spawn_gateway(*args)
    browser = await chromium.launch(ca_pem=ca_pem) if ca_pem else None
    for _ in range(4):  # with two workers, the kernel spreads these over both
        run = await chromium.run(pages.url("/page.html", gateway=gw.address, steps="echo",
                                           echo=echo_port, close="empty"), browser)
        assert run.results["echo"] == ECHOED
        assert run.results["events"] == clean_close(1005)
        assert not errors(run.console)
