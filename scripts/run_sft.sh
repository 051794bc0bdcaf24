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

STAGE=sft DEFAULT_PORT=29501
# shellcheck source=scripts/_launch_common.sh
source scripts/_launch_common.sh

[[ -n "${DATA:-}" ]] && cmd+=(--train_file "$DATA")
launch "$@"
