"""`ksw1fast token issue`: print one signed token (see `ksw1fast.security.tokens`).

    KSW1FAST_TOKEN_SECRET=... ksw1fast token issue --ttl 1h --allow 'db.internal:5432' \\
        --allow 'udp *:53' --allow-udp --allow-dns

A PKCS#11 scope (ksw1fast.pkcs11.scope) comes from --pkcs11-scope JSON and the
--pkcs11-slot/-token/-function/-mechanism/-key flags, which add to its lists; any of
them allows PKCS#11 within that scope.

The secret is read from an environment variable (never a flag: flags show in `ps`).
To plug into the main parser::

    add_token_commands(subparsers)           # next to `serve`
    args = parser.parse_args(argv)
    if args.command == "token":
        sys.exit(args.run(args))
"""
from __future__ import annotations

import argparse
import json
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
    scope = issue.add_argument_group(
        "PKCS#11 scope", "allow PKCS#11 only within these limits (docs/pkcs11-setup.md, "
        "'Per-token scope'); the repeatable flags add to the lists of --pkcs11-scope")
    scope.add_argument("--pkcs11-scope", metavar="JSON",
                       help='the scope as a JSON object, e.g. \'{"functions": ["Sign"], '
                            '"mechanisms": ["CKM_ECDSA"], "keys": ["signing-key"]}\'')
    for flag, key, metavar, what in _SCOPE_FLAGS:
        scope.add_argument(f"--pkcs11-{flag}", dest=f"pkcs11_{key}", metavar=metavar,
                           action="append", default=[], help=f"{what}; repeatable")
    scope.add_argument("--pkcs11-export", action="store_true",
                       help="allow key material to leave the token (WrapKey, reading "
                            "CKA_VALUE and the like of keys); off in a scope otherwise")
    issue.set_defaults(run=partial(_issue, issue))


# flag, scope key, metavar, help
_SCOPE_FLAGS = (
    ("slot", "slots", "ID", "a slot id the token may use"),
    ("token", "labels", "LABEL", "a token label: only slots holding such a token"),
    ("function", "functions", "FN", "a function it may call, named as --pkcs11-allow takes "
                                    "them (docs/pkcs11.md §4)"),
    ("mechanism", "mechanisms", "CKM", "a mechanism it may use: CKM_ name or number"),
    ("key", "keys", "LABEL", "the CKA_LABEL of an object it may use as a key"),
)


def _pkcs11_scope(args: argparse.Namespace) -> dict[str, object] | None:
    """The scope object the options give, None when they give none; ValueError."""
    flags = {key: getattr(args, f"pkcs11_{key}") for _, key, _, _ in _SCOPE_FLAGS}
    if args.pkcs11_scope is None and not any(flags.values()) and not args.pkcs11_export:
        return None
    try:
        scope = {} if args.pkcs11_scope is None else json.loads(args.pkcs11_scope)
    except ValueError:
        raise ValueError("--pkcs11-scope: not JSON") from None
    if not isinstance(scope, dict):
        raise ValueError("--pkcs11-scope: must be a JSON object")
    for key, values in flags.items():
        if values:
            if key in ("slots", "mechanisms"):
                values = [int(v) if v.isdecimal() else v for v in values]
            if key == "slots" and not all(isinstance(v, int) for v in values):
                raise ValueError("--pkcs11-slot takes slot ids (numbers from 0)")
            listed = scope.setdefault(key, [])
            if not isinstance(listed, list):
                raise ValueError(f"PKCS#11 scope: {key} must be a list")
            listed.extend(values)
    if args.pkcs11_export:
        scope["export"] = True
    return scope


def _issue(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        scope = _pkcs11_scope(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.allow and not args.allow_pkcs11 and scope is None:
        parser.error("the token would allow nothing: give --allow DEST, --allow-pkcs11 "
                     "or a PKCS#11 scope")
    try:
        secret = secret_from_env(args.secret_env)
        token = issue_token(secret, args.ttl, args.allow, udp=args.allow_udp,
                            dns=args.allow_dns,
                            pkcs11=args.allow_pkcs11 if scope is None else scope)
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
