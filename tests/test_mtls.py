"""Mutual TLS (--tls-client-ca): a client certificate those CAs signed is required, and
its subject names the client in its grant when its token does not."""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

import ksw1fast
from ksw1fast import client as kclient

from helpers import GatewayProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A server certificate, a client CA's bundle and the CA itself, as files."""
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1")
    files = {"chain": root / "chain.pem", "key": root / "key.pem",
             "client_ca_file": root / "client-ca.pem"}
    server.private_key_and_cert_chain_pem.write_to_path(str(files["chain"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca_file"]))
    return {"server_ca": server_ca, "client_ca": client_ca, **files}


def _client_context(pki: dict[str, Any], ca: trustme.CA | None,
                    name: str = "alice") -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki["server_ca"].configure_trust(context)
    if ca is not None:
        ca.issue_cert(f"{name}@example.com", common_name=name).configure_cert(context)
    return context


async def _refused(address: str, context: ssl.SSLContext) -> None:
    with pytest.raises(OSError):  # the server ends the TLS handshake: ConnectionError
        client = await kclient.connect(address, ssl_context=context, timeout=5)
        await client.close()


async def test_a_client_certificate_is_required_and_names_the_client(pki: dict[str, Any],
                                                                     echo_port: int) -> None:
    async with await ksw1fast.start_gateway(
            port=0, tls_cert=str(pki["chain"]), tls_key=str(pki["key"]),
            tls_client_ca=str(pki["client_ca_file"])) as gw:
        client = await kclient.connect(gw.address, ssl_context=_client_context(
            pki, pki["client_ca"]))
        stream = await client.open_connection("127.0.0.1", echo_port)
        stream.write(b"mutual")
        assert await stream.readexactly(6) == b"mutual"
        (conn,) = gw.connections
        assert conn.session.grant is not None
        assert conn.session.grant.subject is not None
        assert "CN=alice" in conn.session.grant.subject.split(",")
        await client.close()
        await _refused(gw.address, _client_context(pki, None))  # no certificate
        await _refused(gw.address, _client_context(pki, trustme.CA()))  # another CA's


async def test_without_a_client_ca_no_certificate_is_asked_for(pki: dict[str, Any]) -> None:
    async with await ksw1fast.start_gateway(port=0, tls_cert=str(pki["chain"]),
                                            tls_key=str(pki["key"])) as gw:
        client = await kclient.connect(gw.address, ssl_context=_client_context(
            pki, pki["client_ca"]))
        (conn,) = gw.connections
        assert conn.session.grant is not None and conn.session.grant.subject is None
        await client.close()


def test_the_serve_flag_and_its_errors(pki: dict[str, Any], tmp_path: Path) -> None:
    gateway = GatewayProcess("--tls-cert", str(pki["chain"]), "--tls-key", str(pki["key"]),
                             "--tls-client-ca", str(pki["client_ca_file"]))
    try:
        async def check() -> None:
            client = await kclient.connect(gateway.address, ssl_context=_client_context(
                pki, pki["client_ca"]))
            await client.close()
            await _refused(gateway.address, _client_context(pki, None))

        asyncio.run(check())
    finally:
        gateway.stop()
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert and tls_key"):
        ksw1fast.GatewayConfig(tls_client_ca=str(pki["client_ca_file"]))
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("no certificates here\n")
    with pytest.raises(ksw1fast.errors.TlsError, match=f"tls_client_ca {bogus}: not PEM"):
        from ksw1fast.server.gateway import tls_context

        tls_context(ksw1fast.GatewayConfig(tls_cert=str(pki["chain"]), tls_key=str(pki["key"]),
                                           tls_client_ca=str(bogus)))
