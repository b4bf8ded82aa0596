"""MkDocs hook: the module graph of ``docs/architecture.md``, generated from the imports in the code.

``<!-- module-graph -->`` on a page becomes (1) which top-level folder imports which (``bilevel``,
``examples``, ``benchmarks``) and (2) a table of every ``bilevel`` module with the ``bilevel`` modules it
imports. Imports are read with :mod:`ast` from every ``.py`` file, including the ones inside functions
(lazy imports count), and relative imports are resolved. ``tests/core/test_dependencies.py`` uses
:func:`imports` to fail when a forbidden edge appears (``bilevel -> examples | benchmarks``,
``examples -> benchmarks``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("bilevel", "examples", "benchmarks")
MARKER = "<!-- module-graph -->"


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports(root: Path = ROOT, folders: tuple[str, ...] = FOLDERS) -> dict[str, set[str]]:
    """``{module: the modules of folders it imports}`` for every ``.py`` file under ``root/folder``."""
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            name = module_name(path, root)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}", root))
            out[name] = {m for m in found if m.split(".")[0] in folders and m != name}
    return out


def folder_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{folder: the other folders it imports}``."""
    edges: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        edges.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top)
    return edges


def render(root: Path = ROOT) -> str:
    graph = imports(root)
    edges = folder_edges(graph)
    lines = ["Folders (an arrow: imports):", "", "```text"]
    lines += [
        f"{top:<10} -> {', '.join(sorted(edges.get(top, ()))) or '(nothing of this repository)'}" for top in FOLDERS
    ]
    lines += ["```", "", "| module | imports (within `bilevel`) |", "|---|---|"]
    for mod in sorted(m for m in graph if m.split(".")[0] == "bilevel"):
        deps = sorted(d for d in graph[mod] if d.startswith("bilevel") and d != "bilevel")
        lines.append(f"| `{mod}` | {', '.join(f'`{d}`' for d in deps) or '-'} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
