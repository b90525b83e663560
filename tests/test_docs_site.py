"""The documentation site builds with `mkdocs build --strict` (any warning fails: a broken
link, a page missing from the nav, a docstring the API pages cannot render), and its
configuration reference names every `serve` flag, TOML key and environment variable,
because it is generated from the parser (docs/hooks/site.py).
"""
from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ksw1fast.cli import main as cli

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
         "-d", str(out)],
        cwd=out, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    for page in ("index", "quickstart", "configuration", "security", "operations",
                 "pkcs11-setup", "protocol", "pkcs11", "deployment", "api", "architecture",
                 "benchmarks/README", "changelog"):
        assert (site / page / "index.html").is_file() or (site / f"{page}.html").is_file() \
            or (site / page.replace("/README", "") / "index.html").is_file(), page
    for plot in ("throughput.png", "latency.png", "memory.png"):
        assert (site / "benchmarks" / "results" / plot).is_file(), plot


def test_the_configuration_reference_has_every_flag_key_and_variable(site: Path) -> None:
    text = _text(site / "configuration" / "index.html")
    serve = cli.build_parser().parse_args(["serve"]).parser
    flags = [o for a in serve._actions if a.help != argparse.SUPPRESS
             for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert len(flags) > 30
    missing = [flag for flag in flags if flag not in text]
    assert not missing, missing
    keys = [key.split(".")[-1] for key in cli.FLAG_SETTINGS.values()]
    assert not [key for key in keys if key not in text]
    assert not [name for name in cli.ENV_SETTINGS if name not in text]
    assert "KSW1FAST_NO_EXTENSIONS" in text and "ksw1fast token issue --help" in text


def test_the_api_pages_come_from_the_docstrings(site: Path) -> None:
    text = _text(site / "api" / "index.html")
    for name in ("start_gateway", "GatewayConfig", "KSW1Client", "open_connection"):
        assert name in text, name
