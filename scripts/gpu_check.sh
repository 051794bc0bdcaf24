#!/usr/bin/env bash
# Check tsarank's GPU path in one command and write the GPU section of BENCHMARKS.md (under 8 minutes on one H200).
#
#   bash scripts/gpu_check.sh                    # on a machine with NVIDIA GPUs
#   bash scripts/gpu_check.sh --dry-run          # the same steps on the CPU at toy sizes (the test suite runs it)
#   OUT=/tmp/gpu.md bash scripts/gpu_check.sh    # write the section elsewhere
#
# Steps (scripts/gpu_check.py): the auto dtype/attention choice; bf16 vs fp32 and FlashAttention-2 vs SDPA scoring
# on DL19 (docs/s, rankings agree); one SFT step against the full-logits baseline (peak CUDA memory); ZeRO-3 SFT on 1
# GPU and, with two, on 2 (no hang, equal losses); sharded `tsarank rerank --devices` on all GPUs (byte-identical).
#
# tsarank runs from this checkout (PYTHONPATH), installed or not. Missing dependencies are named up front; flash-attn
# is installed only from a wheel (`--only-binary`, e.g. one in $PIP_FIND_LINKS: PyPI itself has source archives only,
# and a source build takes far longer than the check), else the FlashAttention-2 figures are skipped and the section
# says so. Torch is never installed or replaced here. Data: ../shared/data, or TSARANK_DATA=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DRY=0
args=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
[[ -n "${OUT:-}" ]] && args+=(--out "$OUT")
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check: torch is not installed; install a CUDA build of torch first (see README, Install)" >&2
    exit 2
fi
if [[ $DRY == 0 ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device; run with --dry-run on a CPU" >&2
        exit 2
    fi
    if ! "$PYTHON" -c "import flash_attn" 2>/dev/null; then
        echo "gpu_check: flash-attn missing; trying a wheel (never a source build)"
        "$PYTHON" -m pip install --only-binary=:all: --no-deps --retries 0 --timeout 15 flash-attn >/dev/null 2>&1 \
            || echo "gpu_check: no flash-attn wheel for this torch/CUDA (or no network); FlashAttention-2 checks are skipped"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for mod in transformers peft deepspeed ir_measures bm25s gguf safetensors yaml; do
    "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if (( ${#missing[@]} )); then
    echo "gpu_check: missing Python packages: ${missing[*]} (pip install -e . installs them); the steps needing them will fail" >&2
fi
exec timeout 480 "$PYTHON" scripts/gpu_check.py "${args[@]}"
