#!/usr/bin/env bash
# Set up the Python environment the same way everywhere (laptop, GitHub Actions, Jenkins, .ci/run).
# Usage: ci/setup.sh [VENV_DIR]   (default .venv). Installs the CPU build of torch unless
# TORCH_SPEC is set (e.g. TORCH_SPEC="torch" on a GPU runner), then the package with its dev extras.
set -euo pipefail
venv="${1:-.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX_URL:-}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  if [ -n "$torch_index" ]; then
    "$py" -m pip install --quiet "$torch_spec" --index-url "$torch_index"
  else
    "$py" -m pip install --quiet "$torch_spec"
  fi
fi
"$py" -m pip install --quiet -e ".[dev,optimizers]"
# The CLIP BPE vocabulary for offline single-file SD checkpoints (read as data; its heavy deps are not needed).
"$py" -m pip install --quiet --no-deps "open_clip_torch==3.3.0"
echo "environment ready: $venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
