"""`ksw1fast` command line: `serve`, `check-config`, `token issue`, `--version`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Callable, Optional, Sequence

from ksw1fast._version import __version__
from ksw1fast.config import AUDIT_LEVELS, GatewayConfig
from ksw1fast.cli.config_file import (ConfigError, check_config_file, located, make_config,
                                  read_config_file)
from ksw1fast.errors import MissingExtra, SettingError, StartError
from ksw1fast.pkcs11.settings import Pkcs11Settings
from ksw1fast.ops.logs import configure as configure_logging
from ksw1fast.cli.token import add_token_commands
from ksw1fast.ops.reload import Reloader
from ksw1fast.ops.workers import SERVING, Supervisor, report, worker_count
from ksw1fast.security.gate import Security, config_warnings
from ksw1fast.security.peers import FORWARDED_HEADERS

log = logging.getLogger("ksw1fast")

_D = GatewayConfig()
_P = Pkcs11Settings()

# each serve flag's dest -> its setting (a TOML key; "pkcs11.x" is x in [pkcs11]); the
# docs site's configuration reference is generated from this and the parser
FLAG_SETTINGS = {
    "host": "host", "port": "port", "path": "path", "max_streams": "max_streams",
    "max_payload": "max_payload", "handshake_timeout": "handshake_timeout",
    "connect_timeout": "connect_timeout", "dns_timeout": "dns_timeout",
    "send_buffer_limit": "send_buffer_limit", "send_timeout": "send_timeout",
    "max_dns_queries": "max_dns_queries", "max_lookups": "max_lookups",
    "max_open_rate": "max_open_rate", "max_connections": "max_connections",
    "max_connections_per_ip": "max_connections_per_ip", "proxy_protocol": "proxy_protocol",
    "trusted_proxy": "trusted_proxies", "forwarded_header": "forwarded_header",
    "idle_ping": "idle_ping", "tls_cert": "tls_cert", "tls_key": "tls_key",
    "tls_client_ca": "tls_client_ca",
    "workers": "workers", "drain_timeout": "drain_timeout", "metrics_port": "metrics_port",
    "metrics_host": "metrics_host", "log_format": "log_format", "audit_log": "audit_log", "audit": "audit",
    "token_file": "token_file",
    "token_secret_env": "token_secret_env", "open_token": "open_token",
    "jwt_secret_env": "jwt_secret_env", "jwt_jwks": "jwt_jwks",
    "jwt_audience": "jwt_audience", "jwt_issuer": "jwt_issuer", "jwt_leeway": "jwt_leeway",
    "allow_origin": "allow_origins", "egress": "egress", "insecure": "insecure",
    "pkcs11_lib": "pkcs11.lib", "pkcs11_isolation": "pkcs11.isolation",
    "pkcs11_pool_size": "pkcs11.pool_size", "pkcs11_pin_env": "pkcs11.pin_env",
    "pkcs11_allow_admin": "pkcs11.allow_admin", "pkcs11_allow": "pkcs11.allow",
    "pkcs11_deny": "pkcs11.deny", "pkcs11_max_out": "pkcs11.max_out",
    "pkcs11_max_calls": "pkcs11.max_calls", "pkcs11_max_agents": "pkcs11.max_agents",
}
# environment names of the reference server
ENV_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "GATEWAY_HOST": ("host", str), "GATEWAY_PORT": ("port", int),
    "GATEWAY_PATH": ("path", str), "PKCS11_BACKEND": ("pkcs11.lib", str),
    "PKCS11_LIB": ("pkcs11.lib", str)}


def _add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """Flags default to None: only what is given overrides the file and the environment."""
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (docs/configuration.md)")
    net = serve.add_argument_group("listening")
    net.add_argument("--host", help=f"address to listen on (env GATEWAY_HOST; default {_D.host})")
    net.add_argument("--port", type=int,
                     help=f"TCP port; 0 picks a free one (env GATEWAY_PORT; default {_D.port})")
    net.add_argument("--path", help=f"URL path of the endpoint (env GATEWAY_PATH; default {_D.path})")
    net.add_argument("--tls-cert", metavar="PEM", help="certificate chain: serve wss://")
    net.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    net.add_argument("--tls-client-ca", metavar="PEM",
                     help="mutual TLS: require a client certificate signed by these CAs; "
                          "its subject names the client when its token does not")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-streams", type=int,
                        help=f"most streams per connection (default {_D.max_streams})")
    limits.add_argument("--max-payload", type=int,
                        help=f"largest frame payload in bytes, above it close 1009 "
                             f"(docs/protocol.md §10; default {_D.max_payload})")
    limits.add_argument("--handshake-timeout", type=float,
                        help=f"seconds to complete the upgrade (default {_D.handshake_timeout})")
    limits.add_argument("--connect-timeout", type=float,
                        help=f"seconds to resolve and connect an Open (default {_D.connect_timeout})")
    limits.add_argument("--dns-timeout", type=float,
                        help=f"seconds for a DnsQuery (default {_D.dns_timeout})")
    limits.add_argument("--max-open-rate", type=float, metavar="PER_SECOND",
                        help="Opens and DnsQueries a connection may make a second (bursts "
                             "of as many); beyond it OpenErr TooManyStreams / DnsErr Refused; "
                             f"0 disables (default {_D.max_open_rate:g})")
    limits.add_argument("--max-dns-queries", type=int,
                        help="DnsQuery lookups one connection may have in flight; more are "
                             f"answered ServerFailure (default {_D.max_dns_queries})")
    limits.add_argument("--max-lookups", type=int,
                        help="name lookups (DnsQuery and Opens by name) in flight per worker; "
                             f"more fail at once (default {_D.max_lookups})")
    limits.add_argument("--send-buffer-limit", type=int, metavar="BYTES",
                        help="bytes of replies queued for a client that does not read them "
                             "before the gateway stops reading its requests "
                             f"(default {_D.send_buffer_limit})")
    limits.add_argument("--send-timeout", type=float,
                        help="seconds a client may stay over --send-buffer-limit before it "
                             f"is closed with 1008 (default {_D.send_timeout:g})")
    limits.add_argument("--idle-ping", type=float,
                        help="keepalive: a client silent up to this many seconds is pinged "
                             "and closed with 1001 if it does not answer within half as "
                             f"long again; keep it below your balancer's idle timeout; "
                             f"0 disables (docs/protocol.md §11; default {_D.idle_ping:g})")
    sec = serve.add_argument_group("security (docs/security.md)")
    sec.add_argument("--token-file", metavar="FILE",
                     help="accepted tokens, one per line, or sha256:<hex> of each")
    sec.add_argument("--token-secret-env", metavar="VAR",
                     help="environment variable with the HMAC secret of signed tokens "
                          "(ksw1fast token issue)")
    sec.add_argument("--jwt-secret-env", metavar="VAR",
                     help="environment variable with the secret (32+ bytes) of HS256 JSON "
                          "Web Tokens")
    sec.add_argument("--jwt-jwks", metavar="FILE",
                     help="JWKS file of the public keys of RS256, ES256 and EdDSA JSON Web "
                          "Tokens, selected by the token's kid")
    sec.add_argument("--jwt-audience", metavar="AUD",
                     help="every JWT must name this audience (aud)")
    sec.add_argument("--jwt-issuer", metavar="ISS",
                     help="every JWT must come from this issuer (iss)")
    sec.add_argument("--jwt-leeway", type=float, metavar="SECONDS",
                     help="clock skew allowed in a JWT's exp, nbf and iat "
                          f"(default {_D.jwt_leeway:g})")
    sec.add_argument("--open-token", action="store_const", const=True,
                     help="upgrade without a handshake token; each Open, DnsQuery and "
                          "Pkcs11Request then needs a valid token (Open field or Hello; "
                          "docs/protocol.md §9)")
    sec.add_argument("--allow-origin", metavar="PATTERN", action="append",
                     help="browser Origin allowed to connect, scheme://host[:port] with '*' "
                          "for the port or host labels, or '*' or 'null' (repeatable); "
                          "default: no Origin, or localhost / 127.0.0.1 / [::1] on any port")
    sec.add_argument("--egress", metavar="RULE", action="append",
                     help="egress rule, e.g. 'allow tcp db.internal:5432' or "
                          "'deny any 10.0.0.0/8' (repeatable, first match wins; any allow "
                          "rule makes the default deny)")
    sec.add_argument("--insecure", action="store_const", const=True,
                     help="listen on a non-loopback address without tokens")
    p11 = serve.add_argument_group("PKCS#11 (needs the extra: pip install 'ksw1fast[pkcs11]')")
    p11.add_argument("--pkcs11-lib", metavar="PATH",
                     help="PKCS#11 module to serve (env PKCS11_LIB, or the reference's "
                          "PKCS11_BACKEND); without one every call answers 'no PKCS#11 "
                          "module configured'")
    p11.add_argument("--pkcs11-isolation", choices=["connection", "worker"],
                     help="'connection' (default): an agent process, with its own login and "
                          "sessions, per connection; 'worker': one agent shared by the "
                          "worker's connections, only with --pkcs11-pin-env")
    p11.add_argument("--pkcs11-pool-size", type=int,
                     help=f"agents kept started for new connections (default {_P.pool_size})")
    p11.add_argument("--pkcs11-pin-env", metavar="VAR",
                     help="environment variable with the user PIN: the gateway logs in and "
                          "the browser never sends the PIN")
    p11.add_argument("--pkcs11-allow-admin", action="store_const", const=True,
                     help="with a gateway-held PIN, still allow InitToken, InitPIN, SetPIN "
                          "and SO login")
    p11.add_argument("--pkcs11-allow", metavar="FN", action="append",
                     help="allow only these functions, named as in docs/pkcs11.md §4 "
                          "(repeatable)")
    p11.add_argument("--pkcs11-deny", metavar="FN", action="append",
                     help="refuse these functions with AuthDenied (repeatable; "
                          "docs/pkcs11.md §8)")
    p11.add_argument("--pkcs11-max-out", type=int,
                     help=f"cap on output sizes a client may ask for (default {_P.max_out})")
    p11.add_argument("--pkcs11-max-calls", type=int,
                     help="calls one connection may have in flight; more are answered "
                          f"Internal at once (default {_P.max_calls})")
    p11.add_argument("--pkcs11-max-agents", type=int,
                     help="agent processes per worker, starting or running, the pool "
                          "included (about 30-40 MiB each); a connection's first call past "
                          f"it is answered Internal (default {_P.max_agents})")
    ops = serve.add_argument_group("operations (docs/operations.md)")
    ops.add_argument("--max-connections", type=int,
                     help="WebSocket connections per worker; more are refused with HTTP 503 "
                          f"and Retry-After (default {_D.max_connections})")
    ops.add_argument("--max-connections-per-ip", type=int,
                     help="connections per worker from one client address (the real one "
                          "behind --proxy-protocol or --trusted-proxy); more get 503 "
                          f"(default {_D.max_connections_per_ip})")
    ops.add_argument("--proxy-protocol", action="store_const", const=True,
                     help="every connection starts with a PROXY protocol v1 or v2 header "
                          "(HAProxy send-proxy[-v2], AWS NLB): its client address is used")
    ops.add_argument("--trusted-proxy", metavar="CIDR", action="append",
                     help="believe the forwarding header (--forwarded-header) from "
                          "connections of this network (repeatable); ignored from anyone else")
    ops.add_argument("--forwarded-header", choices=FORWARDED_HEADERS,
                     help="the one forwarding header the trusted proxies set: the other is "
                          "ignored, as a client could write it (default x-forwarded-for)")
    ops.add_argument("--workers", type=worker_count,
                     help="worker processes, or 'auto' for one per CPU (default 1); each has "
                          "its own event loop and SO_REUSEPORT listener, and a supervisor "
                          "restarts any that dies")
    ops.add_argument("--drain-timeout", type=float,
                     help=f"on SIGTERM/SIGINT, seconds open connections get to finish before "
                          f"they are closed with 1001 (default {_D.drain_timeout:g})")
    ops.add_argument("--metrics-port", type=int,
                     help="serve /metrics (Prometheus), /healthz and /readyz on this port "
                          "(default off; needs the metrics extra)")
    ops.add_argument("--metrics-host", help=f"address of that listener (default {_D.metrics_host})")
    ops.add_argument("--log-format", choices=["text", "json"], help="default text")
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log verbosity; payloads, tokens and PINs are never logged")
    ops.add_argument("--audit-log", metavar="FILE",
                     help="append the audit trail (handshakes, Opens, DNS queries, PKCS#11 "
                          "logins and key use, limits; docs/operations.md) to FILE, in "
                          "--log-format, whatever --log-level; default: with the log")
    ops.add_argument("--audit", choices=AUDIT_LEVELS,
                     help="security (default): handshakes, refusals, limits, PKCS#11 logins "
                          "and failures; all: also every allowed Open, DNS answer and PKCS#11 "
                          "key use (a line per Open: about a quarter more CPU per Open)")
    # one of a supervisor's workers, saying on this pipe when it serves (workers.py)
    ops.add_argument("--worker-process", type=int, metavar="FD", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksw1fast", description="KSW1 WebSocket gateway")
    parser.add_argument("--version", action="version", version=f"ksw1fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve", help="run the gateway",
        description="Serve KSW1 on ws://HOST:PORT/PATH (default ws://127.0.0.1:8088/ws). "
                    "Settings: defaults < --config file < environment < flags.")
    _add_serve_flags(serve_parser)
    serve_parser.set_defaults(parser=serve_parser)  # its errors show its own usage
    check = sub.add_parser("check-config", help="validate a TOML configuration file")
    check.add_argument("file")
    add_token_commands(sub)
    return parser


def _from_env(env: str, kind: Callable[[str], Any]) -> Any:
    """The value of environment variable `env`, worded like argparse when it is no `kind`."""
    try:
        return kind(os.environ[env])
    except ValueError:
        raise ValueError(f"environment variable {env}: invalid {kind.__name__} value: "
                         f"{os.environ[env]!r}") from None


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Merge file, environment and flags; ValueError (ConfigError) when they do not fit,
    naming the flag, variable or file line a bad value came from."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    origins: dict[str, str] = {}  # setting -> the flag or variable that set it
    for env, (key, kind) in ENV_SETTINGS.items():
        if os.environ.get(env):
            values[key] = _from_env(env, kind)
            origins[key] = f"environment variable {env}"
    for flag, key in FLAG_SETTINGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
            origins[key] = f"argument --{flag.replace('_', '-')}"
    if args.worker_process is not None:  # a supervisor's worker: it serves the metrics
        values.update(workers=1, reuse_port=True, metrics_port=None)
    try:
        return make_config(values)
    except SettingError as exc:
        if exc.setting in origins:
            raise ValueError(f"{origins[exc.setting]}: {exc.reason}") from None
        if args.config:
            raise located(args.config, exc) from None
        raise


async def serve(config: GatewayConfig, security: Security,
                status_fd: Optional[int] = None, reloader: Optional[Reloader] = None) -> None:
    """Run one gateway process until SIGINT or SIGTERM, then drain it; StartError when it
    cannot listen.  A supervisor's worker says on `status_fd` once it serves.  SIGHUP
    reloads the settings through `reloader` (ksw1fast.ops.reload)."""
    from ksw1fast.server.gateway import Gateway
    from ksw1fast.ops.health import OpsServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config, security=security)
    if reloader is not None:  # before status_fd says it serves: the supervisor then may
        loop.add_signal_handler(signal.SIGHUP, reloader.apply, gateway)  # send SIGHUP
    ops = None
    try:
        if config.metrics_port is not None:  # /readyz answers 503 until the gateway listens
            ops = await OpsServer(lambda: gateway.ready).start(config.metrics_host,
                                                               config.metrics_port)
        await gateway.start()
        if status_fd is not None:
            report(status_fd, SERVING)
        await stop.wait()
        log.info("draining for up to %gs", config.drain_timeout)
        await gateway.drain(config.drain_timeout)
    finally:
        await gateway.close()  # a no-op once drained
        if ops is not None:
            await ops.close()


def _check_config(path: str) -> int:
    try:
        config = check_config_file(path)
    except (ConfigError, OSError) as exc:  # ConfigError names the file itself
        print(f"ksw1fast: {exc}", file=sys.stderr)
        return 2
    for warning in config_warnings(config):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok")
    return 0


def _serve_config(args: argparse.Namespace) -> tuple[GatewayConfig, Security]:
    """The settings to serve and what they enforce (built once: it reads the token
    file), refused (exit 2) before anything listens when they cannot serve: a bad value
    or combination with serve's usage, a missing package in one line."""
    parser: argparse.ArgumentParser = args.parser
    try:
        config = config_from_args(args)
        security = Security(config)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        config.require_extras()
    except MissingExtra as exc:  # nothing was mistyped: no usage
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return config, security


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        sys.exit(args.run(args))
    if args.command == "check-config":
        sys.exit(_check_config(args.file))
    # until serving installs its SIGHUP handler (and in workers, which inherit this): a
    # reload asked for while starting must not end the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config, security = _serve_config(args)
    try:
        configure_logging(args.log_level, config.log_format, config.audit_log)
    except OSError as exc:
        args.parser.exit(2, f"{args.parser.prog}: error: cannot open the audit log "
                            f"{config.audit_log}: {exc.strerror}\n")
    if args.worker_process is None:  # said once, not by every worker
        for warning in config_warnings(config):
            log.warning("%s", warning)
    reloader = Reloader(lambda: config_from_args(args), config,
                        worker=args.worker_process is not None)
    try:
        if config.workers > 1:
            serve_argv = list(argv if argv is not None else sys.argv[1:])
            sys.exit(Supervisor(config, serve_argv[serve_argv.index("serve") + 1:],
                                reloader).run())
        import uvloop

        uvloop.run(serve(config, security, args.worker_process, reloader))
    except StartError as exc:
        if args.worker_process is None:
            sys.exit(f"ksw1fast: {exc}")  # one line, exit 1
        report(args.worker_process, str(exc))  # its supervisor says it, once for all
        sys.exit(1)
