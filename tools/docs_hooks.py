"""MkDocs hooks: the Tour page is the README's tour, read at build time so it cannot drift.

docs/tour.md holds a marker line; this replaces it with the README's "## Tour"
section (every line up to the next level-2 heading), with links into docs/
made relative to the site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- the README's tour is inserted here by tools/docs_hooks.py -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_tour(text: str) -> str:
    """The README's "## Tour" section without its heading, links into docs/ rewritten."""
    start = text.index("\n## Tour\n") + len("\n## Tour\n")
    end = text.find("\n## ", start)
    section = text[start : end if end != -1 else len(text)]
    section = re.sub(r"^###", "##", section, flags=re.M)  # one level up on its own page
    return re.sub(r"\]\(docs/", "](", section)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, readme_tour(README.read_text()))
    return markdown
