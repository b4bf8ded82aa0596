"""Griffe extension for mkdocstrings: turn the Sphinx roles of our docstrings into checked cross-references.

``:class:`~bilevel.AIDFP``` becomes ``[`AIDFP`][bilevel.AIDFP]``, a mkdocs-autorefs link that
``mkdocs build --strict`` fails on when its target is not rendered. Relative targets (``:meth:`step```
inside a class) are resolved against the class, then the module, then ``bilevel``; targets outside
``bilevel`` (``torch.func.grad``) and private ones become plain code; an absolute ``bilevel.`` path that does
not exist is left as a broken link, so the strict build fails on it. Canonical paths
(``bilevel.solvers.aid_fp.AIDFP``) are replaced by the public path that the API pages render
(``bilevel.AIDFP``). ``Quick use::`` (reST's literal-block marker) becomes ``Quick use:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    out = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            out.extend(_walk(member))
    return out


class RstRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "bilevel":
            return
        public: dict[str, str] = {}  # canonical path -> shortest public alias path
        for mod in (pkg, pkg.members.get("solvers")):
            if mod is None:
                continue
            for name, member in mod.members.items():
                if member.is_alias and not name.startswith("_"):
                    try:
                        target = member.final_target.path
                    except Exception:  # unresolvable alias: keep the canonical path
                        continue
                    path = f"{mod.path}.{name}"
                    if target not in public or len(path) < len(public[target]):
                        public[target] = path

        def lookup(path: str) -> str | None:
            parts = path.split(".")
            if parts[0] != "bilevel":
                return None
            node: Any = pkg
            for part in parts[1:]:
                if part not in node.members:
                    return None
                node = node.members[part]
                if node.is_alias:
                    try:
                        node = node.final_target
                    except Exception:
                        return None
            return node.path

        def publicise(path: str) -> str:
            parts = path.split(".")
            for i in range(len(parts), 0, -1):
                head = ".".join(parts[:i])
                if head in public:
                    return ".".join([public[head], *parts[i:]])
            return path

        def convert(obj: griffe.Object, text: str) -> str:
            scopes = []
            if obj.is_class:
                scopes.append(obj.path)
            if obj.parent is not None and obj.parent.is_class:
                scopes.append(obj.parent.path)
            scopes += [obj.module.path, "bilevel"]

            def repl(m: re.Match[str]) -> str:
                tilde, target = m.groups()
                shown = target.rsplit(".", 1)[-1] if tilde else target
                candidates = [target] if target.startswith("bilevel") else [f"{s}.{target}" for s in scopes]
                for cand in candidates:
                    found = lookup(cand)
                    if found and found != "bilevel" and not any(p.startswith("_") for p in found.split(".")):
                        return f"[`{shown}`][{publicise(found)}]"
                if target.startswith("bilevel.") and lookup(target) is None:
                    return f"[`{shown}`][{target}]"  # a wrong absolute path: left broken, so --strict fails
                return f"`{shown}`"

            text = ROLE.sub(repl, text)
            return re.sub(r"(\w)::\s*$", r"\1:", text, flags=re.M)

        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj, obj.docstring.value)
