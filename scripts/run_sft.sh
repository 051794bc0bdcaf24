#!/usr/bin/env bash
# Launch stage 2 (SFT) with DeepSpeed, driven by environment variables; extra arguments are passed on to
# sft/train.py (they override the config). The exact command is printed before it runs.
#
#   NUM_GPUS   processes (default: the number of visible NVIDIA GPUs, else 1)
#   CONFIG     YAML config (default sft/configs/qwen2.5_zero3.yaml)
#   MODEL      --model_name_or_path (M_cpt; also the frozen reference)        (default: from CONFIG)
#   DATA       --train_file (group JSONL; several: comma-separated)           (default: from CONFIG)
#   OUT        --output_dir                                                  (default: from CONFIG)
#   DS_CONFIG  DeepSpeed config (default ds_configs/zero3.json; "none" = plain data parallel without it)
#   PORT       master port (default 29501)
#
# Examples:
#   NUM_GPUS=8 MODEL=runs/cpt-qwen2.5-7b DATA=groups.jsonl OUT=runs/sft-qwen2.5-7b bash scripts/run_sft.sh
#   NUM_GPUS=2 CONFIG=sft/configs/smollm2_quick.yaml OUT=runs/sft-quick bash scripts/run_sft.sh --max_steps 10
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${NUM_GPUS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  fi
  [[ -z "${NUM_GPUS:-}" || "${NUM_GPUS}" == "0" ]] && NUM_GPUS=1
fi
CONFIG=${CONFIG:-sft/configs/qwen2.5_zero3.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
PORT=${PORT:-29501}

if [[ ! -f "$CONFIG" ]]; then
  echo "error: CONFIG=$CONFIG does not exist (see sft/configs/)" >&2
  exit 2
fi

cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" sft/train.py --config "$CONFIG")
if [[ "$DS_CONFIG" != "none" ]]; then
  if [[ ! -f "$DS_CONFIG" ]]; then
    echo "error: DS_CONFIG=$DS_CONFIG does not exist (see ds_configs/, or DS_CONFIG=none)" >&2
    exit 2
  fi
  cmd+=(--deepspeed "$DS_CONFIG")
fi
[[ -n "${MODEL:-}" ]] && cmd+=(--model_name_or_path "$MODEL")
[[ -n "${DATA:-}" ]] && cmd+=(--train_file "$DATA")
[[ -n "${OUT:-}" ]] && cmd+=(--output_dir "$OUT")
cmd+=("$@")

printf 'running:'
for arg in "${cmd[@]}"; do
  if [[ "$arg" =~ ^[A-Za-z0-9_./=,:@%+-]+$ ]]; then printf ' %s' "$arg"; else printf ' %q' "$arg"; fi
done
printf '\n'
exec "${cmd[@]}"
