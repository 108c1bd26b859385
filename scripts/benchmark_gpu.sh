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

bench() {  # bench NAME LIMIT ARGS...: one benchmark process
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" python scripts/benchmark_train.py --model "$MODEL" --height "$HEIGHT" --width "$WIDTH" \
        --device "$DEVICE" --precision "$PRECISION" --iters "$ITERS" --warmup "$WARMUP" --data "$DATA" \
        --output-dir "${RUN_DIR:-/tmp/benchmark_gpu}/$name" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep '^{' "$OUT_DIR/$name.log" | sed "s/^{/{\"run\": \"$name\", /" >>"$OUT_DIR/results.jsonl"
    echo "$name: rc $rc, $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || tail -n 15 "$OUT_DIR/$name.log"
}

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
FIT_WORKERS=${WORKERS##*,}
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
