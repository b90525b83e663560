"""`ksw1fast token issue`, called in-process with a patched environment."""
from __future__ import annotations

import argparse
import time

import pytest

from ksw1fast.security.tokens import DEFAULT_SECRET_ENV, TokenVerifier
from ksw1fast.cli.token import add_token_commands, main

SECRET = "cli-secret-value-42"


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_SECRET", SECRET)
    monkeypatch.delenv(DEFAULT_SECRET_ENV, raising=False)


def issue(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["token", "issue", *args]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1  # exactly one token
    return out.strip()


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["token", "issue", *args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and SECRET not in captured.err
    return captured.err


def test_issue_prints_a_token_the_gateway_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    token = issue(capsys, "--secret-env", "GW_SECRET", "--ttl", "1h",
                  "--allow", "db.internal:5432", "--allow", "udp *:53",
                  "--allow-udp", "--allow-dns")
    assert SECRET not in token
    grant = TokenVerifier(secret=SECRET.encode()).verify(token)
    assert grant.expires_at is not None
    assert before + 3600 <= grant.expires_at <= time.time() + 3601
    assert grant.allows_open("db.internal", 5432, "tcp")
    assert grant.allows_open("ns.example", 53, "udp")
    assert not grant.allows_open("db.internal", 22, "tcp")
    assert grant.allows_udp and grant.allows_dns("db.internal") and not grant.allows_pkcs11


def test_defaults_env_var_and_ttl(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFAULT_SECRET_ENV, "default-secret")
    token = issue(capsys, "--allow-pkcs11")
    grant = TokenVerifier(secret=b"default-secret").verify(token)
    assert grant.allows_pkcs11 and not grant.allows_udp and not grant.allows_open("x", 1)
    assert grant.expires_at == pytest.approx(time.time() + 3600, abs=5)


@pytest.mark.parametrize("value", [None, ""])
def test_missing_or_empty_secret_exits_2(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("GW_SECRET")
    else:
        monkeypatch.setenv("GW_SECRET", value)
    err = fails(capsys, "--secret-env", "GW_SECRET", "--allow", "x:1")
    assert "environment variable GW_SECRET" in err and "not set or empty" in err


def test_secret_never_echoed_on_other_errors(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, "--secret-env", "GW_SECRET", "--allow", "x:99999")
    assert "destination 'x:99999'" in err
    err = fails(capsys, "--secret-env", "GW_SECRET", "--allow", "udp *:53")
    assert "UDP is not allowed" in err
    err = fails(capsys, "--secret-env", "GW_SECRET")
    assert "would allow nothing" in err


@pytest.mark.parametrize("ttl", ["0", "0s", "soon", "-1h"])
def test_bad_ttl(capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    err = fails(capsys, "--secret-env", "GW_SECRET", f"--ttl={ttl}", "--allow", "x:1")
    assert "--ttl" in err


def test_plugs_into_another_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ksw1fast")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    add_token_commands(sub)
    assert parser.parse_args(["serve"]).command == "serve"
    args = parser.parse_args(["token", "issue", "--secret-env", "GW_SECRET", "--allow", "x:1"])
    assert args.command == "token" and args.run(args) == 0
    assert capsys.readouterr().out.startswith("ksw1.")
