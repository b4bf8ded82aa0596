#!/usr/bin/env bash
# The main job of the README: the hypergradient accuracy benchmark on the embedded data sets
# (scikit-learn's diabetes and breast-cancer data, a synthetic design); writes docs/results.md rows.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python -m benchmarks.hypergrad_accuracy "$@"
