"""The documentation runs: docstring examples (doctest), the quickstart's code, the tutorial example, and
``mkdocs build --strict`` (a broken cross-reference, snippet or results section fails it)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
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


def _mkdocs_cmd() -> list[str]:
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    return [exe] if exe else [sys.executable, "-m", "mkdocs"]


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_mkdocs_cmd(), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def _require_docs_extras() -> None:
    pytest.importorskip(
        "mkdocs", reason="docs extras not installed: pip install mkdocs mkdocs-material mkdocstrings[python]"
    )
    pytest.importorskip("mkdocstrings", reason="mkdocstrings[python] not installed")
    pytest.importorskip("material", reason="mkdocs-material not installed")
    pytest.importorskip("latex2mathml", reason="latex2mathml not installed (dev extra): pip install latex2mathml")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation site, built once by ``mkdocs build --strict``."""
    _require_docs_extras()
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = _mkdocs_build(ROOT / "mkdocs.yml", site)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return site


def test_mkdocs_build_strict(site: Path) -> None:
    for page in ("quickstart", "choosing", "math", "table8", "api/solvers", "tutorials/own_meta_learning"):
        assert (site / page / "index.html").exists(), page
    solvers = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert 'id="bilevel.AIDCG"' in solvers and 'href="#bilevel.AIDFP"' in solvers  # rendered, cross-linked
    tutorial = (site / "tutorials" / "own_meta_learning" / "index.html").read_text(encoding="utf-8")
    assert "functional_module" in tutorial and "--8&lt;--" not in tutorial  # the example file was included
    choosing = (site / "choosing" / "index.html").read_text(encoding="utf-8")
    assert "results:" not in choosing and "aid-cg" in choosing  # results sections were included


def _math_hook():
    """docs/_hooks/math_mathml.py as a module (skips when mkdocs or latex2mathml is missing)."""
    pytest.importorskip("mkdocs", reason="docs extras not installed")
    pytest.importorskip("latex2mathml", reason="latex2mathml not installed (dev extra): pip install latex2mathml")
    spec = importlib.util.spec_from_file_location("math_mathml", DOCS / "_hooks" / "math_mathml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _visible_text(page: str) -> str:
    """The text of an HTML page outside code, scripts, styles and math annotations (the TeX sources)."""
    page = re.sub(r"<(pre|code|script|style|annotation)\b.*?</\1>", "", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


@pytest.mark.parametrize(
    "tex,display,expected",
    [
        (r"\nabla F = \nabla_\phi f - J H^{-1} \nabla_\theta f", "block", ["<msub><mo>∇</mo><mi>ϕ</mi>", "<msup>"]),
        (r"H = \frac{\partial^2 g}{\partial\theta\,\partial\theta}", "block", ["<mfrac>", "∂"]),
        (r"p^\top H p \le 0", "inline", ["\N{DOWN TACK}", "≤"]),
        (r"\mathrm{d}\theta^*/\mathrm{d}\phi", "inline", ['<mi mathvariant="normal">d</mi>']),
        (r"\operatorname{diag}(x)", "inline", ["<mo>diag</mo>"]),
        (r"v = \alpha \sum_{j=0}^{K} p_j", "block", ["<munderover><mo>∑</mo>"]),
        (r"\alpha \sum_{j \ge 0} (I - \alpha H)^j", "inline", ["<msub><mo>∑</mo>", "≥"]),
        (r"\left( \frac{a}{b} \right)", "inline", ['fence="true"', ">(</mo>", ">)</mo>"]),
        (r"\|x\| \approx \lVert x \rVert", "inline", ['rspace="0">‖</mo>', "≈"]),
        (r"|\theta| \times |\phi|", "inline", ['lspace="0" rspace="0">|</mo>']),
        (r"\sim (1-\alpha\mu)^K, L/\mu, a \backslash b", "inline", ["<mo>\u223c</mo>", 'rspace="0">/</mo>', ">\\</m"]),
        (r"L_{\text{aux}} + \texttt{tol}", "inline", ["<mtext>aux</mtext>", ">tol</mtext>"]),
        (r"\begin{aligned} a &= b \\ c &= d \end{aligned}", "block", ["<mtable", "<mtr>"]),
        (r"\min_{\phi} F", "block", ["<munder><mo>min</mo>"]),
        (r"\min_{\phi} F", "inline", ["<msub><mo>min</mo>"]),
        (r"\operatorname*{argmin}_x", "block", ['<munder><mo movablelimits="true">argmin</mo>']),
        (r"\arg\min_\theta g", "inline", ["<mo>arg</mo>"]),
        (r"\big\langle x, p \big\rangle", "inline", ["⟨</mo>", "⟩</mo>"]),
        (r"a < b", "inline", ["&lt;"]),
        (r"L_{\text{aux}}(\theta; \phi)", "inline", ["<mo>;</mo>"]),
    ],
)
def test_math_hook_typesets_what_the_docs_use(tex: str, display: str, expected: list[str]) -> None:
    import xml.etree.ElementTree as ET

    hook = _math_hook()
    out = hook.to_mathml(tex, display)
    assert out.startswith(f'<math display="{display}"><semantics>'), out
    for piece in expected:
        assert piece in out, (piece, out)
    root = ET.fromstring(out)  # well-formed
    assert root.find("semantics/annotation").text == tex
    visible = [el.text or "" for el in root.iter() if el.tag != "annotation"]
    assert not any(re.search(r"\\[A-Za-z]", t) for t in visible), out  # no TeX command left in a token
    if "aligned" in tex:
        assert out.count("<mtr>") == 2 and "&amp;" not in out.split("<annotation")[0], out


@pytest.mark.parametrize(
    "tex,reason",
    [
        (r"\foo x", "unknown command"),
        (r"\frac{a}", "instead of 2"),
        (r"\begin{foo} a \end{foo}", "unsupported environment 'foo'"),
        (r"x^{", "latex2mathml failed"),
        (r"\operatorname*{arg\,min}_x", "empty operator"),
    ],
)
def test_math_hook_refuses_what_it_cannot_typeset(tex: str, reason: str) -> None:
    hook = _math_hook()
    with pytest.raises(hook.MathConversionError, match=re.escape(reason)) as info:
        hook.to_mathml(tex, "inline")
    assert repr(tex) in str(info.value)  # the formula is named
    from mkdocs.exceptions import PluginError

    page = f'<p><span class="arithmatex">\\(x\\)</span> and <span class="arithmatex">\\({tex}\\)</span></p>'
    with pytest.raises(PluginError, match=re.escape("on some/page.md")) as info:
        hook.typeset(page, "some/page.md")
    assert repr(tex) in str(info.value)


def test_math_hook_finds_formulas_lost_in_tables() -> None:
    import markdown

    hook = _math_hook()
    extensions = ["tables", "pymdownx.arithmatex", "pymdownx.superfences"]
    configs = {"pymdownx.arithmatex": {"generic": True}}
    code = "Code: `\\(c\\)`, cited \\[1\\].\n\n```python\nx = '\\\\(d\\\\)'\n```\n\n\\[\nz = 1\n\\]\n\n"
    broken = code + "| a | b |\n|---|---|\n| \\(x\\) | \\(|y|\\) |\n"
    fixed = code + "| a | b |\n|---|---|\n| \\(x\\) | \\(\\lvert y\\rvert\\) |\n"
    page = markdown.markdown(broken, extensions=extensions, extension_configs=configs)
    assert hook.lost_formulas(broken, page) == ["|y|"]  # the | split the cell: the formula never became math
    page = markdown.markdown(fixed, extensions=extensions, extension_configs=configs)
    assert hook.lost_formulas(fixed, page) == []
    assert "<math" in hook.typeset(page, "t.md") and "\\(" not in _visible_text(hook.typeset(page, "t.md"))


def test_docs_render_offline(site: Path) -> None:
    """Every formula is MathML in the HTML and no page loads anything from another host (no CDN, no web font)."""
    hook = _math_hook()
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    external = re.compile(r"<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)=\"(?:https?:)?//", re.S)
    for path in pages:
        page = path.read_text(encoding="utf-8")
        rel = path.relative_to(site)
        assert not external.search(page), (rel, external.search(page).group(0))
        assert "fonts.googleapis" not in page and "fonts.gstatic" not in page and "mathjax" not in page.lower(), rel
        assert not re.search(r'class="arithmatex">\s*\\', page), rel  # no span left with raw TeX
        text = _visible_text(page)
        assert not re.search(r"\\[(\[]", text), (rel, re.search(r".{40}\\[(\[].{40}", text, re.S))
    math_page = (site / "math" / "index.html").read_text(encoding="utf-8")
    source = (DOCS / "math.md").read_text(encoding="utf-8")
    formulas = hook.SOURCE_MATH.findall(source)
    known_lost = sum(1 for page, _ in hook.KNOWN_LOST if page == "math.md")
    assert len(formulas) > 50
    # every formula of docs/math.md, typeset
    assert math_page.count("<math ") == len(formulas) - known_lost, (math_page.count("<math "), len(formulas))
    assert math_page.count('<math display="block">') == sum(1 for _, display in formulas if display)


def test_math_in_api_docstrings_and_failures_name_the_page(tmp_path: Path) -> None:
    """A mkdocstrings page gets its docstring math typeset; a formula the hook cannot typeset fails the strict
    build, and the output names the page and the formula."""
    _require_docs_extras()
    (tmp_path / "docs").mkdir()
    (tmp_path / "mathdoc.py").write_text(
        'def hvp(p):\n    r"""Product \\(H p = \\nabla_\\theta \\langle \\nabla_\\theta g, p \\rangle\\).\n\n'
        '    \\[\n    \\nabla F = \\nabla_\\phi f - J H^{-1} \\nabla_\\theta f\n    \\]\n    """\n',
        encoding="utf-8",
    )
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: mathdoc.hvp\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        "site_name: t\ntheme: {name: mkdocs}\n"
        f"hooks: [{DOCS / '_hooks' / 'math_mathml.py'}]\n"
        "plugins: [{mkdocstrings: {handlers: {python: {paths: [.]}}}}]\n"
        "markdown_extensions: [{pymdownx.arithmatex: {generic: true}}]\n",
        encoding="utf-8",
    )
    proc = _mkdocs_build(config, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert page.count("<math ") == 2 and '<math display="block">' in page and "∇" in page, page[-3000:]
    assert not re.search(r"\\[(\[]", _visible_text(page))

    (tmp_path / "docs" / "bad.md").write_text("# Bad\n\nFine \\(x\\), broken \\(\\foo y\\).\n", encoding="utf-8")
    proc = _mkdocs_build(config, tmp_path / "site")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "bad.md" in out and "\\\\foo y" in out, out[-3000:]


@pytest.mark.slow
def test_docs_check_script(tmp_path: Path) -> None:
    """scripts/docs_check.sh builds the site and screenshots the math page with headless Chromium, offline."""
    _require_docs_extras()
    if not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("chromium not installed (apt-get install chromium)")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docs_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png = Path(proc.stdout.strip().splitlines()[-1])
    assert png == tmp_path / "math.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stdout
    assert png.stat().st_size > 50_000  # a rendered page, not a blank one
    assert " 0 raw TeX formulas, 0 external resources" in proc.stdout, proc.stdout
