"""wss:// with a certificate made by the test; the client verifies it."""
from __future__ import annotations

import ssl

import pytest
import trustme

import ksw1fast
from ksw1fast import client as kclient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_wss_echo_with_a_verified_certificate(ca, tmp_path, echo_port) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    async with await ksw1fast.start_gateway(port=0, tls_cert=str(chain),
                                            tls_key=str(key)) as gw:
        assert gw.address.startswith("wss://127.0.0.1:")
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        client = await kclient.connect(gw.address, ssl_context=trusting)
        stream = await client.open_connection("127.0.0.1", echo_port)
        payload = bytes(range(256)) * 4096  # 1 MiB through TLS
        stream.write(payload)
        assert await stream.readexactly(len(payload)) == payload
        await client.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an untrusting client refuses it
            await kclient.connect(gw.address, ssl_context=ssl.create_default_context())
