#!/usr/bin/env python3
"""Prints the CHANGELOG.md section of one version: the notes of its GitHub release.

Usage: scripts/release_notes.py X.Y.Z [CHANGELOG]
Exits 1, saying why on stderr, when CHANGELOG.md has no `## [X.Y.Z] - YYYY-MM-DD`
section. The release workflow (.github/workflows/wheels.yml) runs it on the tag's
version; tests/test_release.py reads the changelog with the same `sections()`.
Standard library only: it runs on a bare runner's python3.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

# `## [Unreleased]` or `## [1.2.3] - 2026-12-05`
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>\S+))?\s*$")
# what ends the last section: the link reference definitions and their comment
FOOTER = re.compile(r"^(\[[^\]]+\]: |<!--)")


class Section(NamedTuple):
    name: str              # "Unreleased" or a version
    date: Optional[str]    # as written after " - "; None when there is none
    body: str              # the lines under the heading, stripped of blank ends
    line: int              # the heading's line number, from 1


def sections(text: str) -> list[Section]:
    """The `## [...]` sections in the order they are written (newest first)."""
    found: list[Section] = []
    head: Optional[tuple[str, Optional[str], int]] = None
    body: list[str] = []

    def close() -> None:
        if head is not None:
            found.append(Section(head[0], head[1], "\n".join(body).strip("\n"), head[2]))

    for number, line in enumerate(text.splitlines(), 1):
        match = HEADING.match(line)
        if match:
            close()
            head, body = (match["name"], match["date"], number), []
        elif FOOTER.match(line):
            close()
            head, body = None, []
        elif head is not None:
            body.append(line)
    close()
    return found


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    version = argv[0]
    path = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[1] / "CHANGELOG.md"
    for section in sections(path.read_text(encoding="utf-8")):
        if section.name == version and section.date is not None:
            print(section.body)
            return 0
    print(f"{path}: no '## [{version}] - YYYY-MM-DD' section", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
