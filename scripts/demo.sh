#!/usr/bin/env bash
# The main job on a shipped example: check and summarise a spec, compile it to a model dir,
# grow it with verified function-preserving passes, compare the grown model with the
# original, export the grown model to ONNX and run it in ONNX Runtime against PyTorch.
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
mptc grow "$OUT" -p "grow_mlp(factor = 1.5)" -p "add_layers(n = 2, at = 6)" -o "$OUT-grown"
mptc verify "$OUT" "$OUT-grown"
mptc compile "$OUT-grown" -o "$OUT-grown.onnx"
mptc run "$OUT-grown" --random 2 --onnx "$OUT-grown.onnx" --compare
