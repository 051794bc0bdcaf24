#!/usr/bin/env bash
# Run tsarank's CPU benchmarks and write BENCHMARKS.md (atomically; only when every benchmark finished).
#
#   bash scripts/bench_all.sh                     # all seven, with the scripts' default settings
#   OUT=/tmp/B.md bash scripts/bench_all.sh       # write elsewhere
#   SCORE_ARGS="--repeats 5" CPT_ARGS="--steps 4" SFT_ARGS="--repeats 3" bash scripts/bench_all.sh
#   ONLY="score cpt" bash scripts/bench_all.sh    # a subset (BENCHMARKS.md then shows only those)
#   ONLY="bf16 processes" BLOCK=cpu_scaling HEADING="..." bash scripts/bench_all.sh
#                                                 # a subset in a block of its own (the bench_all block is kept)
#
# Each benchmark ends with one line `RESULT {json}` (its figures and the baseline measured in the same process);
# scripts/write_benchmarks.py turns those lines, the exact commands and the machine description into the
# `bench_all` block of BENCHMARKS.md (anything else in that file, e.g. a GPU section, is kept).
# Full logs go to $LOG_DIR (default outputs/bench_logs/<UTC timestamp>/, git-ignored).
# Run it on an otherwise idle machine: the ratios are robust to load, the absolute numbers are not.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-BENCHMARKS.md}
BLOCK=${BLOCK:-bench_all}
HEADING=${HEADING:-}
ONLY=${ONLY:-score cpt sft trunk zero3 bf16 processes}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG_DIR=${LOG_DIR:-outputs/bench_logs/$STAMP}

export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1

declare -A SCRIPT=([score]=scripts/bench_score.py [cpt]=scripts/bench_cpt.py [sft]=scripts/bench_sft_step.py
                  [trunk]=scripts/bench_shared_trunk.py [zero3]=scripts/bench_zero3_step.py
                  [bf16]=scripts/bench_cpu_bf16.py [processes]=scripts/bench_score.py)
declare -A ARGS=([score]="${SCORE_ARGS:-}" [cpt]="${CPT_ARGS:-}" [sft]="${SFT_ARGS:-}" [trunk]="${TRUNK_ARGS:-}"
                 [zero3]="${ZERO3_ARGS:-}" [bf16]="${BF16_ARGS:-}"
                 [processes]="${PROCESSES_ARGS:---processes 2 --process-queries 4 --queries 1 --repeats 1}")

started=$(date -u "+%Y-%m-%d %H:%M UTC")
loadavg=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
for name in $ONLY; do
    if [[ -z "${SCRIPT[$name]:-}" ]]; then
        echo "bench_all: unknown benchmark '$name' in ONLY (expected: score cpt sft trunk zero3 bf16 processes)" >&2
        exit 2
    fi
done
mkdir -p "$LOG_DIR"
results=()
failed=()
for name in $ONLY; do
    # shellcheck disable=SC2206  # the *_ARGS variables are meant to split into words
    cmd=("$PYTHON" "${SCRIPT[$name]}" ${ARGS[$name]})
    log="$LOG_DIR/$name.log"
    echo "== $name: ${cmd[*]}  (log: $log)"
    t0=$(date +%s)
    if "${cmd[@]}" 2>&1 | tee "$log"; then
        echo "== $name finished in $(( $(date +%s) - t0 )) s"
        results+=(--result "$name" "$log" "${cmd[*]}")
    else
        echo "== $name FAILED (exit ${PIPESTATUS[0]}); see $log" >&2
        failed+=("$name")
    fi
done
finished=$(date -u "+%Y-%m-%d %H:%M UTC")

if (( ${#failed[@]} )); then
    echo "bench_all: ${failed[*]} failed; $OUT left unchanged (logs in $LOG_DIR)" >&2
    exit 1
fi
heading=()
[[ -n "$HEADING" ]] && heading=(--heading "$HEADING")
"$PYTHON" scripts/write_benchmarks.py "${results[@]}" --out "$OUT" --started "$started" --finished "$finished" \
    --loadavg "$loadavg" --block "$BLOCK" "${heading[@]}"
echo "logs: $LOG_DIR"
