#!/usr/bin/env bash
# The GPU training-speed suite behind docs/results.md (Training speed, GPU), one benchmark
# process after another, each under its own time limit so that one hang costs only its share.
#
#   bash scripts/benchmark_gpu.sh <folder in Market-1501 layout> <output folder>
#
# Each process appends its JSON lines to <output folder>/results.jsonl and its log to
# <output folder>/<name>.log (the trainers write under $RUN_DIR, default /tmp/benchmark_gpu).
# The environment can shrink the suite for a rehearsal on the CPU:
#   DEVICE=cpu PRECISION=32 MODEL=bot_r18 HEIGHT=64 WIDTH=32 ITERS=3 WARMUP=2 WORKERS=0,2 \
#     BATCHES=32 COMPILE=0 bash scripts/benchmark_gpu.sh <data> <out>
# SUITE=quick runs only what re-measures issue 13's targets, most wanted first, within one device
# call (an estimated 7 minutes on an H200 with 14 workers): the fit with and without Lightning's
# per-step read of the loss (one process, with a py-spy sample of the default fit where py-spy is
# on the PATH), the compiled fit with its synchronising calls counted, the compiled fit, the eager
# loader, step and fit, the CUDA tests, and the compiled fit at the larger batch.
# scripts/gpu_bundle.sh prepares what the device call carries.
set -u
DATA=${1:?usage: benchmark_gpu.sh <data folder> <output folder>}
OUT_DIR=${2:?usage: benchmark_gpu.sh <data folder> <output folder>}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16-mixed}
MODEL=${MODEL:-bot_r50}
HEIGHT=${HEIGHT:-256}
WIDTH=${WIDTH:-128}
ITERS=${ITERS:-150}
WARMUP=${WARMUP:-145}             # past the first CUHK03-NP epoch at batch 64 (115 batches): the image cache is full
WORKERS=${WORKERS:-8,14}          # the loader mode times each; the fit takes the last
BATCHES=${BATCHES:-256}           # larger-batch fits, channels-last
COMPILE=${COMPILE:-1}
LIMIT=${LIMIT:-120}               # seconds per process (compile: twice)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

run_script() {  # run_script SCRIPT NAME LIMIT ARGS...: one benchmark process
    local script=$1 name=$2 limit=$3
    shift 3
    local start=$SECONDS
    timeout "$limit" python "$script" --model "$MODEL" --height "$HEIGHT" --width "$WIDTH" \
        --device "$DEVICE" --precision "$PRECISION" --iters "$ITERS" --warmup "$WARMUP" --data "$DATA" \
        --output-dir "${RUN_DIR:-/tmp/benchmark_gpu}/$name" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep '^{' "$OUT_DIR/$name.log" | sed "s/^{/{\"run\": \"$name\", /" >>"$OUT_DIR/results.jsonl"
    echo "$name: rc $rc, $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || tail -n 15 "$OUT_DIR/$name.log"
}
bench() { run_script scripts/benchmark_train.py "$@"; }              # bench NAME LIMIT ARGS...
variants() { run_script scripts/benchmark_fit_variants.py "$@"; }    # variants NAME LIMIT ARGS...

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
FIT_WORKERS=${WORKERS##*,}
if [ "${SUITE:-full}" = quick ]; then
    spy=()
    command -v py-spy >/dev/null && spy=(--py-spy "$OUT_DIR/spy_eager.txt")
    variants prog_bar_ab $((2 * LIMIT)) --workers "$FIT_WORKERS" --variants default,loss_on_lightnings_bar "${spy[@]}"
    if [ "$COMPILE" = 1 ]; then
        bench fit_cl_compile_syncs $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last --compile --sync-debug
        bench fit_cl_compile $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last --compile
    fi
    bench all_cl "$LIMIT" --mode all --workers "$FIT_WORKERS" --channels-last
    timeout "$LIMIT" python -m pytest -q -p no:cacheprovider tests/test_data_batch_normalize.py tests/test_hooks_cuda.py \
        tests/test_eval_ranking.py tests/test_eval_rerank.py tests/test_training_speed.py tests/test_cuda_syncs.py \
        tests/test_data_packed_batch.py >"$OUT_DIR/tests.log" 2>&1
    echo "tests: rc $?, $(tail -n 1 "$OUT_DIR/tests.log")"
    if [ "$COMPILE" = 1 ]; then  # 60 timed steps after 38 (past the first epoch at batch 256)
        for batch in $BATCHES; do
            bench "fit_cl_compile_b$batch" $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last \
                --compile --batch "$batch" --iters 60 --warmup 38
        done
    fi
    cat "$OUT_DIR/results.jsonl"
    exit 0
fi
bench all_cl "$LIMIT" --mode all --workers "$WORKERS" --channels-last
for batch in $BATCHES; do
    bench "fit_cl_b$batch" "$LIMIT" --mode fit --workers "$FIT_WORKERS" --channels-last --batch "$batch"
done
bench fit_nchw "$LIMIT" --mode fit --workers "$FIT_WORKERS"
# float32 batches normalised in the workers (before data.normalize_on_device): loader and fit
bench loader_float "$LIMIT" --mode loader --workers "$WORKERS" data.normalize_on_device=false
bench fit_cl_float "$LIMIT" --mode fit --workers "$FIT_WORKERS" --channels-last data.normalize_on_device=false
# data.cache_images (auto: on): the loader and the fit above run after the first epoch, with every
# image in the cache; the fit without the cache
bench fit_cl_no_cache "$LIMIT" --mode fit --workers "$FIT_WORKERS" --channels-last data.cache_images=false
bench optimizer "$LIMIT" --mode optimizer --iters 20 --warmup 3
bench checkpoint "$LIMIT" --mode checkpoint --iters 3
if [ "$COMPILE" = 1 ]; then  # compile_kwargs' default mode, reduce-overhead (CUDA graphs)
    bench fit_cl_compile $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last --compile
    for batch in $BATCHES; do
        bench "fit_cl_compile_b$batch" $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last \
            --compile --batch "$batch"
    done
    # where a compiled fit step waits: torch's synchronising CUDA calls by site, and host_busy
    bench fit_cl_compile_syncs $((2 * LIMIT)) --mode fit --workers "$FIT_WORKERS" --channels-last --compile --sync-debug
fi
bench fit_cl_syncs "$LIMIT" --mode fit --workers "$FIT_WORKERS" --channels-last --sync-debug
cat "$OUT_DIR/results.jsonl"
