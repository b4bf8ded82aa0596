# Sourced by the other scripts: create .venv with the pinned CPU torch if missing, then activate it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, bilevel, pytest, sklearn" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # Pin torch: 2.13.0 is a local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[dev]"
  # Peers (higher, torchopt, betty-ml) for oracle tests and benchmarks; best effort, never replaces torch.
  PYTHON=.venv/bin/python bash scripts/install_peers.sh || echo "venv.sh: peers not installed; oracle tests will skip"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
