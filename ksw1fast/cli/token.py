"""`ksw1fast token issue`: print one signed token (see `ksw1fast.security.tokens`).

    KSW1FAST_TOKEN_SECRET=... ksw1fast token issue --ttl 1h --allow 'db.internal:5432' \\
        --allow 'udp *:53' --allow-udp --allow-dns

The secret is read from an environment variable (never a flag: flags show in `ps`).
To plug into the main parser::

    add_token_commands(subparsers)           # next to `serve`
    args = parser.parse_args(argv)
    if args.command == "token":
        sys.exit(args.run(args))
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable, Sequence

from ksw1fast.security.tokens import DEFAULT_SECRET_ENV, issue_token, parse_duration, secret_from_env


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the lifetime must be positive")
    return seconds


def add_token_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `token issue` to a parser's sub-commands; the parsed args carry `run(args)`."""
    token = subparsers.add_parser("token", help="issue signed access tokens",
                                  description="Manage signed access tokens.")
    commands = token.add_subparsers(dest="token_command", required=True)
    issue = commands.add_parser(
        "issue", help="print a signed token",
        description="Print one signed token to stdout. It verifies on a gateway that has "
                    "the same secret.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    issue.add_argument("--secret-env", metavar="VAR", default=DEFAULT_SECRET_ENV,
                       help="environment variable holding the signing secret")
    issue.add_argument("--ttl", type=_duration, default="1h",
                       help="lifetime: seconds or 90s, 30m, 1h, 2d, 1h30m")
    issue.add_argument("--allow", action="append", default=[], metavar="DEST",
                       help="destination the token may open, '[tcp|udp|any] HOST[:PORTS]' "
                            "as in policy rules (e.g. 'db.internal:5432', '10.0.0.0/8:443'); "
                            "repeatable")
    issue.add_argument("--allow-udp", action="store_true", help="allow UDP flows")
    issue.add_argument("--allow-dns", action="store_true",
                       help="allow DNS lookups of the names the --allow entries cover")
    issue.add_argument("--allow-pkcs11", action="store_true", help="allow PKCS#11 calls")
    issue.set_defaults(run=partial(_issue, issue))


def _issue(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.allow and not args.allow_pkcs11:
        parser.error("the token would allow nothing: give --allow DEST or --allow-pkcs11")
    try:
        secret = secret_from_env(args.secret_env)
        token = issue_token(secret, args.ttl, args.allow, udp=args.allow_udp,
                            dns=args.allow_dns, pkcs11=args.allow_pkcs11)
    except ValueError as exc:  # messages name the variable or the entry, never the secret
        parser.error(str(exc))
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ksw1fast token ...` on its own; returns the exit code (argparse exits 2 on errors)."""
    parser = argparse.ArgumentParser(prog="ksw1fast")
    add_token_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
