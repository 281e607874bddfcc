#!/usr/bin/env bash
# The engine's presets and memory modes on one machine, in one bounded run.
#
#   benchmarks/gpu_suite.sh OUTDIR [--model dummy-full] [--device cuda] [--size 1024]
#       [--steps 28] [--runs 3] [--budget-s 540] [--timeout STAGE=SECONDS]...
#
# Needs this repository and Python with torch, diffusers, transformers, accelerate,
# safetensors, sentencepiece, pydantic, pydantic-settings (torchao for fp8; scikit-image for
# SSIM): the project need not be installed (PYTHONPATH=src is set here). No network is used.
# Interpreter: ${PYTHON:-python3}.
#
# Stages, in priority order, each one fresh process bounded by `timeout` and by what is left of
# the budget (a stage that cannot fit is skipped, one that overruns is killed; the rest still
# run), each writing OUTDIR/STAGE.json (and STAGE.log):
#   env                 nvidia-smi -L, python/torch/diffusers/torchao versions
#   none                eager bf16: the reference of every deviation
#   compile             fused QKV, fastest SDPA, regional compile (cold compile cache)
#   compile-restart     compile again in a new process with compile's cache folder (1 run): its
#                       first_edit_s is the first edit after a restart with a warm cache
#   cache               compile + step cache
#   fp8-storage-24gb    none, weights stored in float8, capped at 24 GiB           (CUDA)
#   group-offload-16gb  none, group offload, capped at 16 GiB                      (CUDA)
#   model-offload       none, model CPU offload
#   fp8                 compile + torchao float8; its first compile took over 170 s (CUDA)
#   fp8-cache           fp8 + step cache                                           (CUDA)
# (fp8 last: on the H200 its compile alone outlasted its stage, and starved the stages after it)
# then OUTDIR/summary.json, OUTDIR/table.txt and the table on stdout.
set -u

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in -*) usage ;; esac
OUTDIR=$1
shift
MODEL=dummy-full
DEVICE=cuda
SIZE=1024
STEPS=28
RUNS=3
BUDGET_S=540
RESERVE_S=30    # kept for the table at the end (its own time limit)
KILL_GRACE_S=5  # what `timeout -k` may add to a stage that overruns
MIN_STAGE_S=20  # a stage with less than this left is skipped
declare -A TIMEOUT_S=(
    [env]=60 [none]=90 [compile]=150 [fp8]=170 [cache]=120 [compile-restart]=90
    [fp8-storage-24gb]=90 [group-offload-16gb]=90 [model-offload]=90 [fp8-cache]=170
)

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --budget-s) BUDGET_S=$2; shift 2 ;;
        --timeout)
            name=${2%%=*}
            [ -n "${TIMEOUT_S[$name]+set}" ] || { echo "unknown stage: $name" >&2; exit 2; }
            TIMEOUT_S[$name]=${2#*=}
            shift 2
            ;;
        -h|--help) usage ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ORDER=()
SECONDS=0

on_cuda() { case "$DEVICE" in cuda*) return 0 ;; *) return 1 ;; esac; }

write_status() {  # STAGE STATUS WALL_S: a record for a stage that wrote none itself
    printf '{"entry": "%s", "status": "%s", "wall_s": %s}\n' "$1" "$2" "$3" >"$OUTDIR/$1.json"
}

write_order() {
    local joined
    joined=$(printf '"%s", ' "${ORDER[@]}")
    printf '{"order": [%s]}\n' "${joined%, }" >"$OUTDIR/summary.json"
}

# budget STAGE: the seconds this stage may run (0: it does not fit)
budget() {
    local left=$((BUDGET_S - SECONDS - RESERVE_S - KILL_GRACE_S)) limit=${TIMEOUT_S[$1]}
    ((limit > left)) && limit=$left
    ((limit < MIN_STAGE_S)) && limit=0
    echo "$limit"
}

# stage NAME NEEDS_CUDA(yes|no) BENCH_ARGS...
stage() {
    local name=$1 needs_cuda=$2 limit started rc
    shift 2
    ORDER+=("$name")
    limit=$(budget "$name")
    if [ "$needs_cuda" = yes ] && ! on_cuda; then
        write_status "$name" "skipped: needs CUDA (device $DEVICE)" 0
    elif ((limit == 0)); then
        write_status "$name" "skipped: $((BUDGET_S - SECONDS)) s of the $BUDGET_S s budget left" 0
    else
        rm -f "$OUTDIR/$name.json"
        started=$SECONDS
        timeout -k "$KILL_GRACE_S" "$limit" "$PYTHON" -m kontext_server.worker.bench \
            --model "$MODEL" --device "$DEVICE" --size "$SIZE" --steps "$STEPS" \
            --runs "$RUNS" --warmup 0 --out "$OUTDIR" --entry "$name" \
            --json "$OUTDIR/$name.json" "$@" >"$OUTDIR/$name.log" 2>&1
        rc=$?
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            write_status "$name" "timed out after $limit s" $((SECONDS - started))
        elif [ ! -s "$OUTDIR/$name.json" ]; then
            write_status "$name" "failed: exit code $rc (see $name.log)" $((SECONDS - started))
        fi
    fi
    write_order
    echo "[$SECONDS s] $name: $(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$OUTDIR/$name.json" | head -1)"
}

# env: no bench, its own JSON
limit=$(budget env)
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; } >"$OUTDIR/nvidia-smi.txt" 2>&1
if ((limit > 0)); then
    timeout -k "$KILL_GRACE_S" "$limit" "$PYTHON" -m kontext_server.worker.bench --env "$OUTDIR/env.json" \
        >"$OUTDIR/env.log" 2>&1 || printf '{"stage": "env", "status": "failed"}\n' >"$OUTDIR/env.json"
else
    printf '{"stage": "env", "status": "skipped: budget"}\n' >"$OUTDIR/env.json"
fi
echo "[$SECONDS s] env: $(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$OUTDIR/env.json" | head -1)"

COMPILE_CACHE="$OUTDIR/compile/compile-cache"
stage none no --acceleration none
stage compile no --acceleration compile --compile-cache-dir "$COMPILE_CACHE"
stage compile-restart no --acceleration compile --compile-cache-dir "$COMPILE_CACHE" --runs 1
stage cache no --acceleration cache
stage fp8-storage-24gb yes --acceleration none --memory fp8-storage --memory-limit-gb 24
stage group-offload-16gb yes --acceleration none --memory group-offload --memory-limit-gb 16
stage model-offload no --acceleration none --memory model-offload
stage fp8 yes --acceleration fp8
stage fp8-cache yes --acceleration fp8-cache

timeout -k 2 $((RESERVE_S - 2)) "$PYTHON" -m kontext_server.worker.bench --table "$OUTDIR"
rc=$?
echo "[$SECONDS s] done: $OUTDIR (summary.json, table.txt, one JSON per stage)"
exit $rc
