# Shared by scripts/run_cpt.sh and scripts/run_sft.sh (sourced, not run). Given STAGE (cpt|sft) and
# DEFAULT_PORT, it validates CONFIG / DS_CONFIG, detects NUM_GPUS and starts the array `cmd` with the
# deepspeed launcher, the stage's train.py, the config, the DeepSpeed config and MODEL.
# The caller appends its own arguments, then calls `launch "$@"`.

if [[ -z "${NUM_GPUS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  fi
  [[ -z "${NUM_GPUS:-}" || "${NUM_GPUS}" == "0" ]] && NUM_GPUS=1
fi
CONFIG=${CONFIG:-$STAGE/configs/qwen2.5_zero3.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
PORT=${PORT:-$DEFAULT_PORT}

if [[ ! -f "$CONFIG" ]]; then
  echo "error: CONFIG=$CONFIG does not exist (see $STAGE/configs/)" >&2
  exit 2
fi

cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" "$STAGE/train.py" --config "$CONFIG")
if [[ "$DS_CONFIG" != "none" ]]; then
  if [[ ! -f "$DS_CONFIG" ]]; then
    echo "error: DS_CONFIG=$DS_CONFIG does not exist (see ds_configs/, or DS_CONFIG=none)" >&2
    exit 2
  fi
  cmd+=(--deepspeed "$DS_CONFIG")
fi
[[ -n "${MODEL:-}" ]] && cmd+=(--model_name_or_path "$MODEL")

# Appends OUT and the pass-through arguments, prints the exact command (copy-pasteable) and replaces the shell.
launch() {
  [[ -n "${OUT:-}" ]] && cmd+=(--output_dir "$OUT")
  cmd+=("$@")
  printf 'running:'
  for arg in "${cmd[@]}"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=,:@%+-]+$ ]]; then printf ' %s' "$arg"; else printf ' %q' "$arg"; fi
  done
  printf '\n'
  exec "${cmd[@]}"
}
