"""The TOML configuration file: every GatewayConfig field, PKCS#11 in a [pkcs11] table.

    host = "0.0.0.0"
    token_secret_env = "KSW1FAST_TOKEN_SECRET"
    egress = ["allow tcp db.internal:5432", { action = "deny", host = "10.0.0.0/8" }]

    [pkcs11]
    lib = "/usr/lib/softhsm/libsofthsm2.so"

Errors name the file, the line and the key.  Precedence when serving: built-in defaults,
then this file, then the environment (GATEWAY_*, PKCS11_LIB), then command-line flags.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Union

from ksw1fast.config import GatewayConfig
from ksw1fast.pkcs11.supervisor import Pkcs11Settings
from ksw1fast.policy import Rule, parse_rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


def _hints(cls: type) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


_TABLES = {"": _hints(GatewayConfig), "pkcs11": _hints(Pkcs11Settings)}


def _check(value: Any, hint: Any) -> Any:
    """`value` as the field type `hint` wants it, or TypeError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        return None if value is None else _check(value, args[0])
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return tuple(_check(item, args[0]) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
    return value


def _egress(value: Any) -> Any:
    """Egress rules may be strings or inline tables: checked now, kept as rule strings."""
    if not isinstance(value, list):
        return value
    return [str(Rule.from_mapping(item) if isinstance(item, Mapping) else parse_rule(item))
            if isinstance(item, (str, Mapping)) else item for item in value]


def _workers(value: str) -> Any:
    from ksw1fast.workers import worker_count

    try:
        return worker_count(value)
    except ValueError:
        return value  # reported as a type error with its line


def _line_of(text: str, table: str, key: str) -> int:
    """Best-effort line of `key` (TOML parsers do not keep positions)."""
    start = 0
    if table:
        header = re.search(rf"^\s*\[{re.escape(table)}\]", text, re.M)
        start = header.end() if header else 0
    found = re.compile(rf"^\s*{re.escape(key)}\s*=", re.M).search(text, start)
    return text.count("\n", 0, found.start()) + 1 if found else 0


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """GatewayConfig keyword arguments from a TOML file (`pkcs11` as a dict)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for table, hints in _TABLES.items():
        section = data.get(table, {}) if table else data
        target = values.setdefault(table, {}) if table else values
        if not isinstance(section, dict):
            raise ConfigError(f"{path}:{_line_of(text, '', table)}: '{table}' must be a table")
        for key, value in section.items():
            if not table and key in _TABLES:
                continue
            where = f"{path}:{_line_of(text, table, key)}: key '{f'{table}.' if table else ''}{key}'"
            if key not in hints:
                raise ConfigError(f"{where}: unknown setting")
            if key == "workers" and isinstance(value, str):
                value = _workers(value)
            try:
                target[key] = _check(_egress(value) if key == "egress" else value, hints[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return values


def make_config(values: Mapping[str, Any]) -> GatewayConfig:
    """GatewayConfig from merged settings; ValueError when they do not fit together."""
    values = dict(values)
    pkcs11 = Pkcs11Settings(**values.pop("pkcs11", {}))
    return GatewayConfig(pkcs11=pkcs11, **values)


def check_config_file(path: Union[str, Path]) -> GatewayConfig:
    """Everything serving would check before listening, without listening."""
    from ksw1fast.security import Security

    try:
        config = make_config(read_config_file(path))
        Security(config)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
