"""The TOML configuration file: every GatewayConfig field, PKCS#11 in a [pkcs11] table.

    host = "0.0.0.0"
    token_secret_env = "KSW1FAST_TOKEN_SECRET"
    egress = ["allow tcp db.internal:5432", { action = "deny", host = "10.0.0.0/8" }]

    [pkcs11]
    lib = "/usr/lib/softhsm/libsofthsm2.so"

Errors name the file, the line and the key (in a list, the line of the bad item).
Precedence when serving: built-in defaults, then this file, then the environment
(GATEWAY_*, PKCS11_LIB), then command-line flags.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from ksw1fast.config import GatewayConfig
from ksw1fast.errors import MissingExtra, SettingError
from ksw1fast.protocol.errors import KSW1Error
from ksw1fast.pkcs11.settings import Pkcs11Settings
from ksw1fast.security.egress import Rule, parse_rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(KSW1Error, ValueError):
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
        return _items(value, lambda item: _check(item, args[0]))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
    return value


class _BadItem(ValueError):
    """Item `index` of a list setting is wrong: reported at that item's line."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index


def _items(values: list, check: Callable[[Any], Any]) -> tuple:
    """`check` applied to every item; _BadItem says which one it refused."""
    checked = []
    for index, item in enumerate(values):
        try:
            checked.append(check(item))
        except (TypeError, ValueError) as exc:
            raise _BadItem(index, exc) from None
    return tuple(checked)


def _rule(item: Any) -> Rule:
    """An egress rule given as a string or an inline table, parsed once, here."""
    if isinstance(item, Mapping):
        return Rule.from_mapping(item)
    if isinstance(item, str):
        return parse_rule(item)
    raise TypeError(f"expected a rule string or table, got {type(item).__name__}")


def _workers(value: str) -> Any:
    from ksw1fast.ops.workers import worker_count

    try:
        return worker_count(value)
    except ValueError:
        return value  # reported as a type error with its line


def _value(table: str, name: str, value: Any) -> Any:
    """The value of setting `name` of `table` ("" or "pkcs11") as make_config wants it."""
    hints = _TABLES[table]
    if name not in hints:
        raise ValueError("unknown setting")
    if not table and name == "workers" and isinstance(value, str):
        value = _workers(value)
    if not table and name == "egress" and isinstance(value, list):
        return _items(value, _rule)
    return _check(value, hints[name])


def _key_offset(text: str, key: str) -> Optional[int]:
    """Best-effort offset just past `key =` (TOML parsers do not keep positions)."""
    table, _, name = key.rpartition(".")
    start = 0
    if table:
        header = re.search(rf"^[ \t]*\[{re.escape(table)}\]", text, re.M)
        start = header.end() if header else 0
    found = re.compile(rf"^[ \t]*{re.escape(name)}[ \t]*=", re.M).search(text, start)
    return found.end() if found else None


# what finding an array's items needs of TOML: strings and comments whole, else characters
_TOKEN = re.compile("|".join((r'"""[\s\S]*?"""', r"'''[\s\S]*?'''", r'"(?:\\.|[^"\\\n])*"',
                               r"'[^'\n]*'", r"#.*", r"\S")))


def _item_offset(text: str, start: int, index: int) -> Optional[int]:
    """Best-effort offset of item `index` of the array that opens after `start`."""
    depth, seen, item_next = 0, -1, False
    for match in _TOKEN.finditer(text, start):
        token = match.group()
        if token[0] == "#":
            continue
        if item_next and token != "]":  # not after a trailing comma
            seen += 1
            if seen == index:
                return match.start()
        item_next = False
        if token in ("[", "{"):
            depth += 1
            item_next = depth == 1
        elif token in ("]", "}"):
            depth -= 1
            if depth == 0:
                return None
        elif token == "," and depth == 1:
            item_next = True
    return None


def _where(path: Union[str, Path], text: str, key: str, item: Optional[int] = None) -> str:
    """`PATH:LINE: key 'KEY'`, the line of list item `item` when given; no line when the
    key cannot be found."""
    offset = _key_offset(text, key)
    if offset is not None and item is not None:
        offset = _item_offset(text, offset, item) or offset
    line = "" if offset is None else f":{text.count(chr(10), 0, offset) + 1}"
    return f"{path}{line}: key '{key}'"


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Settings from a TOML file, keyed as make_config wants them (`port`, `pkcs11.lib`)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for table in _TABLES:
        section = data.get(table, {}) if table else data
        if not isinstance(section, dict):
            raise ConfigError(f"{_where(path, text, table)}: must be a table")
        for name, value in section.items():
            if table or name not in _TABLES:
                key = f"{table}.{name}" if table else name
                try:
                    values[key] = _value(table, name, value)
                except _BadItem as exc:
                    raise ConfigError(f"{_where(path, text, key, exc.index)}: {exc}") from None
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{_where(path, text, key)}: {exc}") from None
    return values


def located(path: Union[str, Path], error: SettingError) -> ConfigError:
    """`error`, about a setting of the file at `path`, pointing at that setting's line."""
    text = Path(path).read_text(encoding="utf-8")
    return ConfigError(f"{_where(path, text, error.setting)}: {error.reason}")


def make_config(values: Mapping[str, Any]) -> GatewayConfig:
    """GatewayConfig from settings keyed as in the file (`port`, `pkcs11.lib`): SettingError
    names a setting whose value is wrong, ValueError settings that do not fit together."""
    prefix = "pkcs11."
    pkcs11 = {key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)}
    rest = {key: value for key, value in values.items() if not key.startswith(prefix)}
    return GatewayConfig(pkcs11=Pkcs11Settings(**pkcs11), **rest)


def check_config_file(path: Union[str, Path]) -> GatewayConfig:
    """Everything serving would check before listening, without listening; ConfigError
    names the file (and the line where it can) once.  (What it allows but an operator
    rarely means: `ksw1fast.security.gate.config_warnings`.)"""
    from ksw1fast.security.gate import Security
    from ksw1fast.server.gateway import tls_context

    values = read_config_file(path)
    try:
        config = make_config(values)
        Security(config)
        config.require_extras()
        tls_context(config)  # a certificate and key that load (TlsError)
    except SettingError as exc:
        raise located(path, exc) from None
    except (ValueError, OSError, MissingExtra) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
