#!/usr/bin/env bash
# The GPU check: one GPU (named in the results; MFU against its own peak), under 9 minutes, nothing
# downloaded.
#   (a) QLoRA DPO of a Llama-3.1-8B-sized model through dpo.py, max_length 1024, one pair per micro-batch,
#       8 micro-batches per step, gradient checkpointing: peak CUDA memory (target <= 12 GiB) and tokens/s.
#   (b) full bf16 DPO of a Qwen2.5-0.5B-sized model, TRL 1.16 vs dpo.py (concatenated rows, shared prompt,
#       precomputed reference): tokens/s, peak memory, MFU. GPU_PEAK_TFLOPS=... sets the peak for a GPU
#       gpu_check.py does not know.
#
#   bash bench/gpu_check.sh [RESULT.json]          # default: $OUT/gpu_check.json, else ./gpu_check.json
#   SIZE=tiny bash bench/gpu_check.sh /tmp/x.json  # the same steps, tiny sizes, on CPU (~3 min): a smoke test
#   bash bench/gpu_check.sh --cpu-smoke /tmp/x.json
#
# Needs requirements-dev.txt installed (torch with CUDA, bitsandbytes, trl); PYTHON picks the interpreter.
# Each part has its own time limit and writes its own key of the JSON, so one failing does not lose the other.
# GPU_CHECK_LIMIT=SECONDS replaces both limits; GPU_CHECK_GRACE=SECONDS is the wait between SIGTERM and
# SIGKILL (10). Runs on bash 4.2+ (an empty array under set -u is written ${A[@]+"${A[@]}"}: bash 4.2 calls
# "${A[@]}" unbound).
set -uo pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then SIZE=tiny; shift; fi
SIZE=${SIZE:-full}
RESULT=$(realpath -m "${1:-${OUT:-.}/gpu_check.json}")  # absolute: the script changes directory next
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$(dirname "$RESULT")"
rm -f "$RESULT"
TINY=(); LIMIT_A=270; LIMIT_B=260
# a shared CPU is slow; the limits are for the H100
[ "$SIZE" = tiny ] && { TINY=(--tiny); LIMIT_A=600; LIMIT_B=600; }
LIMIT_A=${GPU_CHECK_LIMIT:-$LIMIT_A}; LIMIT_B=${GPU_CHECK_LIMIT:-$LIMIT_B}; GRACE=${GPU_CHECK_GRACE:-10}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PART=  # the process group of the part running now (its leader's pid), stopped whatever ends the script
# SIGTERM to the whole group (gpu_check.py records why it stopped), SIGKILL to what is left after GRACE
stop_part() {
    [ -n "$PART" ] || return 0
    kill -TERM -- "-$PART" 2>/dev/null
    local waited=0
    while kill -0 -- "-$PART" 2>/dev/null && [ "$waited" -lt "$GRACE" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    kill -KILL -- "-$PART" 2>/dev/null
    wait "$PART" 2>/dev/null
    PART=
}
trap 'stop_part; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_part NAME LIMIT COMMAND...: the command in a session and process group of its own (setsid), so that
# on a timeout the whole group goes: dpo.py and compare_trl.py run as children of gpu_check.py, and a hung
# one could keep the GPU. `timeout` would signal its child only, and SIGTERM alone does not stop dpo.py in a
# hung step (it saves first).
run_part() {
    local name=$1 limit=$2 code
    shift 2
    setsid "$@" &
    PART=$!
    local deadline=$((SECONDS + limit))
    while kill -0 "$PART" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
    if kill -0 "$PART" 2>/dev/null; then
        echo "gpu_check: $name timed out after $limit s; its processes were stopped"
        stop_part
        return 124
    fi
    wait "$PART"
    code=$?
    kill -KILL -- "-$PART" 2>/dev/null  # a child the part left behind goes with it
    PART=
    [ "$code" -eq 0 ] || echo "gpu_check: $name failed (exit status $code)"
    return "$code"
}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

start=$SECONDS
[ "$SIZE" = tiny ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
# (a) ~1.5 min to build and save the 16 GB bf16 model, ~1 min to load it in 4 bits, then 4 steps of 16k tokens
run_part "(a) qlora" "$LIMIT_A" "$PY" bench/gpu_check.py qlora "$RESULT" ${TINY[@]+"${TINY[@]}"} \
    --workdir "$WORK/qlora" || status=1
rm -rf "$WORK/qlora"  # 16 GB of safetensors
# (b) four runs (TRL, dpo.py concatenated, dpo.py shared prompt, + precomputed reference), each 10 steps of
#     8 pairs at 1024
run_part "(b) trl" "$LIMIT_B" "$PY" bench/gpu_check.py trl "$RESULT" ${TINY[@]+"${TINY[@]}"} \
    --workdir "$WORK/trl" || status=1
echo "gpu_check: $((SECONDS - start)) s; results in $RESULT"
exit $status
