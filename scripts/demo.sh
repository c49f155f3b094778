#!/usr/bin/env bash
# The main job on a shipped example: check and summarise a spec, compile it to a model dir,
# grow it with verified function-preserving passes, compare the grown model with the
# original, export the grown model to ONNX and run it in ONNX Runtime against PyTorch; then
# deploy the grown model for ONNX Runtime GenAI and generate through it; extract a sub-network of
# the nested example examples/matlm.mpt and run its ONNX file.
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
# MatFormer: cut a Mix'n'Match sub-network out of a nested example (verified against the
# parent run at that granularity) and run its ONNX file in ONNX Runtime.
mptc compile examples/matlm.mpt -o out/matlm --seed 0
mptc extract out/matlm --mix "s,m,l,xl" --drop-layers 2 -o out/matlm-mix
mptc compile out/matlm-mix -o out/matlm-mix.onnx
mptc run out/matlm-mix --random 2 --onnx out/matlm-mix.onnx --compare
# Deploy the grown model with a KV cache for ONNX Runtime GenAI and generate a few tokens there.
mptc deploy "$OUT-grown" -o "$OUT-deploy" --force
mptc generate "$OUT-deploy" --ids "1 2 3 4" --max-new-tokens 8
