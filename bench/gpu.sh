#!/usr/bin/env bash
# The GPU figures in one prepared run (about 9 minutes on one H200), for a lent device machine
# that has torch but no diffusers and no network.
#
#   pip download diffusers==0.42.1 --no-deps -d bench/wheels   # here, once (bench/wheels is ignored by git)
#   bash bench/gpu.sh                      # on the device: run tool, carry ["bench/wheels"], timeout ~560 s
#   bash bench/gpu.sh --smoke              # on a CPU: the same steps at smoke size, seconds
#   bash bench/gpu.sh --quality            # the quality run instead (bench/gpu_quality.py), about 8 minutes:
#                                          # cp ../shared/data/cifar10-jpeg.tar.gz data/ here, carry ["data/cifar10-jpeg.tar.gz"]
#   bash bench/gpu.sh --quality-smoke      # the quality run's steps at smoke size on a CPU
#
# Steps (each narrowed to fit the lease; bench/speed.py alternates ours and diffusers per round):
#   0. preflight (bench/preflight.py, about a minute): 3 compiled bf16 + fused-Adam training steps
#      with their host syncs counted, CUDA-graph sampling against eager, a checkpoint round trip
#   1. cifar10 training step, ours vs diffusers (bf16, channels_last), batch 128: img/s, ratio, MFU
#   2. cifar10 DDIM-50 throughput at batch 256
#   3. stl10, 64 images: DDIM-50 and DDPM-1000, time to the last image
#   4. cifar10 training step and DDIM-50 again with torch.compile (both sides), if time is left
#
# Output: $OUT (default bench/results/gpu) holds two files, gpu.log and gpu-results.tar.gz
# (device.txt, preflight.json, speed-*.json/md), the archive rewritten after every step, and
# every benchmark cell written as it finishes: a run cut short keeps what it measured.
# The diffusers wheel is installed into a folder of its own on PYTHONPATH, never into the
# interpreter's site-packages.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
smoke=0
quality=""
case "${1:-}" in
    "") ;;
    --smoke) smoke=1 ;;
    --quality) quality=full ;;
    --quality-smoke) quality=smoke ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (takes --smoke, --quality, --quality-smoke or --help)" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "bench/gpu.sh: one argument at most, got $#: $*" >&2; exit 2; }

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
RESULTS="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/gpu.log") 2>&1

budget_s="${GPU_BUDGET_S:-480}"
start=$(date +%s)
left() { echo $((budget_s - ($(date +%s) - start))); }
pack() { tar -czf "$OUT/gpu-results.tar.gz.partial" -C "$RESULTS" . && mv "$OUT/gpu-results.tar.gz.partial" "$OUT/gpu-results.tar.gz"; }

# One step: a Python script with its arguments, cut off after $limit seconds (default 600); a
# step that fails or is cut off is reported and the run goes on with the next.
step() { echo; echo "== $* ($(left) s left)"; timeout "${limit:-600}" "$PY" "$@" || echo "== $1 failed or cut off (exit $?); going on"; pack; }

if [ -n "$quality" ]; then  # torch alone: no diffusers needed
    "$PY" -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$RESULTS/device.txt"
    if [ "$quality" = smoke ]; then
        step bench/gpu_quality.py --smoke --out "$RESULTS/quality"
    else
        limit=540 step bench/gpu_quality.py --out "$RESULTS/quality"
    fi
    echo "quality run done in $(( $(date +%s) - start )) s: $OUT/gpu-results.tar.gz"
    exit 0
fi

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    ls bench/wheels/*.whl >/dev/null 2>&1 || { echo "no diffusers and no bench/wheels/*.whl: see bench/gpu.sh --help"; exit 2; }
    site="$(mktemp -d)"
    "$PY" -m pip install --no-index --no-deps --quiet --target "$site" bench/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi

{
    echo "date: $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} | tee "$RESULTS/device.txt"

speed() { step bench/speed.py --out "$RESULTS" "$@"; }

if [ "$smoke" = 1 ]; then
    step bench/preflight.py --smoke --out "$RESULTS"
    speed --smoke --device cpu --tag smoke
    echo "smoke run done in $(( $(date +%s) - start )) s: $OUT/gpu-results.tar.gz"
    exit 0
fi

limit=180 step bench/preflight.py --out "$RESULTS"
speed --configs cifar10 --tasks train ddim50 --train-batches 128 --sample-batches 256 --rounds 5 --tag h200-cifar10
speed --configs stl10 --tasks ddim50 ddpm --sample-batches 64 --rounds 3 --min-round-s 0 --tag h200-stl10-64
if [ "$(left)" -gt 200 ]; then
    speed --configs cifar10 --tasks train ddim50 --train-batches 128 --sample-batches 256 --rounds 3 --compile --tag h200-cifar10-compile
else
    echo "skipped the compiled run: $(left) s left of $budget_s"
fi
echo "done in $(( $(date +%s) - start )) s: $OUT/gpu-results.tar.gz"
