# Sourced by the other scripts: create .venv with the pinned CPU torch if missing, then activate it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, bilevel, pytest, sklearn, tensorboard, pycocoevalcap, latex2mathml" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # Pin torch: 2.13.0 is a local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[dev]"
  # Peers (higher, torchopt, betty-ml) for oracle tests and benchmarks; best effort, never replaces torch.
  PYTHON=.venv/bin/python bash scripts/install_peers.sh || echo "venv.sh: peers not installed; oracle tests will skip"
fi
# Java for the captioning metrics (pycocoevalcap's METEOR and PTB tokenizer run java); only when missing.
if ! command -v java >/dev/null 2>&1; then
  echo "venv.sh: java not found; installing default-jre-headless with apt-get (needed for METEOR)" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      default-jre-headless; } >/tmp/venv-java-install.log 2>&1; then
    echo "venv.sh: could not install Java: apt-get failed or is missing (it needs root; see /tmp/venv-java-install.log)." >&2
    echo "venv.sh: the METEOR tests will be skipped and caption_metrics(with_meteor=True) will raise." >&2
  fi
fi
# shellcheck disable=SC1091
source .venv/bin/activate
