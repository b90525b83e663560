"""MkDocs hook: the pages that are generated or brought in from outside docs/.

- configuration.md's `<!-- reference: ... -->` markers become tables made from the CLI's
  own argparse parser (every `serve` flag with its TOML key and environment variable)
  and the `--help` of the other commands, so the reference cannot drift from the code.
- changelog.md is CHANGELOG.md (RELEASING.md with it); benchmarks/README.md is the benchmarks' README with its
  result files (plots, JSON, summary), at the same relative paths so its links work.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from ksw1fast.cli import main as cli
from ksw1fast.extensions import NO_EXTENSIONS_VAR, REQUIRE_EXTENSIONS_VAR

ROOT = Path(__file__).resolve().parents[2]
BROUGHT_IN = {"changelog.md": ROOT / "CHANGELOG.md", "RELEASING.md": ROOT / "RELEASING.md",
              "benchmarks/README.md": ROOT / "benchmarks" / "README.md",
              **{f"benchmarks/results/{p.name}": p
                 for p in sorted((ROOT / "benchmarks" / "results").iterdir())}}
_MARKER = re.compile(r"<!-- reference: (\S+) -->")
# CHANGELOG.md's version links are relative to its page on GitHub (../../compare/...),
# which a site elsewhere cannot follow: there the headings stay plain text
_REPOSITORY_LINK = re.compile(r"^\[[^\]]+\]: \.\./\.\./\S+\n", re.M)


def on_files(files: Files, config: Any) -> Files:
    for uri, path in BROUGHT_IN.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == "changelog.md":
        markdown = _REPOSITORY_LINK.sub("", markdown)
    return _MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def _serve_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = cli.build_parser().parse_args(["serve"]).parser
    return parser


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def serve_flags() -> str:
    """One table per argument group of `ksw1fast serve`."""
    env_of: dict[str, list[str]] = {}
    for name, (key, _) in cli.ENV_SETTINGS.items():
        env_of.setdefault(key, []).append(f"`{name}`")
    out = []
    for group in _serve_parser()._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        out += [f"### {group.title}", "", "| flag | TOML key | environment | what |",
                "|---|---|---|---|"]
        for action in actions:
            flag = ", ".join(f"`{o}{' ' + action.metavar if action.metavar else ''}`"
                             for o in action.option_strings)
            key = cli.FLAG_SETTINGS.get(action.dest)
            toml = f"`{key}`" if key else "–"
            if key and "." in key:
                table, name = key.split(".", 1)
                toml = f"`{name}` in `[{table}]`"
            env = ", ".join(env_of.get(key or "", [])) or "–"
            out.append(f"| {flag} | {toml} | {env} | {_cell(action.help or '')} |")
        out.append("")
    return "\n".join(out)


def environment() -> str:
    rows = [(name, f"sets `{key}` (as its flag does)") for name, (key, _) in
            cli.ENV_SETTINGS.items()]
    rows += [(NO_EXTENSIONS_VAR, "`1`: run the pure-Python twins of the compiled hot path"),
             (REQUIRE_EXTENSIONS_VAR, "`1`: exit with one line, instead of falling back to "
                                      "the pure-Python twins, when the compiled extensions "
                                      "cannot be loaded")]
    return "\n".join(["| variable | what |", "|---|---|",
                      *(f"| `{name}` | {what} |" for name, what in rows)])


def command_help() -> str:
    """`--help` of every command but serve (whose flags are the tables above)."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same page anywhere
    parser = cli.build_parser()
    out = []
    for argv in (["--help"], ["check-config", "--help"], ["token", "--help"],
                 ["token", "issue", "--help"]):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            parser.parse_args(argv)
        out += [f"### `ksw1fast {' '.join(argv)}`", "", "```text", text.getvalue().rstrip(),
                "```", ""]
    return "\n".join(out)


GENERATORS = {"serve-flags": serve_flags, "environment": environment,
              "command-help": command_help}
