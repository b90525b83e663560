"""`ksw1fast` command line: `serve` runs the gateway; `--version` prints the version."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Optional, Sequence

from ksw1fast._version import __version__
from ksw1fast.config import GatewayConfig

_D = GatewayConfig()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksw1fast", description="KSW1 WebSocket gateway")
    parser.add_argument("--version", action="version", version=f"ksw1fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the gateway",
        description="Serve KSW1 on ws://HOST:PORT/PATH. Defaults come from GATEWAY_HOST, "
                    "GATEWAY_PORT and GATEWAY_PATH when set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--host", default=os.environ.get("GATEWAY_HOST") or _D.host,
                       help="address to listen on (env GATEWAY_HOST)")
    serve.add_argument("--port", type=int, default=_env_int("GATEWAY_PORT", _D.port),
                       help="TCP port to listen on; 0 picks a free one (env GATEWAY_PORT)")
    serve.add_argument("--path", default=os.environ.get("GATEWAY_PATH") or _D.path,
                       help="URL path of the WebSocket endpoint (env GATEWAY_PATH)")
    serve.add_argument("--max-streams", type=int, default=_D.max_streams,
                       help="most streams one connection may have open")
    serve.add_argument("--max-payload", type=int, default=_D.max_payload,
                       help="largest KSW1 frame payload in bytes; larger closes with 1009")
    serve.add_argument("--handshake-timeout", type=float, default=_D.handshake_timeout,
                       help="seconds a client has to complete the WebSocket upgrade")
    serve.add_argument("--connect-timeout", type=float, default=_D.connect_timeout,
                       help="seconds to resolve and connect one Open")
    serve.add_argument("--dns-timeout", type=float, default=_D.dns_timeout,
                       help="seconds for one DnsQuery")
    serve.add_argument("--idle-ping", type=float, default=_D.idle_ping,
                       help="send a WebSocket ping after this many idle seconds and drop "
                            "the connection if no pong follows; 0 disables")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="log verbosity (payload bytes are never logged)")
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(host=args.host, port=args.port, path=args.path,
                         max_streams=args.max_streams, max_payload=args.max_payload,
                         handshake_timeout=args.handshake_timeout,
                         connect_timeout=args.connect_timeout, dns_timeout=args.dns_timeout,
                         idle_ping=args.idle_ping)


async def serve(config: GatewayConfig) -> None:
    """Run a gateway until SIGINT or SIGTERM."""
    from ksw1fast.gateway import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await Gateway(config).start():
        await stop.wait()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # picows logs every accept on its own; our connection lines say the same with more
    logging.getLogger("picows").setLevel(max(level, logging.WARNING))
    config = config_from_args(args)
    import uvloop

    uvloop.run(serve(config))
