"""Named sections of benchmarks/RESULTS.md that scripts other than run_benchmarks.py own.

A section sits between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->``; each script
replaces its own section and leaves the rest of the file alone, and ``run_benchmarks.py`` keeps
every section when it rewrites the file.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->\n?", re.S)


def wrap(name: str, text: str) -> str:
    """``text`` between the markers of section ``name``."""
    return f"<!-- section:{name} -->\n{text.rstrip()}\n<!-- /section:{name} -->\n"


def replace_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace section ``name`` of ``path`` with ``text`` (appended if absent)."""
    current = path.read_text() if path.is_file() else ""
    block = wrap(name, text)
    if _pattern(name).search(current):
        updated = _pattern(name).sub(lambda _: block, current)
    else:
        updated = current.rstrip() + "\n\n" + block
    path.write_text(updated)


def sections(path: Path = RESULTS) -> list[str]:
    """Every section block of ``path``, markers included, in order."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [m.group(0) for m in re.finditer(r"<!-- section:([\w-]+) -->.*?<!-- /section:\1 -->\n?", text, re.S)]
