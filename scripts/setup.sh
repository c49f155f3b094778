#!/usr/bin/env bash
# Create .venv and install mptc with its test tools. Safe to run again: it reinstalls
# only when pyproject.toml or constraints.txt changed.
# torch is pinned by constraints.txt so pip takes the CPU wheel rather than a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mptc-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
# Optimum's ONNX Runtime models pin an older transformers: their own environment (tests/test_deploy.py)
bash scripts/optimum-env.sh
