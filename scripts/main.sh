#!/usr/bin/env bash
# The main job of the README: the paper's optimisation-efficiency table (Table 8) on the embedded
# MELTR testbed (docs/testbed.md: moving handwritten digits, frozen CNN features, a domain shift from
# pretraining); starts from the shipped pretrained backbone (nothing is pretrained), fine-tunes MTL and
# MELTR with each solver, interleaved; writes the table8 section of docs/results.md and
# docs/img/table8_r1_vs_overhead.png. Options: python -m benchmarks.efficiency --help
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python -m benchmarks.efficiency --write "$@"
