#!/usr/bin/env bash
# One command for a GPU machine without network: install, run the gpu-marked tests, the kernel
# microbenchmarks and the DiT-XL/2 ladder (256 px, batch 1 and 8, 50 DDIM steps), writing logs and
# results into OUTDIR. Each stage has its own time limit (about 8 minutes in all) so that a slow stage
# cannot starve the others; the ladder's torch.compile rows (minutes of max-autotune) run last.
#
#   bash bench/gpu_check.sh OUTDIR
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-22s rc=%-3s %4ss%s\n' "$name" "$rc" "$((SECONDS - start))" \
        "$([ "$rc" = 124 ] && echo "  (time limit ${limit}s)")" | tee -a "$OUT/summary.txt"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
} > "$OUT/env.txt"
stage install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -m ditengine.info >> "$OUT/env.txt" 2>&1
stage gpu-tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
stage bench-ladder 110 "$PY" -m ditengine.bench --model DiT-XL/2 --image-size 256 --batch 1,8 --dtype bf16 \
    --steps 50 --variants eager-fp32,eager-lp,eager-lp-sdpa,fused,fused+precond,fused+graph-step,fused+graph-loop \
    --out "$OUT"
stage bench-attention 80 "$PY" -m ditengine.bench.attention --out "$OUT"
stage bench-adaln 50 "$PY" -m ditengine.bench.adaln --out "$OUT"
stage bench-scheduler-step 30 "$PY" -m ditengine.bench.scheduler_step --out "$OUT"
stage bench-mlp-epilogue 30 "$PY" -m ditengine.bench.mlp_epilogue --out "$OUT"
stage bench-ladder-compile 120 "$PY" -m ditengine.bench --model DiT-XL/2 --image-size 256 --batch 1,8 \
    --dtype bf16 --steps 50 --variants compile --out "$OUT"
echo "--- summary"; cat "$OUT/summary.txt"
echo "--- gpu tests"; tail -n 15 "$OUT/gpu-tests.log"
echo "--- ladder"; grep -E '^\|' "$OUT/bench-ladder.log" "$OUT/bench-ladder-compile.log" | cut -d: -f2-
