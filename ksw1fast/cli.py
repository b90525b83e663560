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
from ksw1fast.pkcs11.supervisor import Pkcs11Settings

_D = GatewayConfig()
_P = Pkcs11Settings()


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
    p11 = serve.add_argument_group("PKCS#11 (needs the pkcs11 extra: pip install 'ksw1fast[pkcs11]')")
    p11.add_argument("--pkcs11-lib", metavar="PATH",
                     default=os.environ.get("PKCS11_LIB") or os.environ.get("PKCS11_BACKEND"),
                     help="PKCS#11 module to serve (env PKCS11_LIB, or the reference's "
                          "PKCS11_BACKEND); without it every call answers 'no PKCS#11 module "
                          "configured'")
    p11.add_argument("--pkcs11-isolation", choices=["connection", "worker"],
                     default=_P.isolation,
                     help="'connection': an agent process (own login, own sessions) per "
                          "connection; 'worker': one agent shared by the worker's connections, "
                          "only with --pkcs11-pin-env")
    p11.add_argument("--pkcs11-pool-size", type=int, default=_P.pool_size,
                     help="agent processes kept started for new connections")
    p11.add_argument("--pkcs11-pin-env", metavar="VAR",
                     help="environment variable holding the user PIN: the gateway logs in, "
                          "the browser never sends the PIN")
    p11.add_argument("--pkcs11-allow-admin", action="store_true",
                     help="with a gateway-held PIN, still allow InitToken, InitPIN, SetPIN "
                          "and SO login")
    p11.add_argument("--pkcs11-allow", metavar="FN", action="append",
                     help="allow only these functions (repeatable; names as in pkcs11-rpc.md)")
    p11.add_argument("--pkcs11-deny", metavar="FN", action="append", default=[],
                     help="refuse these functions with AuthDenied (repeatable)")
    p11.add_argument("--pkcs11-max-out", type=int, default=_P.max_out,
                     help="cap on output sizes a client may ask for, in bytes")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="log verbosity (payload bytes are never logged)")
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The settings of `serve`; ValueError with a readable message when they do not fit."""
    pkcs11 = Pkcs11Settings(
        lib=args.pkcs11_lib, isolation=args.pkcs11_isolation, pool_size=args.pkcs11_pool_size,
        pin_env=args.pkcs11_pin_env, allow_admin=args.pkcs11_allow_admin,
        allow=tuple(args.pkcs11_allow) if args.pkcs11_allow else None,
        deny=tuple(args.pkcs11_deny), max_out=args.pkcs11_max_out)
    return GatewayConfig(host=args.host, port=args.port, path=args.path,
                         max_streams=args.max_streams, max_payload=args.max_payload,
                         handshake_timeout=args.handshake_timeout,
                         connect_timeout=args.connect_timeout, dns_timeout=args.dns_timeout,
                         idle_ping=args.idle_ping, pkcs11=pkcs11)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # picows logs every accept on its own; our connection lines say the same with more
    logging.getLogger("picows").setLevel(max(level, logging.WARNING))
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    import uvloop

    uvloop.run(serve(config))
