"""A real browser against a real gateway: headless Chromium runs page.js, which speaks KSW1
through the shipped client (examples/browser/ksw1.js). Everything is on 127.0.0.1."""
from __future__ import annotations

import pytest
import trustme

import ksw1fast
from ksw1fast.pkcs11.settings import Pkcs11Settings

from .page_server import serve_pages

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

MiB = 1 << 20


def refused_with_403(console: list[str]) -> bool:
    # a page only sees close code 1006; the HTTP status shows in Chromium's console only
    return any("Unexpected response code: 403" in line for line in console)


async def test_token_echo_and_dns(chromium, pages, token, token_file, echo_port) -> None:
    async with await ksw1fast.start_gateway(port=0, token_file=token_file) as gw:
        run = await chromium.run(pages.url("/page.html", gateway=gw.address, token=token,
                                           steps="echo,dns", echo=echo_port))
    connect = run.results["connect"]
    # Chromium drops a socket whose 101 selects none of the offered subprotocols
    assert connect["ok"] and connect["subprotocol"] == f"auth-{token}"
    assert connect["features"] == 0x2E  # all the polyfill asks for is granted
    assert run.results["echo"] == {"ok": True, "bytes": 256 * 1024}
    assert run.results["dns"]["ok"] and "127.0.0.1" in run.results["dns"]["addresses"]
    assert not [line for line in run.console if line.startswith(("error", "uncaught"))]


@pytest.mark.softhsm
async def test_pkcs11_generate_random_on_softhsm(chromium, pages, token, token_file,
                                                 softhsm, monkeypatch) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm.conf))  # the gateway's agents inherit it
    async with await ksw1fast.start_gateway(port=0, token_file=token_file,
                                            pkcs11=Pkcs11Settings(lib=softhsm.module)) as gw:
        run = await chromium.run(pages.url("/page.html", gateway=gw.address, token=token,
                                           steps="pkcs11"))
    assert run.results["connect"]["ok"]
    assert run.results["pkcs11"] == {"ok": True, "randomBytes": 16}


async def test_wrong_token_fails_the_handshake(chromium, pages, token_file,
                                               echo_port) -> None:
    async with await ksw1fast.start_gateway(port=0, token_file=token_file) as gw:
        run = await chromium.run(pages.url("/page.html", gateway=gw.address,
                                           token="not-the-token", steps="echo",
                                           echo=echo_port))
    assert run.results["connect"]["ok"] is False
    assert "code 1006" in run.results["connect"]["error"]
    assert "echo" not in run.results
    assert refused_with_403(run.console)


async def test_origin_off_the_allowlist_is_refused(chromium, token, token_file) -> None:
    """Two page servers on 127.0.0.1 that differ only in port; the allowlist names one.

    Both origins are in the localhost family the gateway accepts by default, so the
    refusal can only come from the configured allowlist, matched down to the port; the
    allowed page, with the same token, shows that nothing else refuses."""
    with serve_pages() as allowed, serve_pages() as other:
        async with await ksw1fast.start_gateway(port=0, token_file=token_file,
                                                allow_origins=(allowed.origin,)) as gw:
            ok = await chromium.run(allowed.url("/page.html", gateway=gw.address, token=token))
            refused = await chromium.run(other.url("/page.html", gateway=gw.address,
                                                   token=token))
    assert ok.results["connect"]["ok"]
    assert refused.results["connect"]["ok"] is False
    assert "code 1006" in refused.results["connect"]["error"]
    assert refused_with_403(refused.console)


async def test_wss_with_a_trusted_test_ca(chromium, pages, token, token_file, echo_port,
                                          tmp_path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key, ca_pem = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    async with await ksw1fast.start_gateway(port=0, token_file=token_file, tls_cert=str(chain),
                                            tls_key=str(key)) as gw:
        assert gw.address.startswith("wss://127.0.0.1:")
        url = pages.url("/page.html", gateway=gw.address, token=token, steps="echo",
                        echo=echo_port)
        trusting = await chromium.run(url, await chromium.launch(ca_pem=ca_pem))
        untrusting = await chromium.run(url, await chromium.launch())
    assert trusting.results["connect"]["ok"]
    assert trusting.results["echo"] == {"ok": True, "bytes": 256 * 1024}
    # the same page in a browser without the CA: the certificate is what it checks
    assert untrusting.results["connect"]["ok"] is False
    assert any("ERR_CERT_AUTHORITY_INVALID" in line for line in untrusting.console)


async def test_16_mib_data_frame_arrives_intact(chromium, pages, token, token_file,
                                                sink) -> None:
    async with await ksw1fast.start_gateway(port=0, token_file=token_file) as gw:
        run = await chromium.run(pages.url("/page.html", gateway=gw.address, token=token,
                                           steps="big", sink=sink.port))
    big = run.results["big"]
    assert big["ok"], big
    assert sink.received == [(16 * MiB, big["sha256"])]
