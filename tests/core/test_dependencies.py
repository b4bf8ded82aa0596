"""Dependencies point one way: bilevel -> nothing of the repository; examples -> bilevel; benchmarks -> both."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("module_graph", ROOT / "docs" / "_hooks" / "module_graph.py")
graph_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_mod)

FORBIDDEN = {"bilevel": ("examples", "benchmarks"), "examples": ("benchmarks",)}


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if dep.split(".")[0] in FORBIDDEN.get(mod.split(".")[0], ())
    )


def test_no_forbidden_import_in_the_repository():
    graph = graph_mod.imports(ROOT)
    assert "bilevel.solvers.aid" in graph and "examples.meltr_video.finetune" in graph  # the files were read
    assert violations(graph) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "bilevel" / "sub").mkdir(parents=True)
    (tmp_path / "examples").mkdir()
    (tmp_path / "benchmarks").mkdir()
    for d in ("bilevel", "bilevel/sub", "examples", "benchmarks"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "peers.py").write_text("X = 1\n")
    (tmp_path / "bilevel" / "core.py").write_text("def f():\n    from benchmarks.peers import X\n    return X\n")
    (tmp_path / "bilevel" / "sub" / "m.py").write_text("from .. import core\nfrom ..core import f\n")
    (tmp_path / "examples" / "run.py").write_text("import benchmarks.peers\nimport bilevel\n")
    graph = graph_mod.imports(tmp_path)
    assert graph["bilevel.sub.m"] == {"bilevel", "bilevel.core"}
    assert violations(graph) == ["bilevel.core imports benchmarks.peers", "examples.run imports benchmarks.peers"]


def test_the_architecture_page_is_generated():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert graph_mod.MARKER in page
    text = graph_mod.render(ROOT)
    assert "bilevel    -> (nothing of this repository)" in text and "| `bilevel.solvers.aid` |" in text


def test_the_wheel_carries_the_license_and_only_the_package(tmp_path):
    import subprocess
    import sys
    import zipfile

    import pytest

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (pyproject's build requirement)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(ROOT),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("bilevel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "bilevel/solvers/aid.py" in names and "bilevel/_table8.py" not in names
    assert {n.split("/")[0] for n in names} == {"bilevel", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not any(n.endswith("entry_points.txt") for n in names)  # no console script that needs the source tree
