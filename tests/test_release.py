"""Release hygiene: one version everywhere, a changelog section per release, the
supported Pythons said alike in every place, and a publishing workflow that uses trusted
publishing and nothing else (RELEASING.md).

The suite runs against the installed wheel from outside the source tree: the version
comes from the installed package, the files from the checkout (or sdist) these tests
are in.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import ksw1fast

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}  # Keep a Changelog's
VERSION = re.compile(r"\d+\.\d+\.\d+")

pytestmark = pytest.mark.timeout(60)


def _release_notes() -> ModuleType:
    """scripts/release_notes.py, which the release job runs: one changelog parser for both."""
    spec = importlib.util.spec_from_file_location("release_notes", ROOT / "scripts" / "release_notes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOTES = _release_notes()


def _changelog() -> str:
    return (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def _released() -> list[Any]:
    return [s for s in NOTES.sections(_changelog()) if s.name != "Unreleased"]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _cli_version() -> str:
    """What the installed `ksw1fast` command says to --version."""
    script = Path(sys.executable).with_name("ksw1fast")  # the console script, beside python
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ksw1fast"]
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    name, _, version = result.stdout.strip().partition(" ")
    assert name == "ksw1fast", result.stdout
    return version


# --- one version ---------------------------------------------------------------------

def test_the_cli_the_metadata_the_package_and_the_changelog_name_one_version() -> None:
    # Between releases the version stays that of the newest release and new entries go
    # under [Unreleased]; a release renames [Unreleased] in the commit that bumps the
    # version (RELEASING.md). So the newest released section IS the version.
    newest = _released()[0].name
    found = {
        "ksw1fast --version": _cli_version(),
        'importlib.metadata.version("ksw1fast")': importlib.metadata.version("ksw1fast"),
        "ksw1fast.__version__": ksw1fast.__version__,
        "newest released section of CHANGELOG.md": newest,
    }
    assert len(set(found.values())) == 1, found
    assert VERSION.fullmatch(newest), f"{newest} is not X.Y.Z"


# --- the changelog ---------------------------------------------------------------------

def test_the_changelog_opens_with_unreleased_then_dated_versions_newest_first() -> None:
    sections = NOTES.sections(_changelog())
    assert sections[0].name == "Unreleased" and sections[0].date is None
    released = sections[1:]
    assert released, "no released version"
    for section in released:
        assert VERSION.fullmatch(section.name), f"line {section.line}: [{section.name}]"
        assert section.date and re.fullmatch(r"\d{4}-\d{2}-\d{2}", section.date), (
            f"line {section.line}: [{section.name}] needs ' - YYYY-MM-DD'")
    names = [s.name for s in released]
    assert names == sorted(names, key=_key, reverse=True) and len(set(names)) == len(names)
    dates = [s.date for s in released]
    assert dates == sorted(dates, reverse=True)


def test_each_section_uses_keep_a_changelogs_headings_and_has_entries() -> None:
    for section in NOTES.sections(_changelog()):
        kinds = re.findall(r"^### (.+)$", section.body, re.MULTILINE)
        assert set(kinds) <= KINDS, f"[{section.name}]: {sorted(set(kinds) - KINDS)}"
        assert len(kinds) == len(set(kinds)), f"[{section.name}] repeats a heading"
        if section.name != "Unreleased":
            assert kinds, f"[{section.name}] says nothing"
        for kind, entries in zip(kinds, re.split(r"^### .+$", section.body, flags=re.MULTILINE)[1:]):
            assert re.search(r"^- ", entries, re.MULTILINE), f"[{section.name}] ### {kind} is empty"
            assert "\n\n-" not in entries.strip(), f"[{section.name}] ### {kind} has a blank line"


def test_each_section_has_its_link_and_unreleased_compares_from_the_newest_tag() -> None:
    text = _changelog()
    links = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", text, re.MULTILINE))
    names = [s.name for s in NOTES.sections(text)]
    assert sorted(links) == sorted(names)
    newest = names[1]
    assert links["Unreleased"].endswith(f"/compare/v{newest}...HEAD")
    for name in names[1:]:
        assert links[name].endswith(f"/releases/tag/v{name}")


def test_the_release_notes_are_the_versions_section() -> None:
    newest = _released()[0]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "release_notes.py"), newest.name],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == newest.body + "\n"
    assert "### Added" in result.stdout and "## [" not in result.stdout
    assert "]: " not in result.stdout.splitlines()[-1]  # the link references stay out

    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "release_notes.py"), "0.0.0"],
                             capture_output=True, text=True, timeout=30)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no '## [0.0.0] - YYYY-MM-DD' section" in missing.stderr


def test_sections_end_at_the_next_heading_or_at_the_links() -> None:
    text = ("# Changelog\n\nintro\n\n## [Unreleased]\n\n### Fixed\n- a\n\n"
            "## [1.10.0] - 2027-01-02\n\n### Added\n- b\n\n## [1.9.0] - 2026-12-05\n### Changed\n- c\n\n"
            "<!-- links -->\n[Unreleased]: x\n[1.10.0]: y\n")
    sections = NOTES.sections(text)
    assert [(s.name, s.date, s.body, s.line) for s in sections] == [
        ("Unreleased", None, "### Fixed\n- a", 5),
        ("1.10.0", "2027-01-02", "### Added\n- b", 10),
        ("1.9.0", "2026-12-05", "### Changed\n- c", 15),
    ]


# --- the supported Pythons -------------------------------------------------------------

def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _built() -> set[str]:
    """The CPythons cibuildwheel builds, as `3.14` or `3.14t`."""
    selector = _pyproject()["tool"]["cibuildwheel"]["build"].split()
    found = set()
    for pattern in selector:
        match = re.fullmatch(r"cp3(\d+)(t?)-\*", pattern)
        assert match, f"build selector {pattern!r}: expected cp3XY-* or cp3XYt-*"
        found.add(f"3.{match[1]}{match[2]}")
    return found


def _readme_says() -> set[str]:
    """The README's "Prebuilt wheels" paragraph: `CPython 3.A–3.B and free-threaded 3.Ct...`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = next(p for p in readme.split("\n\n") if p.startswith("Prebuilt wheels:"))
    paragraph = " ".join(paragraph.split())
    span = re.search(r"CPython 3\.(\d+)–3\.(\d+)", paragraph)
    assert span, paragraph
    said = {f"3.{minor}" for minor in range(int(span[1]), int(span[2]) + 1)}
    threaded = re.search(r"free-threaded ((?:3\.\d+t(?:, | and )?)+)", paragraph)
    if threaded:
        said |= set(re.findall(r"3\.\d+t", threaded[1]))
    return said


def test_the_readme_names_the_pythons_that_wheels_are_built_for() -> None:
    assert _readme_says() == _built()


def test_requires_python_and_the_classifiers_match_the_built_pythons() -> None:
    project = _pyproject()["project"]
    gil = sorted((v for v in _built() if not v.endswith("t")), key=lambda v: _key(v))
    assert project["requires-python"] == f">={gil[0]}"
    classified = [c.rpartition(" :: ")[2] for c in project["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert classified == gil
    # a free-threaded build is only built for a version that is built with the GIL too
    assert {v.rstrip("t") for v in _built()} == set(gil)


def test_free_threaded_wheels_are_tested_with_the_gil_on_from_the_start() -> None:
    # the extensions keep the GIL (README): without PYTHON_GIL=1 importing them warns on
    # stderr, which tests that compare a command's stderr would read
    overrides = _pyproject()["tool"]["cibuildwheel"].get("overrides", [])
    gil_on = any(o["select"] == "cp3??t-*" and
                 o.get("test-environment", {}).get("PYTHON_GIL") == "1" for o in overrides)
    assert gil_on or not any(v.endswith("t") for v in _built()), overrides


# --- the publishing workflow -------------------------------------------------------------

def _workflow() -> dict[str, Any]:
    with open(WORKFLOW, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if str(s.get("uses", "")).split("@")[0] == action]


def _uploaded(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [s["with"] for s in _uses(job, "actions/upload-artifact")]


def _downloads(job: dict[str, Any], artifact: str) -> bool:
    """Whether one of the job's download-artifact steps fetches the artifact called so."""
    for step in _uses(job, "actions/download-artifact"):
        given = step.get("with") or {}
        if given.get("name") == artifact:
            return True
        if "name" not in given and re.fullmatch(
                re.escape(given.get("pattern", "*")).replace(r"\*", ".*"), artifact):
            return True
    return False


def test_the_publish_job_uses_trusted_publishing_and_no_token() -> None:
    jobs = _workflow()["jobs"]
    publish = jobs["publish"]
    assert publish["permissions"] == {"id-token": "write"}
    environment = publish["environment"]
    assert (environment if isinstance(environment, str) else environment["name"]) == "pypi"
    assert "startsWith(github.ref, 'refs/tags/v')" in publish["if"]
    assert "github.event_name == 'push'" in publish["if"]
    (upload,) = _uses(publish, "pypa/gh-action-pypi-publish")
    assert not {"password", "user", "api-token", "token"} & set(upload.get("with") or {})
    assert "secrets." not in WORKFLOW.read_text(encoding="utf-8")
    # no other job may mint an OIDC token, and the default token is read-only
    assert _workflow()["permissions"] == {"contents": "read"}
    others = {name: job.get("permissions", {}) for name, job in jobs.items() if name != "publish"}
    assert not [name for name, granted in others.items() if "id-token" in granted]


def test_the_publish_job_uploads_the_sdist_and_every_wheel() -> None:
    jobs = _workflow()["jobs"]
    publish = jobs["publish"]
    assert set(publish["needs"]) >= {"wheels", "sdist"}

    (sdist,) = _uploaded(jobs["sdist"])
    assert sdist["path"] == "dist/*.tar.gz"
    assert any("python -m build --sdist" in s.get("run", "") for s in jobs["sdist"]["steps"])
    assert _downloads(publish, sdist["name"])

    (wheels,) = _uploaded(jobs["wheels"])
    assert wheels["path"] == "wheelhouse/*.whl"
    assert _uses(jobs["wheels"], "pypa/cibuildwheel")
    for os_name in jobs["wheels"]["strategy"]["matrix"]["os"]:
        assert _downloads(publish, wheels["name"].replace("${{ matrix.os }}", os_name)), os_name

    # every download lands where the publish action looks (its default, dist/)
    for step in _uses(publish, "actions/download-artifact"):
        assert step["with"]["path"] == "dist"
    # and the tag is checked against the version before anything is uploaded
    steps = publish["steps"]
    check = next(i for i, s in enumerate(steps) if "ksw1fast-${GITHUB_REF_NAME#v}.tar.gz" in s.get("run", ""))
    assert check < steps.index(_uses(publish, "pypa/gh-action-pypi-publish")[0])


def test_the_github_release_carries_the_same_files_and_the_changelog_section() -> None:
    jobs = _workflow()["jobs"]
    release = jobs["release"]
    assert release["needs"] == ["publish"] and release["if"] == jobs["publish"]["if"]
    assert release["permissions"] == {"contents": "write"}
    assert _downloads(release, "sdist") and _downloads(release, "wheels-ubuntu-24.04")
    runs = " ".join(s.get("run", "") for s in release["steps"])
    assert "scripts/release_notes.py" in runs and "gh release create" in runs
