#!/usr/bin/env bash
# Install the peer libraries used as benchmark baselines and test oracles (benchmarks/peers.py,
# tests/core/test_oracles.py) into the ACTIVE environment, without touching torch.
#
#   source scripts/venv.sh && bash scripts/install_peers.sh
#
# Every peer depends on torch; an unpinned resolve would replace the local CPU torch with a multi-GB
# CUDA build. So each peer is installed with --no-deps, its light dependencies are listed explicitly,
# and torch is pinned to the installed version as a constraint. Best effort: a peer that fails to
# install is reported and skipped (the oracle tests then skip with a reason); the script exits 0
# (1 only if torch itself changed or does not import). A peer already installed at the pinned
# version is left alone. Versions can be overridden: HIGHER_VERSION, TORCHOPT_VERSION, BETTY_VERSION.
#   higher==0.2.1    pure Python; needs only torch.
#   torchopt==0.7.3  needs optree, graphviz (the PyPI package), typing-extensions, numpy. Its C++
#                    extension does not load against this torch; it falls back to its Python code.
#   betty-ml==0.2.1  declares Requires-Python <3.11 but imports and runs on 3.11: --ignore-requires-python.
set -uo pipefail

PY="${PYTHON:-python}"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" || {
  echo "install_peers: torch does not import in $("$PY" -c 'import sys; print(sys.prefix)' 2>/dev/null); activate the venv first" >&2
  exit 1
}
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==${TORCH_VERSION}" >"$CONSTRAINT"

pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINT" "$@"
}

installed() {  # name, version, import name: true if that version is installed and imports
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" >/dev/null 2>&1 \
    && "$PY" -c "import $3" >/dev/null 2>&1
}

install_peer() {  # name, version, import name, then extra pip arguments
  local name="$1" version="$2" module="$3"
  shift 3
  if installed "$name" "$version" "$module"; then
    echo "install_peers: ${name} ${version} already installed"
    return 0
  fi
  if pip_install --no-deps "$@" "${name}==${version}" && "$PY" -c "import ${module}" >/dev/null 2>&1; then
    echo "install_peers: ${name} OK ($("$PY" -c "import importlib.metadata as m; print(m.version('${name}'))"))"
  else
    echo "install_peers: ${name} FAILED to install or import; its adapters and oracle tests will be skipped" >&2
  fi
}

HIGHER_VERSION="${HIGHER_VERSION:-0.2.1}"
TORCHOPT_VERSION="${TORCHOPT_VERSION:-0.7.3}"
BETTY_VERSION="${BETTY_VERSION:-0.2.1}"

start=$SECONDS
install_peer higher "$HIGHER_VERSION" higher
if ! installed torchopt "$TORCHOPT_VERSION" torchopt; then
  pip_install "optree>=0.4.1" graphviz "typing-extensions>=4.0.0" numpy \
    || echo "install_peers: torchopt's dependencies (optree, graphviz) failed to install" >&2
fi
install_peer torchopt "$TORCHOPT_VERSION" torchopt
install_peer betty-ml "$BETTY_VERSION" betty --ignore-requires-python

after="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo missing)"
if [ "$after" != "$TORCH_VERSION" ]; then
  echo "install_peers: ERROR torch changed from ${TORCH_VERSION} to ${after}" >&2
  exit 1
fi
echo "install_peers: done in $((SECONDS - start)) s; torch ${after} untouched"
exit 0
