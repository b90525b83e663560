"""ksw1fast: a fast, safe KSW1 gateway (TCP, DNS and PKCS#11 over one WebSocket)."""
from ksw1fast._version import __version__
from ksw1fast.config import GatewayConfig
from ksw1fast.server.gateway import Gateway, start_gateway

__all__ = ["Gateway", "GatewayConfig", "__version__", "start_gateway"]
