"""The TOML configuration file, `ksw1fast check-config`, and settings precedence."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ksw1fast.cli import build_parser, config_from_args
from ksw1fast.config_file import ConfigError, check_config_file, read_config_file

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
    assert config.egress == ("allow tcp db.internal:5432", "deny any 10.0.0.0/8")
    assert config.pkcs11.lib == "/usr/lib/softhsm/libsofthsm2.so"
    assert config.pkcs11.deny == ("InitToken",)
    assert config.pkcs11.max_agents == 4


@pytest.mark.parametrize("text,where,what", [
    ('port = 1\nprot = 2\n', ":2: key 'prot'", "unknown setting"),
    ('port = "80"\n', ":1: key 'port'", "expected int"),
    ('[pkcs11]\nisolation = 3\n', ":2: key 'pkcs11.isolation'", "expected str"),
    ('egress = ["allow tcp x:0"]\n', ":1: key 'egress'", "ports"),
    ('port = \n', "", "Invalid value"),
])
def test_errors_name_line_and_key(tmp_path, text, where, what) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert where in str(info.value) and what in str(info.value)


def test_settings_that_do_not_fit_together(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('host = "0.0.0.0"\n')  # non-loopback without auth
    with pytest.raises(ConfigError, match="without auth"):
        check_config_file(path)
    path.write_text('[pkcs11]\nmax_agents = 0\n')
    with pytest.raises(ConfigError, match="max_agents >= 1"):
        check_config_file(path)


def test_check_config_command(example, tmp_path) -> None:
    ok = subprocess.run([sys.executable, "-m", "ksw1fast", "check-config", str(example)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("max_streams = true\n")
    result = subprocess.run([sys.executable, "-m", "ksw1fast", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "key 'max_streams'" in result.stderr


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
