#!/usr/bin/env bash
# The main job on a shipped example: check and summarise a spec, compile it to a model dir
# and to ONNX, then run it in PyTorch and in ONNX Runtime and show that they agree.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
SPEC=${1:-examples/gpt2-small.mpt}
NAME=$(basename "$SPEC" .mpt)
OUT=out/$NAME
set -x
mptc check "$SPEC"
mptc summary "$SPEC"
mptc compile "$SPEC" -o "$OUT" --seed 0
mptc compile "$OUT" -o "$OUT.onnx"
mptc run "$OUT" --random 2 --onnx "$OUT.onnx" --compare
