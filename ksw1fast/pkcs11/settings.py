"""The PKCS#11 settings of a gateway: the module, how agents are shared, and their limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ksw1fast.errors import AT_LEAST_1, NOT_NEGATIVE, SettingCheck, check_settings


@dataclass(frozen=True)
class Pkcs11Settings:
    lib: Optional[str] = None              # module path; None = no module configured
    isolation: str = "connection"          # "connection" or "worker"
    pool_size: int = 2                     # pre-started agents (isolation "connection")
    pin_env: Optional[str] = None          # env var holding a gateway-held user PIN
    allow_admin: bool = False              # token administration despite a gateway PIN
    allow: Optional[tuple[str, ...]] = None  # fn names allowed (None = all)
    deny: tuple[str, ...] = field(default_factory=tuple)
    max_out: int = 1 << 20                 # cap on client-given output sizes
    max_calls: int = 16                    # calls in flight per connection; their answers
                                           # are at most max_calls x max_out bytes
    max_agents: int = 8                    # agent processes per worker, starting or running,
                                           # the pool included (docs/pkcs11-setup.md: sizing)

    def __post_init__(self) -> None:
        check_settings(self, _CHECKS, prefix="pkcs11.")
        if self.isolation == "worker" and not self.pin_env:
            raise ValueError("pkcs11 isolation 'worker' shares one login between "
                             "connections: it needs a gateway-held PIN (pin_env)")

    def agent_args(self, shared: bool) -> list[str]:
        """Arguments of `ksw1fast.pkcs11.agent`."""
        args = ["--lib", str(self.lib), "--max-out", str(self.max_out)]
        if self.pin_env:
            args += ["--pin-env", self.pin_env]
        if self.allow_admin:
            args.append("--allow-admin")
        for name in self.allow or ():
            args += ["--allow", name]
        for name in self.deny:
            args += ["--deny", name]
        if shared:
            args.append("--shared")
        return args


_CHECKS: dict[str, SettingCheck] = {
    "isolation": (lambda v: v in ("connection", "worker"), "must be 'connection' or 'worker'"),
    "pool_size": NOT_NEGATIVE, "max_out": AT_LEAST_1, "max_calls": AT_LEAST_1,
    "max_agents": AT_LEAST_1,
}
