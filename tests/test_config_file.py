"""The TOML configuration file, `ksw1fast check-config`, and settings precedence."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksw1fast.cli.main import build_parser, config_from_args
from ksw1fast.cli.config_file import ConfigError, check_config_file

EXAMPLE = """\
host = "0.0.0.0"
port = 9000
token_file = "{tokens}"
allow_origins = ["https://app.example.com"]
egress = ["allow tcp db.internal:5432", {{ action = "deny", host = "10.0.0.0/8" }}]
connect_timeout = 3

[pkcs11]
lib = "/usr/lib/softhsm/libsofthsm2.so"
isolation = "connection"
deny = ["InitToken"]
max_agents = 4
"""


@pytest.fixture
def example(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("sha256:" + "0" * 64 + "\n")
    path = tmp_path / "ksw1fast.toml"
    path.write_text(EXAMPLE.format(tokens=tokens))
    return path


def test_a_complete_file_checks_out(example) -> None:
    config = check_config_file(example)
    assert (config.host, config.port, config.connect_timeout) == ("0.0.0.0", 9000, 3.0)
    assert tuple(map(str, config.egress)) == ("allow tcp db.internal:5432", "deny any 10.0.0.0/8")
    assert config.pkcs11.lib == "/usr/lib/softhsm/libsofthsm2.so"
    assert config.pkcs11.deny == ("InitToken",)
    assert config.pkcs11.max_agents == 4


@pytest.mark.parametrize("text,where,what", [
    ('port = 1\nprot = 2\n', ":2: key 'prot'", "unknown setting"),
    ('port = "80"\n', ":1: key 'port'", "expected int"),
    ('[pkcs11]\nisolation = 3\n', ":2: key 'pkcs11.isolation'", "expected str"),
    ('egress = ["allow tcp x:0"]\n', ":1: key 'egress'", "ports"),
    ('port = 1\n\nprot = 2\n', ":3: key 'prot'", "unknown setting"),  # after a blank line
    ('max_streams = 0\n', ":1: key 'max_streams'", "must be >= 1, got 0"),
    ('"max.streams" = 1\n', ": key 'max.streams'", "unknown setting"),  # a quoted dot
    ('port = \n', "", "Invalid value"),
])
def test_errors_name_line_and_key(tmp_path, text, where, what) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        check_config_file(path)
    assert where in str(info.value) and what in str(info.value)


def test_settings_that_do_not_fit_together(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('host = "0.0.0.0"\n')  # non-loopback without auth
    with pytest.raises(ConfigError, match="without auth"):
        check_config_file(path)
    path.write_text('[pkcs11]\nmax_agents = 0\n')
    with pytest.raises(ConfigError, match="key 'pkcs11.max_agents': must be >= 1, got 0"):
        check_config_file(path)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m ksw1fast ARGS`; a `serve` that wrongly starts times out instead."""
    return subprocess.run([sys.executable, "-m", "ksw1fast", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env=env if env is not None else os.environ)


def test_check_config_command(example, tmp_path) -> None:
    ok = _run("check-config", str(example))
    assert (ok.returncode, ok.stdout) == (0, f"{example}: ok\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_streams = true\n")
    result = _run("check-config", str(bad))
    assert (result.returncode, result.stderr) == (
        2, f"ksw1fast: {bad}:1: key 'max_streams': expected int, got bool\n")


def test_precedence_file_then_environment_then_flags(example, monkeypatch) -> None:
    args = build_parser().parse_args(["serve", "--config", str(example)])
    assert config_from_args(args).port == 9000
    monkeypatch.setenv("GATEWAY_PORT", "9100")
    assert config_from_args(args).port == 9100
    args = build_parser().parse_args(["serve", "--config", str(example), "--port", "9200",
                                      "--egress", "deny any 192.0.2.0/24",
                                      "--pkcs11-max-agents", "6"])
    config = config_from_args(args)
    assert config.port == 9200
    assert config.pkcs11.max_agents == 6
    assert config.egress == ("deny any 192.0.2.0/24",)  # a flag replaces the file's list


@pytest.mark.parametrize("rule, reason", [
    ('"allow tcp x:0"', "rule 'allow tcp x:0': ports '0' must lie in 1-65535, low first"),
    ('{ action = "allow", proto = "tcp", host = "x", ports = "0" }',
     "rule {'action': 'allow', 'proto': 'tcp', 'host': 'x', 'ports': '0'}: ports '0' must "
     "lie in 1-65535, low first"),
    ("5", "expected a rule string or table, got int"),
])
def test_check_config_names_the_file_once_and_the_line_of_a_bad_rule(
        tmp_path: Path, rule: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"""\
port = 8088
egress = [  # a multi-line array: each rule on its own line
  "allow tcp db.internal:5432",  # a comment, with [brackets], {{braces}} and "quotes"
  {{ action = "deny", host = "10.0.0.0/8" }},

  {rule},
  "allow udp 10.0.0.53:53",
]
""")
    result = _run("check-config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"ksw1fast: {path}:6: key 'egress': {reason}\n"


def test_a_port_out_of_range_in_the_file_is_refused_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('path = "/ws"\nport = 70000\n')
    error = f"{path}:2: key 'port': must be 0-65535, got 70000"
    check = _run("check-config", str(path))
    assert (check.returncode, check.stderr) == (2, f"ksw1fast: {error}\n")
    serve = _run("serve", "--config", str(path))
    assert serve.returncode == 2
    assert serve.stderr.startswith("usage: ksw1fast serve ")
    assert serve.stderr.splitlines()[-1] == f"ksw1fast serve: error: {error}"


def test_an_unset_pin_variable_fails_check_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pkcs11]\nlib = "/usr/lib/softhsm/libsofthsm2.so"\n'
                    'pin_env = "KSW1FAST_NO_PIN"\n')
    env = {name: value for name, value in os.environ.items() if name != "KSW1FAST_NO_PIN"}
    result = _run("check-config", str(path), env=env)
    assert (result.returncode, result.stderr) == (
        2, f"ksw1fast: {path}: environment variable KSW1FAST_NO_PIN (the PKCS#11 PIN) is not "
           "set or empty\n")
    assert _run("check-config", str(path), env={**env, "KSW1FAST_NO_PIN": "1234"}).returncode == 0


def test_check_config_warns_of_a_jwks_without_audience(tmp_path: Path) -> None:
    """Valid, so exit 0, but every token the provider's keys sign would be accepted."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    path = tmp_path / "c.toml"
    path.write_text(f'jwt_jwks = "{jwks}"\n')
    result = _run("check-config", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: ok\n")
    assert result.stderr.startswith(f"{path}: warning: jwt_jwks without jwt_audience: ")
    assert len(result.stderr.splitlines()) == 1
    path.write_text(f'jwt_jwks = "{jwks}"\njwt_audience = "ksw1fast"\n')
    result = _run("check-config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")
