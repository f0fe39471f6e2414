"""The documentation as the tests read it: README.md and the pages under docs/, and the
fenced code blocks in them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# a fenced block: ```lang at the start of a line, up to the next ``` at the start of a line
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def page(name: str) -> str:
    """The text of a page: a path under docs/ (``"guide/python-api.md"``), or ``"README.md"``."""
    return (ROOT / name if name == "README.md" else DOCS / name).read_text()


def pages() -> list[str]:
    """README.md and every Markdown page under docs/, as :func:`page` names them."""
    return ["README.md", *sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))]


def code_blocks(text: str, language: str | None = None) -> list[tuple[str, str]]:
    """Every fenced block of ``text`` as (language, code), in order; only ``language``'s if given
    ("" for a block without one)."""
    blocks = [(match.group(1), match.group(2)) for match in FENCE.finditer(text)]
    return [block for block in blocks if language is None or block[0] == language]


def code_block_after(text: str, marker: str, language: str = "python") -> str:
    """The code of the first ``language`` block after the first occurrence of ``marker``."""
    blocks = code_blocks(text[text.index(marker) :], language)
    if not blocks:
        raise LookupError(f"no ```{language} block after {marker!r}")
    return blocks[0][1]
