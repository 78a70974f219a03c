"""The README and docs/: every relative link resolves (a file in the repository, and an anchor on that page where
one is named), the README stays a first screen (at most about 200 lines), and no source file cites design notes
that are not in the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    return headings | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_the_readme_is_a_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210, len(lines)
    assert "ditengine-bench" in "\n".join(lines[:12]) and "python -m pytest" in "\n".join(lines[:16])


def test_design_notes_cited_in_the_code_are_in_the_repository():
    assert (ROOT / "docs" / "design.md").exists()
    stale = [str(p.relative_to(ROOT)) for folder in ("engine", "kernels", "bench", "csrc", "tests")
             for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".h", ".sh")
             and p.name != 'test_docs.py' and re.search(r"(?<![/\w])DESIGN\.md", p.read_text())]
    assert not stale, f"cite docs/design.md, not DESIGN.md: {stale}"
