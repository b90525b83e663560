"""Every "§" a reader meets leads into docs/protocol.md or docs/pkcs11.md, to a section
that exists, and nothing in the repository points at the specification it was written
from, which users never get.

A reference names its page before the section numbers ("docs/protocol.md §4",
"pkcs11.md §3", "protocol.md §1–§8, §10") or is a Markdown link to it ("[§4](docs/
protocol.md#4-open-openok-openerr)"); "RFC 6455 §5.5.1" is someone else's and left
alone. Inside protocol.md and pkcs11.md a bare "§6" means that page. Anywhere else a
bare "§" is an error: a reader could not tell which document it means.

Runs against the installed package (scripts/test.sh): the --help texts come from it,
the files from the checkout this test lives in.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import pytest

from ksw1fast.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = {"protocol.md": REPO / "docs" / "protocol.md", "pkcs11.md": REPO / "docs" / "pkcs11.md"}
SOURCE_SUFFIXES = (".py", ".pyx", ".pxd", ".pyi")
# spelled in pieces so that this file does not trip its own check
FORBIDDEN = (".." + "/shared", "shared" + "/spec")

_NUMBER = r"\d+(?:\.\d+)*"
# a range may drop its second "§" ("§1–2"); a list may not ("§6, 64 KiB" is no list)
_RUN = rf"§\s?{_NUMBER}(?:\s*(?:[-–]\s*(?:§\s?)?|(?:,|and|or)\s*§\s?){_NUMBER})*"
# "docs/protocol.md §4", "[pkcs11.md](pkcs11.md) §2", "protocol.md#anchor §4"
_NAMED = re.compile(rf"(?P<doc>protocol|pkcs11)\.md(?P<anchor>#[\w-]+)?\)?\s+(?P<refs>{_RUN})")
# "[§4](docs/protocol.md#4-open-openok-openerr)"
_LINKED = re.compile(rf"\[(?P<refs>{_RUN})\]\((?P<target>[^)\s#]*?(?P<doc>protocol|pkcs11)\.md)"
                     rf"(?P<anchor>#[^)\s]*)?\)")
_EXTERNAL = re.compile(rf"RFC\s?\d+\s+{_RUN}")
_BARE = re.compile(_RUN)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
_SECTION = re.compile(r"(\d+)\.\s")


class Section(NamedTuple):
    number: str
    slug: str


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(doc: str) -> tuple[list[Section], set[str]]:
    """The numbered sections of a page, in order, and the anchors of all its headings."""
    text = DOCS[doc].read_text(encoding="utf-8")
    sections, anchors = [], set()
    for match in _HEADING.finditer(text):
        title = match.group(1)
        anchors.add(slug(title))
        number = _SECTION.match(title)
        if number:
            sections.append(Section(number.group(1), slug(title)))
    return sections, anchors


class Ref(NamedTuple):
    where: str      # the file or --help text it was found in
    text: str       # as written
    doc: Optional[str]  # protocol.md or pkcs11.md; None: which page is not said
    numbers: tuple[str, ...]
    anchor: str = ""
    target: str = ""  # a link's path, as written


def _numbers(run: str) -> tuple[str, ...]:
    """The section numbers of a run: "§1–§3, §10" is 1, 2, 3, 10."""
    tokens = re.findall(rf"{_NUMBER}|[-–]", run)
    numbers: list[str] = []
    pending_range = False
    for token in tokens:
        if token in "-–":
            pending_range = True
            continue
        if pending_range and numbers and numbers[-1].isdigit() and token.isdigit():
            numbers.extend(str(n) for n in range(int(numbers[-1]) + 1, int(token) + 1))
        else:
            numbers.append(token)
        pending_range = False
    return tuple(numbers)


def references(where: str, text: str, page: Optional[str] = None) -> Iterator[Ref]:
    """The § references of `text`; bare ones belong to `page` (None: they are errors)."""
    taken = [False] * len(text)

    def take(match: re.Match[str]) -> bool:
        if any(taken[match.start():match.end()]):
            return False
        taken[match.start():match.end()] = [True] * (match.end() - match.start())
        return True

    for match in _EXTERNAL.finditer(text):
        take(match)
    for pattern in (_LINKED, _NAMED):
        for match in pattern.finditer(text):
            if take(match):
                groups = match.groupdict()
                yield Ref(where, " ".join(match.group(0).split()), f"{groups['doc']}.md",
                          _numbers(groups["refs"]), (groups["anchor"] or "")[1:],
                          groups.get("target") or "")
    for match in _BARE.finditer(text):
        if take(match):
            yield Ref(where, match.group(0), page, _numbers(match.group(0)))
    for index in (i for i, c in enumerate(text) if c == "§" and not taken[i]):
        yield Ref(where, text[max(0, index - 20):index + 20], None, ())


def _files(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in suffixes and p.is_file())


def _parsers(parser: argparse.ArgumentParser, name: str
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def help_texts() -> dict[str, str]:
    """`--help` of `ksw1fast` and of each of its sub-commands (wrapped lines are fine:
    a reference may span them)."""
    return {f"{name} --help": parser.format_help()
            for name, parser in _parsers(build_parser(), "ksw1fast")}


def _check(refs: list[Ref]) -> list[str]:
    """What is wrong with each reference, one line each."""
    known = {doc: headings(doc) for doc in DOCS}
    problems = []
    for ref in refs:
        if ref.doc is None:
            problems.append(f"{ref.where}: {ref.text!r} does not say which document "
                            "it means (write 'protocol.md §N' or 'pkcs11.md §N')")
            continue
        sections, anchors = known[ref.doc]
        numbers = {s.number for s in sections}
        for number in ref.numbers:
            if number not in numbers:
                problems.append(f"{ref.where}: {ref.text!r} points to §{number}, "
                                f"which docs/{ref.doc} does not have")
        if ref.anchor and ref.anchor not in anchors:
            problems.append(f"{ref.where}: {ref.text!r}: docs/{ref.doc} has no "
                            f"heading #{ref.anchor}")
        if ref.target:
            base = (REPO / ref.where).parent
            if (base / ref.target).resolve() != DOCS[ref.doc].resolve():
                problems.append(f"{ref.where}: {ref.text!r}: {ref.target} is not "
                                f"docs/{ref.doc} from there")
    return problems


def _file_refs(path: Path, page: Optional[str] = None) -> list[Ref]:
    return list(references(str(path.relative_to(REPO)), path.read_text(encoding="utf-8"),
                           page))


# -- the pages themselves ---------------------------------------------------------------

def test_protocol_md_keeps_the_protocols_section_numbers() -> None:
    """§1-§11 in order, each once: "§4" means the same section wherever it is cited."""
    sections, _ = headings("protocol.md")
    assert [s.number for s in sections] == [str(n) for n in range(1, 12)]


def test_pkcs11_md_numbers_its_sections_in_order() -> None:
    sections, _ = headings("pkcs11.md")
    assert [s.number for s in sections] == [str(n) for n in range(1, len(sections) + 1)]
    assert len(sections) >= 6  # the RPC's six, then ksw1fast's own


def test_the_pages_own_references_resolve() -> None:
    refs = [ref for doc, path in DOCS.items() for ref in _file_refs(path, doc)]
    assert refs
    assert _check(refs) == []


# -- where readers meet them -------------------------------------------------------------

def test_readme_references_resolve() -> None:
    refs = _file_refs(REPO / "README.md")
    assert {ref.doc for ref in refs} >= {"protocol.md"}  # pkcs11.md: from docs/pkcs11-setup.md
    assert _check(refs) == []


def test_other_docs_references_resolve() -> None:
    others = [p for p in _files(REPO / "docs", (".md",)) if p not in DOCS.values()]
    assert _check([ref for path in others for ref in _file_refs(path)]) == []


def test_help_references_resolve() -> None:
    refs = [ref for where, text in help_texts().items() for ref in references(where, text)]
    assert refs, "no --help text cites a section any more: is the pattern still right?"
    assert _check(refs) == []


def test_source_references_resolve() -> None:
    """Comments and docstrings of the package, as the checkout has them."""
    sources = _files(REPO / "ksw1fast", SOURCE_SUFFIXES)
    assert sources
    refs = [ref for path in sources for ref in _file_refs(path)]
    assert refs
    assert _check(refs) == []


@pytest.mark.parametrize("text, expected", [
    ("see docs/protocol.md §1–§3, §10 and §11", [("protocol.md", ("1", "2", "3", "10", "11"))]),
    ("[§4](docs/protocol.md#4-open-openok-openerr)", [("protocol.md", ("4",))]),
    ("([pkcs11.md](pkcs11.md) §2)", [("pkcs11.md", ("2",))]),
    ("RFC 6455 §5.5.1 and §7.4", []),
    ("spec §4", [(None, ("4",))]),
])
def test_reference_grammar(text: str,
                           expected: list[tuple[Optional[str], tuple[str, ...]]]) -> None:
    assert [(r.doc, r.numbers) for r in references("x", text)] == expected


def test_a_missing_section_is_named() -> None:
    problems = _check(list(references("README.md", "as protocol.md §12 says")))
    assert problems == ["README.md: 'protocol.md §12' points to §12, which "
                        "docs/protocol.md does not have"]


# -- no way out of the repository ------------------------------------------------------

def tracked_files() -> list[Path]:
    """The files git tracks, or every file outside virtual environments and build output
    when this is no git checkout (an unpacked sdist)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"],
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = b""
    if listed:
        return [REPO / name for name in listed.decode().split("\0") if name]
    skip = {".git", "node_modules", "__pycache__", "build", "dist", "wheelhouse"}
    return [p for p in REPO.rglob("*") if p.is_file()
            and not any(part in skip or part.startswith(".venv")
                        for part in p.relative_to(REPO).parts)]


def test_nothing_points_at_the_unpublished_specification() -> None:
    found = []
    for path in tracked_files():
        try:
            data = path.read_bytes()
        except OSError:  # listed by git but deleted in this checkout
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        text = data.decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in FORBIDDEN):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == [], "point at docs/protocol.md or docs/pkcs11.md instead"
