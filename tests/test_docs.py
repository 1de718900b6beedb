"""The README and docs/ stay true: short enough to read, every relative link resolves, the file map's line counts
are the files' own."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_and_starts_with_the_mask():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15_000
    assert text.index("the VoCo mask") < 2_000  # in the first screenful
    assert not re.search(r"\bissue\s*#?\d", text, flags=re.I)  # issue numbers mean nothing to a user


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_file_map_line_counts_are_current():
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) >= 20
    for path, stated in rows:
        actual = sum(1 for _ in open(ROOT / path))
        assert abs(actual - int(stated)) <= max(10, 0.15 * actual), f"{path}: README says {stated}, it has {actual}"
