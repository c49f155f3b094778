#!/usr/bin/env bash
# Create .venv-optimum, a second environment for Optimum's ONNX Runtime models (optimum-onnx), which pin
# transformers < 4.58 against the main venv's transformers 5. It holds only what differs (optimum,
# transformers 4.57 and the huggingface-hub and tokenizers it needs) and reads everything else, torch and
# onnxruntime included, from .venv through a .pth file placed after its own packages.
# tests/test_deploy.py runs its Optimum check in a subprocess of this environment.
# Needs .venv (scripts/setup.sh makes it first). Safe to run again: it reinstalls only when this script,
# pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=.venv-optimum
stamp=$ENV/.mptc-installed
want=$(cat "$0" pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -rf "$ENV"
"$PY" -m venv "$ENV"
main=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$main" > "$own/_mptc_main_venv.pth"
"$ENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
  "optimum-onnx==0.1.0" "transformers>=4.57,<4.58"
echo "$want" > "$stamp"
