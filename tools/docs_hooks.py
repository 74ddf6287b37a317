"""MkDocs hooks: pages made from the repository's own files at build time, so
they cannot drift.

- docs/tour.md holds a marker line; it is replaced with the README's "## Tour"
  section (every line up to the next level-2 heading).
- docs/changelog.md, security.md and contributing.md each hold a marker line
  naming a file of the repository's top folder (CHANGELOG.md ...); it is
  replaced with that file, less its title (the page has its own).

Links in them are rewritten for the site: docs/X.md becomes X.md, and a
top-level file that is a page of the site becomes that page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
MARKER = "<!-- the README's tour is inserted here by tools/docs_hooks.py -->"
README = TOP / "README.md"
INSERT = re.compile(r"^<!-- ([A-Z]+\.md) is inserted here by tools/docs_hooks\.py -->$", re.M)
# top-level files that are pages of the site, and their pages
PAGES = {
    "CHANGELOG.md": "changelog.md",
    "SECURITY.md": "security.md",
    "CONTRIBUTING.md": "contributing.md",
}


def site_links(text: str, depth: int = 0) -> str:
    """Links into docs/ and to top-level pages rewritten relative to a page
    ``depth`` folders below the site's root."""
    up = "../" * depth
    text = re.sub(r"\]\(docs/", f"]({up}", text)
    for name, page in PAGES.items():
        text = text.replace(f"]({name})", f"]({up}{page})").replace(f"]({name}#", f"]({up}{page}#")
    return text


def readme_tour(text: str) -> str:
    """The README's "## Tour" section without its heading, links into docs/ rewritten."""
    start = text.index("\n## Tour\n") + len("\n## Tour\n")
    end = text.find("\n## ", start)
    section = text[start : end if end != -1 else len(text)]
    section = re.sub(r"^###", "##", section, flags=re.M)  # one level up on its own page
    return site_links(section)


def top_file(name: str) -> str:
    """A top-level file's text without its first-level title, links rewritten."""
    text = (TOP / name).read_text()
    text = re.sub(r"\A# [^\n]*\n+", "", text)
    return site_links(text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, readme_tour(README.read_text()))
    return INSERT.sub(lambda match: top_file(match.group(1)), markdown)
