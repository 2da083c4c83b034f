#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with meanflow (editable), the test and trackers extras, pinned by
# constraints.txt (torch 2.14.1, torchvision 0.29.1, ...). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log=$(mktemp)
pip_quiet() {  # pip's output only when it fails (this machine's index warnings are noise)
  .venv/bin/python -m pip install -q "$@" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet --upgrade pip
pip_quiet -c constraints.txt -e '.[test,trackers]'
.venv/bin/python -c "import meanflow, torch, torchvision, torch_fidelity, deepspeed, submitit, webdataset, tensorboard, wandb" \
  >/dev/null 2>&1 || { echo "set-up failed: meanflow or a dependency does not import" >&2; exit 1; }
echo "set-up done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
