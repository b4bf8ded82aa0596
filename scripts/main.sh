#!/usr/bin/env bash
# The main job of the README: the paper's optimisation-efficiency table (Table 8) on the embedded
# offline data (moving handwritten digits); pretrains the backbone the first time (cached in runs/),
# then fine-tunes MTL and MELTR with each solver, interleaved; writes the table8 section of
# docs/results.md and docs/img/table8_r1_vs_overhead.png. Options: python -m benchmarks.efficiency --help
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python -m benchmarks.efficiency "$@"
