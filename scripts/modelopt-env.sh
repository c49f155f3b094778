#!/usr/bin/env bash
# Create .venv-modelopt, a second environment with NVIDIA ModelOpt (nvidia-modelopt, for its FastNAS pruning),
# used only by bench/extraction_peers.py as a peer to compare with; not an mptc requirement. It holds only
# what ModelOpt adds (scipy, pulp, omegaconf, ...) and reads everything else, torch and transformers included,
# from .venv through a .pth file placed after its own packages, so .venv's pinned packages stay as they are.
# Needs .venv (scripts/setup.sh makes it first). Safe to run again: it reinstalls only when this script or
# constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=.venv-modelopt
stamp=$ENV/.mptc-installed
want=$(cat "$0" constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -rf "$ENV"
"$PY" -m venv "$ENV"
echo "*" > "$ENV/.gitignore"  # a venv, never committed
main=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$main" > "$own/_mptc_main_venv.pth"
# requests: imported by modelopt.torch.utils though not declared; torchprofile 0.0.4 (0.1.0 lacks the `handlers`
# FastNAS counts FLOPs with) without its dependencies: it would pull a torchvision built for another torch
"$ENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt "nvidia-modelopt==0.47.0" requests
"$ENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "torchprofile==0.0.4"
echo "$want" > "$stamp"
