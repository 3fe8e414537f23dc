#!/usr/bin/env bash
# The GPU figures in one prepared run (about 8 minutes on one H200), for a lent device machine
# that has torch but no diffusers and no network. Everything goes to $OUT (default bench/results/gpu):
# device.txt (GPU, driver, torch, CUDA), speed-*.json/md from bench/speed.py, gpu.log.
#
#   pip download diffusers==0.42.1 importlib_metadata --no-deps -d bench/wheels   # here, once (ignored by git)
#   bash bench/gpu.sh                      # on the device: run tool, carry ["bench/wheels"], timeout ~540 s
#   bash bench/gpu.sh --smoke              # on a CPU: the same steps at smoke size, seconds
#
# Steps (each narrowed to fit the lease; bench/speed.py alternates ours and diffusers per round):
#   1. cifar10 training step, ours vs diffusers (bf16, channels_last), batch 128: img/s, ratio, MFU
#   2. cifar10 DDIM-50 throughput at batch 256
#   3. stl10, 64 images: DDIM-50 and DDPM-1000, time to the last image
#   4. cifar10 training step and DDIM-50 again with torch.compile (both sides), if time is left
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/gpu.log") 2>&1

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
budget_s="${GPU_BUDGET_S:-480}"
start=$(date +%s)
left() { echo $((budget_s - ($(date +%s) - start))); }

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    ls bench/wheels/*.whl >/dev/null 2>&1 || { echo "no diffusers and no bench/wheels/*.whl: see the header"; exit 2; }
    "$PY" -m pip install --no-index --no-deps --quiet bench/wheels/*.whl
fi

{
    echo "date: $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} | tee "$OUT/device.txt"

speed() { echo; echo "== bench/speed.py $* ($(left) s left)"; "$PY" bench/speed.py --out "$OUT" "$@"; }

if [ "$smoke" = 1 ]; then
    speed --smoke --device cpu --tag smoke
    echo "smoke run done in $(( $(date +%s) - start )) s"
    exit 0
fi

speed --configs cifar10 --tasks train ddim50 --train-batch 128 --sample-batches 256 --rounds 5 --tag h200-cifar10
speed --configs stl10 --tasks ddim50 ddpm --sample-batches 64 --rounds 3 --min-round-s 0 --tag h200-stl10-64
if [ "$(left)" -gt 200 ]; then
    speed --configs cifar10 --tasks train ddim50 --train-batch 128 --sample-batches 256 --rounds 3 --compile --tag h200-cifar10-compile
else
    echo "skipped the compiled run: $(left) s left of $budget_s"
fi
echo "done in $(( $(date +%s) - start )) s"
