"""Console entry point ``bilevel-table8``: runs ``python -m benchmarks.efficiency`` (paper Table 8).

The benchmark and the MELTR example live beside the package in the source tree (``benchmarks/``,
``examples/``), not inside the wheel, so this command works from a source checkout installed with
``pip install -e .`` (as ``scripts/venv.sh`` does) and says so otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "efficiency.py").is_file():
        sys.stderr.write(
            "bilevel-table8 runs benchmarks/efficiency.py from the source tree, which this installation does "
            f"not have (looked in {root}). Clone the repository and `pip install -e .` it, or run "
            "`python -m benchmarks.efficiency` from its root.\n"
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.efficiency import main as run

    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
