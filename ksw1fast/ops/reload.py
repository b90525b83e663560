"""SIGHUP: re-read the settings and serve new handshakes and new Opens with them, without
dropping a connection (docs/operations.md, "Reloading settings").

A reload reads everything `serve` read at start-up afresh: the config file, the
environment (unchanged: a process's environment cannot change from outside, so secrets
named by `token_secret_env` and `jwt_secret_env` keep their values), the flags, the
token file, the JWKS file and the TLS certificate and key.  It checks them as start-up
does, with the same words; then:

- a reload that fails any check changes nothing and logs why in one line;
- the RELOADABLE settings (tokens, JWTs, Origins, egress, the TLS certificate, key and
  client CAs) apply to new handshakes and new Opens, open connections and streams carry
  on (a connection keeps the grant of the token it came with);
- any other setting that differs needs a restart: one line names them, they keep their
  running values, and the rest applies all the same.  So does turning TLS on or off:
  a reload only replaces the certificate and key of a `wss://` listener.

With workers the supervisor checks first, so a bad file is reported once, then passes
SIGHUP on to every worker; each re-reads and applies (and says so) on its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import ssl
from typing import TYPE_CHECKING, Callable, Optional

from ksw1fast.config import GatewayConfig
from ksw1fast.errors import MissingExtra, StartError
from ksw1fast.ops.logs import reopen_audit_log
from ksw1fast.security.egress import EgressPolicy, Rule
from ksw1fast.security.gate import Security

if TYPE_CHECKING:
    from ksw1fast.server.gateway import Gateway

log = logging.getLogger("ksw1fast")

# what a reload applies; every other setting needs a restart
SECURITY_SETTINGS = ("token_file", "token_secret_env", "open_token", "insecure",
                     "jwt_secret_env", "jwt_jwks", "jwt_audience", "jwt_issuer", "jwt_leeway",
                     "allow_origins", "egress")
TLS_SETTINGS = ("tls_cert", "tls_key", "tls_client_ca")
_TLS_ON = ("tls_cert", "tls_key")  # TLS on or off: the listener's scheme, a restart
RELOADABLE = frozenset(SECURITY_SETTINGS + TLS_SETTINGS)
# the files a reload re-reads, by the setting that names them
_FILES = ("token_file", "jwt_jwks", *TLS_SETTINGS)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A reload that passed every check, not applied yet."""

    config: GatewayConfig          # the running restart-only settings, the new rest
    security: Security
    tls: Optional[ssl.SSLContext]
    restart: tuple[str, ...]       # settings that differ but need a restart
    changed: tuple[str, ...]       # what differs from the running settings, for the log
    files: dict[str, Optional[str]]  # digests of the files read


class Reloader:
    """Reloads of one process's settings: `load` reads them as start-up did (file,
    environment, flags); `config` is what it serves now."""

    def __init__(self, load: Callable[[], GatewayConfig], config: GatewayConfig,
                 worker: bool = False) -> None:
        self._load = load
        self.config = config
        self._files = _digests(config)
        self._rules = _egress_rules(config)
        self._worker = worker  # its supervisor named the restart-only settings already

    def prepare(self) -> Optional[Prepared]:
        """The new settings checked, or None after logging in one line why they cannot
        be served (the words start-up would use)."""
        try:
            return self._prepare()
        except (ValueError, OSError, MissingExtra, StartError) as exc:
            log.error("reload refused, nothing changed: %s", _one_line(exc))
            return None

    def _prepare(self) -> Prepared:
        fresh = self._load()
        restart = tuple(_restart_only_changes(self.config, fresh))
        keep = set(TLS_SETTINGS) if bool(fresh.tls_cert) != bool(self.config.tls_cert) else set()
        config = dataclasses.replace(self.config, **{
            name: getattr(fresh, name) for name in RELOADABLE - keep})
        security = Security(config)  # the checks start-up makes, in its words
        config.require_extras()
        from ksw1fast.server.gateway import tls_context

        tls = tls_context(config)
        files = _digests(config)
        return Prepared(config, security, tls, restart,
                        tuple(self._changes(config, security, files)), files)

    def _changes(self, config: GatewayConfig, security: Security,
                 files: dict[str, Optional[str]]) -> list[str]:
        old = self.config

        def differ(*names: str) -> bool:
            return any(getattr(old, n) != getattr(config, n) or
                       (n in files and self._files.get(n) != files[n]) for n in names)

        changes = []
        if security.egress.rules != self._rules:
            changes.append(f"egress ({_count(len(security.egress.rules), 'rule')})")
        if differ("allow_origins"):
            changes.append(f"origins ({_count(len(security.origins.patterns), 'pattern')})")
        if differ("token_file", "token_secret_env", "open_token"):
            changes.append("tokens")
        if differ("jwt_secret_env", "jwt_jwks", "jwt_audience", "jwt_issuer", "jwt_leeway"):
            changes.append("jwt")
        if differ("insecure"):
            changes.append("insecure")
        if differ(*TLS_SETTINGS):
            changes.append("tls")
        return changes

    def _commit(self, prepared: Prepared) -> None:
        if prepared.restart:
            (log.debug if self._worker else log.warning)(
                "reload: %s changed but need%s a restart; running with the old value%s, "
                "applying the rest", ", ".join(prepared.restart),
                "s" if len(prepared.restart) == 1 else "",
                "" if len(prepared.restart) == 1 else "s")
        self.config = prepared.config
        self._files = prepared.files
        self._rules = prepared.security.egress.rules

    def check(self) -> Optional[Prepared]:
        """A supervisor's reload: check the settings, log what needs a restart; None when
        they cannot be served (logged), and then the workers are not to be told."""
        prepared = self.prepare()
        if prepared is not None:
            self._commit(prepared)
        return prepared

    def apply(self, gateway: "Gateway") -> bool:
        """Reload `gateway` (on SIGHUP): False when nothing changed because the new
        settings failed a check (logged).  The audit log is reopened either way."""
        reopen_audit_log()
        prepared = self.prepare()
        if prepared is None:
            return False
        gateway.reload(prepared.config, prepared.security, prepared.tls)
        self._commit(prepared)
        log.info("reloaded: %s", ", ".join(prepared.changed) or "nothing changed")
        return True


def _egress_rules(config: GatewayConfig) -> tuple[Rule, ...]:
    """The parsed rules of a config that start-up or a reload has checked already."""
    return EgressPolicy(config.egress).rules


def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The settings that differ between `old` and `new` and that a reload cannot apply,
    named as in the config file (`port`, `pkcs11.lib`)."""
    names = []
    for field in dataclasses.fields(GatewayConfig):
        name = field.name
        if name == "pkcs11":
            names += [f"pkcs11.{f.name}" for f in dataclasses.fields(old.pkcs11)
                      if getattr(old.pkcs11, f.name) != getattr(new.pkcs11, f.name)]
        elif name in _TLS_ON:
            if bool(getattr(old, name)) != bool(getattr(new, name)):
                names.append(name)
        elif name not in RELOADABLE and getattr(old, name) != getattr(new, name):
            names.append(name)
    return names


def _digests(config: GatewayConfig) -> dict[str, Optional[str]]:
    """SHA-256 of each file the settings name, to tell whether a reload changed it."""
    found: dict[str, Optional[str]] = {}
    for name in _FILES:
        path = getattr(config, name)
        found[name] = None
        if path:
            try:
                with open(path, "rb") as file:
                    found[name] = hashlib.sha256(file.read()).hexdigest()
            except OSError:
                pass
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
