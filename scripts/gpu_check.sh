#!/usr/bin/env bash
# Issue #6 device check, ONE call on a lent NVIDIA GPU: the full-size benchmark (fast path vs
# torch reference vs transformers generate(), peak memory, token agreement) with compiled and
# with eager element-wise ops, the CUDA tests, and a kernel profile. Every output lands in $OUT
# (7 files). GPU_CHECK_STEPS picks steps (default: bench bench_eager_ops pytest profile).
#   device machine:   bash scripts/gpu_check.sh
#   CPU dry run:      BENCH_SIZE=tiny BENCH_DEVICE=cpu bash scripts/gpu_check.sh
# Needs python3 with torch, transformers, timm, safetensors, tokenizers, pytest (no install:
# `openvla_model` is imported from model/ through a temporary link).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/artifacts/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SIZE=${BENCH_SIZE:-full}
DEVICE=${BENCH_DEVICE:-cuda}
RUNS=${BENCH_RUNS:-20}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SHIM=$(mktemp -d)
ln -s "$ROOT/model" "$SHIM/openvla_model"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME LIMIT_S CMD...: output to $OUT/NAME.txt, status line on stdout
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name: start (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "=== $name: rc=$rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers, timm; print(sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "timm", timm.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")' 2>&1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

STEPS=${GPU_CHECK_STEPS:-bench bench_eager_ops pytest profile}
for s in $STEPS; do
  case $s in
    bench) step bench 210 "$PY" -m openvla_ros.bench --size "$SIZE" --device "$DEVICE" --runs "$RUNS" \
             --json "$OUT/bench.json" ;;
    bench_eager_ops) OPENVLA_TORCH_COMPILE=0 step bench_eager_ops 120 "$PY" -m openvla_ros.bench --size "$SIZE" \
             --device "$DEVICE" --runs "$((RUNS / 2 > 0 ? RUNS / 2 : 1))" --json "$OUT/bench_eager_ops.json" ;;
    pytest) step pytest 120 "$PY" -m pytest -q -rs -p no:cacheprovider test/test_cuda_fast_path.py ;;
    profile) step profile 120 "$PY" scripts/profile_fast_path.py ;;
    *) echo "unknown step $s" ;;
  esac
done

rm -rf "$SHIM"
for s in $STEPS; do
  [ -f "$OUT/$s.txt" ] || continue
  echo "################ $s"
  case $s in
    bench*) grep -v '^\[bench\]\|WARNING' "$OUT/$s.txt" | tail -n 45 ;;
    *) tail -n 45 "$OUT/$s.txt" ;;
  esac
done
