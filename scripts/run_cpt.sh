#!/usr/bin/env bash
# Launch stage 1 (CPT) with DeepSpeed, driven by environment variables; extra arguments are passed on to
# cpt/train.py (they override the config). The exact command is printed before it runs.
#
#   CONFIG     YAML config (default cpt/configs/qwen2.5_zero3.yaml)
#   MODEL      --model_name_or_path                                    (default: from CONFIG)
#   DATA       weak-pairs directory (train.jsonl [+ validation.jsonl], as `tsarank data weak-pairs` writes)
#              or a single training JSONL file                          (default: from CONFIG)
#   OUT        --output_dir                                            (default: from CONFIG)
#
#   DS_CONFIG  DeepSpeed config (default ds_configs/zero3.json; "none" = torchrun without DeepSpeed)
#   NUM_GPUS   processes per node (default: the GPUs of CUDA_VISIBLE_DEVICES, else all nvidia-smi lists, else 1)
#   HOSTFILE, NNODES, MASTER_ADDR, PORT, NODE_RANK, LAUNCHER_ARGS: several nodes and launcher options
#              (see scripts/_launch_common.sh; PORT defaults to 29500)
#
# Examples:
#   NUM_GPUS=8 MODEL=Qwen/Qwen2.5-7B DATA=runs/weak-pairs OUT=runs/cpt-qwen2.5-7b bash scripts/run_cpt.sh
#   CUDA_VISIBLE_DEVICES=2,3 CONFIG=cpt/configs/smollm2_quick.yaml OUT=runs/cpt-quick bash scripts/run_cpt.sh --max_steps 10
#   HOSTFILE=hosts.txt NUM_GPUS=8 MODEL=Qwen/Qwen2.5-7B DATA=runs/weak-pairs OUT=runs/cpt-qwen2.5-7b bash scripts/run_cpt.sh   # 2 nodes x 8 GPUs
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=cpt DEFAULT_PORT=29500
# shellcheck source=scripts/_launch_common.sh
source scripts/_launch_common.sh

if [[ -n "${DATA:-}" ]]; then
  if [[ -d "$DATA" ]]; then
    if [[ ! -f "$DATA/train.jsonl" ]]; then
      echo "error: DATA=$DATA is a directory without train.jsonl (build it with: tsarank data weak-pairs --out $DATA ...)" >&2
      exit 2
    fi
    cmd+=(--train_file "$DATA/train.jsonl")
    [[ -s "$DATA/validation.jsonl" ]] && cmd+=(--validation_file "$DATA/validation.jsonl")
  elif [[ -f "$DATA" ]]; then
    cmd+=(--train_file "$DATA")
  else
    echo "error: DATA=$DATA is neither a weak-pairs directory nor a file" >&2
    exit 2
  fi
fi
launch "$@"
