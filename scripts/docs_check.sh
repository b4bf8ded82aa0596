#!/usr/bin/env bash
# Docs check: build the site (mkdocs build --strict), check that the math page holds typeset MathML and no raw
# TeX, then take a screenshot of it with headless Chromium with every network host unreachable (the site must
# render offline). Prints the path of the PNG; look at it: the formulas must be typeset, not \( ... \) text.
#   scripts/docs_check.sh [OUT_DIR]     default OUT_DIR: a new /tmp/docs_check.XXXXXX
#   PAGE=tutorials/meltr SIZE=1280,2400 scripts/docs_check.sh    another page / window size
# Needs the dev extra (pip install -e ".[dev]": mkdocs, mkdocs-material, mkdocstrings, latex2mathml) and
# Chromium; as root it installs Debian's chromium with apt-get when missing. Not part of the test suite
# (tests/core/test_docs.py checks the built HTML without a browser).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PAGE="${PAGE:-math}"
SIZE="${SIZE:-1280,2400}"
OUT="${1:-$(mktemp -d /tmp/docs_check.XXXXXX)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# (not --quiet: it hides the warnings that --strict counts, and the build would pass with them)
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --site-dir "$OUT/site" >"$OUT/mkdocs.log" 2>&1 \
  || { cat "$OUT/mkdocs.log" >&2; echo "docs_check: mkdocs build --strict FAILED" >&2; exit 1; }
HTML="$OUT/site/$PAGE/index.html"
"$PY" - "$HTML" <<'EOF'
import re, sys
page = open(sys.argv[1], encoding="utf-8").read()
n = len(re.findall(r"<math\b", page))
raw = re.findall(r'class="arithmatex">\s*\\[(\[]', page)
ext = re.findall(r'<(?:script|link|img)\b[^>]*?(?:src|href)="(?:https?:)?//[^"]*"', page)
print(f"docs_check: {sys.argv[1]}: {n} <math> elements, {len(raw)} raw TeX formulas, {len(ext)} external resources")
if raw or ext:
    sys.exit("docs_check: FAILED (raw TeX or an external script/stylesheet/image left)")
EOF

CHROME="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$CHROME" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "docs_check: chromium not found; installing Debian's chromium with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    CHROME="$(command -v chromium)"
  else
    echo "docs_check: chromium not found (as root: apt-get install chromium)" >&2
    exit 1
  fi
fi
# --host-resolver-rules: no host name resolves, so anything fetched from the internet would fail to load.
"$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
  --host-resolver-rules="MAP * ~NOTFOUND" --window-size="$SIZE" \
  --user-data-dir="$OUT/chromium-profile" --screenshot="$OUT/$(echo "$PAGE" | tr / _).png" \
  "file://$HTML" >"$OUT/chromium.log" 2>&1 || { cat "$OUT/chromium.log" >&2; exit 1; }
echo "$OUT/$(echo "$PAGE" | tr / _).png"
