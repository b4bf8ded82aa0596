"""Write one script's section of ``docs/results.md``, leaving every other section as it is.

Shared by the examples and the benchmarks; it lives in ``examples/`` because benchmarks may import
examples, not the reverse.

A section is the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; hand-written
analysis after a ``<!-- notes -->`` line inside a section survives a re-run of its script.
"""

from __future__ import annotations

from pathlib import Path

NOTES = "<!-- notes -->"

__all__ = ["NOTES", "write_section"]


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace section ``name`` of ``path`` with ``body`` (markers appended at the end when missing;
    the file is created with a ``# Results`` title when absent)."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    block = f"{begin}\n{body.rstrip()}\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        section, tail = rest.split(end, 1)
        if NOTES in section:
            block += "\n" + section[section.index(NOTES) :].strip("\n") + "\n"
        text = head + block + end + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + end + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
