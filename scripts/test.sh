#!/usr/bin/env bash
# The test command of the README: lint, then the default test suite (slow tests excluded).
#   scripts/test.sh            default suite (< 15 min on 2 CPU cores)
#   scripts/test.sh --slow     only the tests marked slow
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
ruff check .
if [ "${1:-}" = "--slow" ]; then
  shift
  exec python -m pytest -m slow "$@"
fi
exec python -m pytest "$@"
