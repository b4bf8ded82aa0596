# ruff: noqa: E501  (the catalogue is a table, one entry a line)
"""The bad inputs tried for the reliability issue (issue 14), each with the test that refuses it.

Every entry names a test function; the test below fails when a named test disappears or is renamed, so the
list cannot silently rot. Counts: see ``test_catalogue_counts`` (printed with ``pytest -s``).

| # | bad input (issue 14 item) | refused with | test |
|---|---|---|---|
| 1 | a bit flipped inside a tensor record of a checkpoint (1) | ValueError naming file and member | tests/core/test_checkpoint.py::test_a_bit_flipped_checkpoint_is_refused |
| 2 | a truncated, foreign or missing checkpoint file (1) | ValueError / FileNotFoundError naming the file | tests/core/test_checkpoint.py::test_truncated_foreign_and_missing_files_give_clear_errors |
| 3 | resume with another TrainerConfig or solver option (2) | ValueError naming every differing field | tests/core/test_checkpoint.py::test_resume_with_another_configuration_is_refused |
| 4 | finetune --resume with other trajectory settings (2) | ValueError before anything is loaded | tests/examples/test_meltr_finetune.py::test_resume_with_other_settings_is_refused_before_loading |
| 5 | the Table 8 smoke run writing docs/ (3) | never writes (--tiny refuses --write) | tests/examples/test_meltr_efficiency.py::test_tiny_never_writes_docs |
| 6 | a hypergradient in train mode with BatchNorm, every solver and product mode (4) | buffers unchanged | tests/core/test_buffers.py::test_hypergradient_leaves_buffers_unchanged |
| 7 | a hyper step folding the meta batch into BatchNorm statistics (4) | only the inner update writes them | tests/core/test_buffers.py::test_trainer_updates_buffers_in_inner_steps_only |
| 8 | AIDFP(alpha=2.2/L): a slowly growing Neumann series; NaN curvature (5) | NeumannDivergenceError, "non-finite" | tests/core/test_errors.py::test_slow_neumann_growth_is_divergence_and_nan_is_named |
| 9 | ITD(steps=50, lr=3/L) blowing up (5) | ITDDivergenceError | tests/core/test_itd_truncate.py::test_lr_above_2_over_L_raises |
| 10 | ITD with non-finite iterates (5) | ITDDivergenceError naming it non-finite | tests/core/test_itd_truncate.py::test_non_finite_iterates_are_named_non_finite |
| 11 | benchmarks.efficiency --K 0, --epochs 0/-1, --iters -1, --seeds -2, --threads 0, split sizes (6) | argparse error, exit 2, before any work | tests/examples/test_meltr_efficiency.py::test_bad_arguments_fail_before_any_work |
| 12 | finetune with a missing --pretrained file, --threads 0 (6) | argparse error, exit 2, before any work | tests/examples/test_meltr_finetune.py::test_cli_refuses_a_missing_pretrained_file_and_bad_threads |
| 13 | a PEER:METHOD solver label without a solver object (6) | ValueError naming the way to build it | tests/examples/test_meltr_efficiency.py::test_peer_spec_errors |
| 14 | an objective without an autograd graph (constant, .item()) (7) | ValueError naming the objective | tests/core/test_errors.py::test_an_objective_without_a_graph_is_named |
| 15 | malformed / non-UTF-8 / ragged / complex MSRVTT, YouCook2 and MOSI files (8) | ValueError naming the file (26 cases) | tests/examples/test_loader_errors.py::test_bad_input_is_refused_naming_the_file |
| 16 | a YouCook2 segment past the last feature (8) | refused unless clip_segments=True (counted) | tests/examples/test_loader_errors.py::test_youcook_clip_segments_is_explicit_and_counted |
| 17 | fit(log_every=0, epochs=-1, max_steps=-3), resume without a path, a directory as checkpoint path (9) | ValueError before any step | tests/core/test_checkpoint.py::test_fit_arguments_are_checked_before_any_step |
| 18 | an SGD checkpoint into an Adam trainer; a checkpoint missing keys (9) | refused, nothing changed | tests/core/test_checkpoint.py::test_a_failed_load_changes_nothing |
| 19 | get_solver("stocbio", batches=5) (10) | TypeError at construction | tests/core/test_errors.py::test_stocbio_batches_must_be_iterable |
| 20 | TensorBoard logging never read back (components) | events equal the JSONL / CSV | tests/core/test_tensorboard.py::test_tensorboard_events_match_jsonl_and_csv |
| 21 | METEOR without Java silently missing (components) | MeteorUnavailableError / warning | tests/examples/test_caption_scorer.py::test_meteor_without_java_says_so |
| 22 | math that renders only with a CDN (components) | MathML in the built HTML, no external host | tests/core/test_docs.py::test_docs_render_offline |
| 23 | SAMA with an inner optimizer it has no preconditioner for | TypeError naming the optimizer | tests/core/test_sama.py::test_other_optimizers_and_bad_input_are_refused |
| 24 | a partly finished cached fine-tuning run read back as finished | trained again | tests/examples/test_testbed.py::test_cached_run_is_read_back_only_when_finished |
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = re.findall(r"^\| (\d+) \|(.+?)\| (tests/\S+)::(\w+) \|$", __doc__ or "", re.M)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_catalogue_counts() -> None:
    assert [int(r[0]) for r in ROWS] == list(range(1, len(ROWS) + 1)), "rows numbered 1..N"
    assert len(ROWS) >= 24
    print(f"{len(ROWS)} bad-input entries, {len({(r[2], r[3]) for r in ROWS})} distinct tests")


@pytest.mark.parametrize(("number", "what", "path", "name"), ROWS, ids=[r[0] for r in ROWS])
def test_every_listed_test_exists(number: str, what: str, path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"entry {number}: {path} is gone"
    assert name in _test_names(file), f"entry {number} ({what.strip()}): {path} has no test {name}"
