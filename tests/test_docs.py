"""The README stays short and every link in it and in docs/ leads somewhere: files that exist,
anchors that are headings of the page they point into; the commands it names exist."""

import re
from pathlib import Path

from moe_peft_ds.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readme_is_short_and_points_into_docs():
    assert len((ROOT / "README.md").read_bytes()) <= 15 * 1024
    assert {p.name for p in PAGES[1:]} >= {
        "sieve.md",
        "mixlora.md",
        "distributed.md",
        "megatron.md",
        "continual.md",
        "serving.md",
        "design.md",
        "results.md",
    }
    named = set(re.findall(r"moe-peft-ds (\w[\w-]*)", (ROOT / "README.md").read_text())) - {"command"}
    assert named and named <= set(COMMANDS), named - set(COMMANDS)


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
