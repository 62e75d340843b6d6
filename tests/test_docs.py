"""README.md and docs/*.md: every relative link resolves (files and #anchors); every docs page opens with an example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def strip_code(text: str) -> str:
    """The text outside fenced blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    body = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", body, re.M):
        a = anchor(m[1])
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(strip_code(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{page.relative_to(ROOT)}: {target} (no file {file})")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{page.relative_to(ROOT)}: {target} (no heading #{frag} in {dest.relative_to(ROOT)})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_page_starts_with_an_example(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} starts without a title"
    assert lines[1].startswith("```"), f"{page.name}: the first thing under the title is not an example"


def test_readme_fits_on_a_screen_or_three():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_the_check_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Real heading: `x`\n\n[ok](b.md#other-page) [ok](#real-heading-x)\n")
    (tmp_path / "b.md").write_text("# B\n\n## Other page\n\n[bad](a.md#nope) [bad](c.md) `[not a link](d.md)`\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken_links(tmp_path / "a.md") == []
        assert broken_links(tmp_path / "b.md") == [
            "b.md: a.md#nope (no heading #nope in a.md)",
            "b.md: c.md (no file c.md)",
        ]
    finally:
        ROOT = old
    assert anchor("From the paper's release") == "from-the-papers-release"
    assert anchor("Memory per stage: `mole estimate`") == "memory-per-stage-mole-estimate"
