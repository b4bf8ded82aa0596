"""The documentation runs: docstring examples (doctest), the quickstart's code, the tutorial example, and
``mkdocs build --strict`` (a broken cross-reference, snippet or results section fails it)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bilevel

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MODULES = sorted(m.name for m in pkgutil.walk_packages(bilevel.__path__, "bilevel."))


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python[^\n]*\n(.*?)^```", markdown, re.S | re.M)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name} (run: pytest --doctest-modules {name})"


def test_main_api_has_examples() -> None:
    """The main entry points carry runnable examples."""
    for obj in (bilevel.get_solver, bilevel.BilevelProblem, bilevel.functional_module, *bilevel.SOLVERS.values()):
        assert ">>>" in (obj.__doc__ or ""), f"{obj.__qualname__} has no >>> example"


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks((DOCS / "quickstart.md").read_text(encoding="utf-8"))
    assert blocks, "docs/quickstart.md has no python block"
    ns: dict = {"__name__": "quickstart"}
    for block in blocks:
        exec(compile(block, "docs/quickstart.md", "exec"), ns)
    errors = ns["errors"]
    assert set(errors) == set(bilevel.SOLVERS)  # one hypergradient per solver
    for name in ("aid-cg", "aid-fp", "itd"):  # converged at the exact inner minimiser
        assert errors[name] < 1e-10, (name, errors[name])
    assert errors["aid-fp-lite"] > 1e-2  # identity Hessian: biased, as the page says
    assert 1e-4 < errors["stocbio"] < 1.0  # the noise floor of quarter-batch HVPs
    assert "aid-cg" in capsys.readouterr().out


@pytest.mark.parametrize("solver,share", [("itd", False), ("aid-cg", False), ("aid-fp-lite", True)])
def test_own_meta_learning_example(solver: str, share: bool) -> None:
    from examples.own_meta_learning import main

    out = main(solver=solver, steps=100, share=share)
    # the meta-network learns to down-weight the samples with flipped labels (with the sign of the
    # hypergradient reversed it learns the opposite: 0.33 vs 0.23 for itd, measured)
    assert out["w_noisy"] < out["w_clean"], out
    assert out["meta_acc"] > 0.55, out


def test_results_include_hook() -> None:
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        import results_include as hook
    finally:
        sys.path.pop(0)
    text = "# R\n<!-- BEGIN a -->\n## A\n### x: one\nt1\n### y\nt2\nPara start\nrow\n<!-- END a -->\n"
    sections = hook.sections(text)
    assert list(sections) == ["a"]
    assert hook.subsection(sections["a"], "x:") == "### x: one\nt1\n"
    assert hook.subsection(sections["a"], "Para") == "Para start\nrow\n"
    with pytest.raises(KeyError):
        hook.subsection(sections["a"], "missing")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip(
        "mkdocs", reason="docs extras not installed: pip install mkdocs mkdocs-material mkdocstrings[python]"
    )
    pytest.importorskip("mkdocstrings", reason="mkdocstrings[python] not installed")
    pytest.importorskip("material", reason="mkdocs-material not installed")
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    cmd = [exe] if exe else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("quickstart", "choosing", "math", "table8", "api/solvers", "tutorials/own_meta_learning"):
        assert (site / page / "index.html").exists(), page
    solvers = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert 'id="bilevel.AIDCG"' in solvers and 'href="#bilevel.AIDFP"' in solvers  # rendered, cross-linked
    tutorial = (site / "tutorials" / "own_meta_learning" / "index.html").read_text(encoding="utf-8")
    assert "functional_module" in tutorial and "--8&lt;--" not in tutorial  # the example file was included
    choosing = (site / "choosing" / "index.html").read_text(encoding="utf-8")
    assert "results:" not in choosing and "aid-cg" in choosing  # results sections were included
