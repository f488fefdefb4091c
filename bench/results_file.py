"""Replace one ``## <title>`` section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Write ``text`` (starting with its ``## <title>`` line) in place of that section, or append it."""
    title = text.split("\n", 1)[0]
    if not title.startswith("## "):
        raise ValueError(f"a section starts with '## <title>', got {title!r}")
    body = text.strip("\n") + "\n\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _m: body, old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new.rstrip("\n") + "\n")
    tmp.replace(path)
