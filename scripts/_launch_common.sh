# Shared by scripts/run_cpt.sh and scripts/run_sft.sh (sourced, not run). Given STAGE (cpt|sft) and
# DEFAULT_PORT, it validates CONFIG / DS_CONFIG, decides the processes and nodes, and starts the array `cmd`:
# the launcher with its own options, then the stage's train.py, the config, the DeepSpeed config and MODEL.
# The caller appends its own arguments, then calls `launch "$@"`.
#
# Devices and nodes (environment):
#   CUDA_VISIBLE_DEVICES  honoured: DeepSpeed gets --include localhost:IDS (its launcher otherwise re-numbers
#                         every GPU of the node and drops the variable); torchrun sees it as it is
#   NUM_GPUS              processes per node (default: the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi
#                         lists, else 1)
#   HOSTFILE              several nodes: a DeepSpeed hostfile ("host slots=N" per line); NNODES nodes of it
#   NNODES, NODE_RANK     node count (default: the hostfile's lines); with DS_CONFIG=none (torchrun, run once per
#                         node) also this node's rank
#   MASTER_ADDR, PORT     rendezvous address (default: the first host of HOSTFILE, else localhost) and port
#   LAUNCHER_ARGS         more options for the launcher itself, placed before the script (e.g. "--launcher pdsh")
#   DS_CONFIG=none        no DeepSpeed: torchrun starts plain data-parallel processes (the config's `deepspeed:`
#                         is overridden with --deepspeed none)

die() { echo "error: $*" >&2; exit 2; }

CONFIG=${CONFIG:-$STAGE/configs/qwen2.5_zero3.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
PORT=${PORT:-${MASTER_PORT:-$DEFAULT_PORT}}
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist (see $STAGE/configs/)"
[[ "$DS_CONFIG" == "none" || -f "$DS_CONFIG" ]] || die "DS_CONFIG=$DS_CONFIG does not exist (see ds_configs/, or DS_CONFIG=none)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT=$PORT is not a port number"

# The GPUs this node may use: CUDA_VISIBLE_DEVICES as given (set but empty = none), else every GPU nvidia-smi lists.
VISIBLE=""
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  VISIBLE=${CUDA_VISIBLE_DEVICES// /}
  if [[ -n "$VISIBLE" && ! "$VISIBLE" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: the launchers need GPU indices (e.g. 0,1), not UUIDs or names"
  fi
  n_visible=0
  [[ -n "$VISIBLE" ]] && n_visible=$(tr ',' '\n' <<<"$VISIBLE" | wc -l)
elif command -v nvidia-smi >/dev/null 2>&1; then
  n_visible=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
else
  n_visible=0
fi
num_gpus_given=${NUM_GPUS:-}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$n_visible
  [[ "$NUM_GPUS" == "0" ]] && NUM_GPUS=1  # no GPU: one process (DeepSpeed's CPU accelerator, or plain torch)
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS=$NUM_GPUS must be a whole number >= 1"
if [[ -n "$VISIBLE" && "$NUM_GPUS" -gt "$n_visible" ]]; then
  die "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$VISIBLE holds $n_visible GPU(s); unset NUM_GPUS or make them agree"
fi

if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist"
  hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  NNODES=${NNODES:-$hosts}
  [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NNODES" -le "$hosts" ]] || die "NNODES=$NNODES must be between 1 and the $hosts host(s) of $HOSTFILE"
  MASTER_ADDR=${MASTER_ADDR:-$(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" | head -1 | awk '{print $1}')}
fi
NNODES=${NNODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES must be a whole number >= 1"

read -r -a launcher_args <<<"${LAUNCHER_ARGS:-}"
if [[ "$DS_CONFIG" == "none" ]]; then
  # torchrun: CUDA_VISIBLE_DEVICES needs no translation; several nodes = the same command on each, with NODE_RANK.
  cmd=(torchrun --nproc_per_node "$NUM_GPUS")
  if [[ "$NNODES" -gt 1 ]]; then
    [[ -n "${NODE_RANK:-}" ]] || die "DS_CONFIG=none on $NNODES nodes: torchrun runs once per node; set NODE_RANK (0..$((NNODES - 1))) and MASTER_ADDR on each"
    [[ -n "${MASTER_ADDR:-}" ]] || die "DS_CONFIG=none on $NNODES nodes needs MASTER_ADDR (the address of node 0)"
    cmd+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  fi
  cmd+=(--master_port "$PORT" "${launcher_args[@]}" "$STAGE/train.py" --config "$CONFIG" --deepspeed none)
else
  cmd=(deepspeed)
  if [[ -n "${HOSTFILE:-}" ]]; then
    # Several nodes: DeepSpeed starts every node over ssh/pdsh from here. NUM_GPUS (per node) when given; otherwise
    # each host's slots=N in the hostfile decide (this node may have no GPU at all).
    cmd+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES")
    [[ -n "$num_gpus_given" ]] && cmd+=(--num_gpus "$NUM_GPUS")
    cmd+=(--master_addr "$MASTER_ADDR")
  elif [[ -n "$VISIBLE" ]]; then
    ids=$(tr ',' '\n' <<<"$VISIBLE" | head -n "$NUM_GPUS" | paste -sd, -)
    cmd+=(--include "localhost:$ids")
  else
    cmd+=(--num_gpus "$NUM_GPUS")
  fi
  cmd+=(--master_port "$PORT" "${launcher_args[@]}" "$STAGE/train.py" --config "$CONFIG" --deepspeed "$DS_CONFIG")
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
