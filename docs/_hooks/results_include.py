"""MkDocs hook: include measured sections of ``docs/results.md`` into other pages.

``docs/results.md`` is written by the benchmark scripts between ``<!-- BEGIN name -->`` and
``<!-- END name -->`` markers. A page includes one of those sections, or one sub-section of it, with

    <!-- results: hypergrad_accuracy -->
    <!-- results: hypergrad_accuracy > ridge-d2000: relative error -->
    <!-- results: table8 optional -->

(the text after ``>`` is the start of a heading inside the section, and the sub-section runs to the next
heading of the same or a higher level; or the start of a paragraph line, which runs to the next
heading). An unknown section or heading fails the build, except for ``optional`` sections, which
render a note until the benchmark has written them. Image links are rewritten relative to the
including page. Numbers are never copied into the pages by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

DIRECTIVE = re.compile(
    r"^<!--\s*results:\s*(?P<name>[\w-]+)\s*(?:>\s*(?P<heading>.*?))?\s*(?P<opt>optional)?\s*-->\s*$", re.M
)
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def sections(text: str) -> dict[str, str]:
    """``{name: body}`` of every ``<!-- BEGIN name -->`` ... ``<!-- END name -->`` block of ``text``."""
    found = re.findall(r"<!-- BEGIN ([\w-]+) -->\n(.*?)<!-- END \1 -->", text, re.S)
    return {name: body for name, body in found}


def subsection(body: str, heading: str) -> str:
    """The lines of ``body`` from the heading that starts with ``heading`` to the next one of its level or above.

    ``heading`` may also be the start of a paragraph line: the part then runs to the next heading.
    """
    lines = body.splitlines()
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if (m.group(2) if m else line).strip().startswith(heading):
            level, out = (len(m.group(1)) if m else 6), [line]
            for rest in lines[i + 1 :]:
                n = HEADING.match(rest)
                if n and len(n.group(1)) <= level:
                    break
                out.append(rest)
            return "\n".join(out).rstrip() + "\n"
    raise KeyError(heading)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- results:" not in markdown:
        return markdown
    path = Path(config["docs_dir"]) / "results.md"
    available = sections(path.read_text(encoding="utf-8"))
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth

    def include(m: re.Match[str]) -> str:
        name, heading, optional = m.group("name"), m.group("heading"), m.group("opt")
        if name not in available:
            if optional:
                return (
                    f'!!! note "Not measured yet"\n    The `{name}` section of [results](results.md) has not been '
                    "written yet; run the command above to produce it.\n"
                ).replace("(results.md)", f"({prefix}results.md)")
            raise PluginError(
                f"{page.file.src_uri}: docs/results.md has no section {name!r} (have {sorted(available)})"
            )
        body = available[name]
        if heading:
            try:
                body = subsection(body, heading)
            except KeyError:
                msg = f"{page.file.src_uri}: section {name!r} of docs/results.md has no heading {heading!r}"
                raise PluginError(msg) from None
        if prefix:
            body = re.sub(r"\]\((img/[^)]+)\)", lambda k: f"]({prefix}{k.group(1)})", body)
        return body

    return DIRECTIVE.sub(include, markdown)
