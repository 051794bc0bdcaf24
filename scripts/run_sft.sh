#!/usr/bin/env bash
# Launch stage 2 (SFT) with DeepSpeed, driven by environment variables; extra arguments are passed on to
# sft/train.py (they override the config). The exact command is printed before it runs.
#
#   CONFIG     YAML config (default sft/configs/qwen2.5_zero3.yaml)
#   MODEL      --model_name_or_path (M_cpt; also the frozen reference)        (default: from CONFIG)
#   DATA       --train_file (group JSONL; several: comma-separated)           (default: from CONFIG)
#   OUT        --output_dir                                                  (default: from CONFIG)
#
#   DS_CONFIG  DeepSpeed config (default ds_configs/zero3.json; "none" = torchrun without DeepSpeed)
#   NUM_GPUS   processes per node (default: the GPUs of CUDA_VISIBLE_DEVICES, else all nvidia-smi lists, else 1)
#   HOSTFILE, NNODES, MASTER_ADDR, PORT, NODE_RANK, LAUNCHER_ARGS: several nodes and launcher options
#              (see scripts/_launch_common.sh; PORT defaults to 29501)
#
# Examples:
#   NUM_GPUS=8 MODEL=runs/cpt-qwen2.5-7b DATA=groups.jsonl OUT=runs/sft-qwen2.5-7b bash scripts/run_sft.sh
#   CUDA_VISIBLE_DEVICES=2,3 CONFIG=sft/configs/smollm2_quick.yaml OUT=runs/sft-quick bash scripts/run_sft.sh --max_steps 10
#   HOSTFILE=hosts.txt NUM_GPUS=8 MODEL=runs/cpt-qwen2.5-7b DATA=groups.jsonl OUT=runs/sft-qwen2.5-7b bash scripts/run_sft.sh   # 2 nodes x 8 GPUs
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=sft DEFAULT_PORT=29501
# shellcheck source=scripts/_launch_common.sh
source scripts/_launch_common.sh

[[ -n "${DATA:-}" ]] && cmd+=(--train_file "$DATA")
launch "$@"
