"""Every relative link in the project's Markdown points at a file that exists, and at a heading it has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", "runs", "build", "dist", "outputs", "multirun", "node_modules", "data", ".pytest_cache"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    """The project's Markdown files, outside build, run and data folders and benchmarks' raw results (a stored run's
    generated report links plots that were not kept)."""
    return sorted(
        p
        for p in ROOT.rglob("*.md")
        if not SKIP & set(p.relative_to(ROOT).parts)
        and ".egg-info" not in str(p)
        and not p.relative_to(ROOT).as_posix().startswith("benchmarks/results/")
    )


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces as hyphens)."""
    found = set()
    for line in path.read_text().splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    return broken


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Top\n## FP8 (`optim.fp8`)\n[ok](#fp8-optimfp8) [b](b.md#top) [web](https://x.y)\n"
    )
    (tmp_path / "b.md").write_text("# Top\n[gone](c.md) [no heading](a.md#nowhere) [ok](a.md#top)\n")
    assert broken_links(tmp_path / "a.md") == []
    assert broken_links(tmp_path / "b.md") == ["c.md", "a.md#nowhere"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []
