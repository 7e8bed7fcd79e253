#!/usr/bin/env bash
# Create .venv (once) and install the project with its dev extras into it. Idempotent: a second run
# only checks that the install is current. torch is pinned in pyproject.toml to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,bench]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
