#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one GPU): the layer benchmark at fp32 and under bf16 autocast,
# a profile of layer / accumulate at fp32 and bf16, ghostsys' loop overhead and the equivalence checker,
# all on CUDA; every table goes to one folder.
#
#   make gpu-check                      # = launch/gpu_check.sh runs/gpu-check
#   launch/gpu_check.sh OUT --cpu-smoke # the same steps, tiny and on CPU: proves the script runs here
#
# Without a CUDA device it says so and stops (exit 0): CI never has one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
MODE=${2:-}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

if [[ "$MODE" == "--cpu-smoke" ]]; then
  DEV=cpu
  BENCH=(--device cpu --threads 1 --quick)
  PROFILE=(--device cpu --model cnn --batch-size 32 --steps 2 --warmup 1 --profiled-steps 1)
  CHECK=(--batch-size 16 --target-gm 4 --steps 1 --modes layer)
  OVERHEAD=(--device cpu --reps 1 --steps 3 --warmup 1 --batch-size 32)
  LIMIT=1200  # a shared CPU box: generous
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: SKIPPED: torch sees no CUDA device ($("$PY" -c 'import torch; print("torch", torch.__version__)')); nothing run"
    exit 0
  fi
  DEV=cuda
  # The bench: every norm-layer shape of the three models at G_M=64 (issue 8's GPU target), layers only
  # (whole steps are the profile's). 16x16 synthetic images keep the profile short.
  BENCH=(--device cuda --threads 1 --reps 20 --rounds 3 --groups 1,64 --no-steps)
  PROFILE=(--device cuda --model resnet56 --batch-size 128 --steps 30 --warmup 5 --profiled-steps 3)
  CHECK=()
  OVERHEAD=(--device cuda --reps 5 --steps 30 --warmup 5 --model resnet56 --batch-size 128)
  LIMIT=150
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uptime
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda); [print(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
  if [[ "$DEV" == cuda ]] && command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step() {  # step NAME CMD...: run with a time limit, tee its table, say how long it took
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if timeout -k 30 "$LIMIT" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"; then
    echo "   ok in $((SECONDS - t0)) s -> $OUT/$name.md"
  else
    echo "   FAILED (exit $?) after $((SECONDS - t0)) s; see $OUT/$name.log"; FAILED=1
  fi
}
FAILED=0
step bench "$PY" -m ghostsys.bench "${BENCH[@]}"
step bench-bf16 "$PY" -m ghostsys.bench "${BENCH[@]}" --autocast bf16
step profile "$PY" launch/profile.py --modes layer,accumulate --world-sizes 1 --mixed-precision no,bf16 \
  --no-progress --out "$OUT/profile" "${PROFILE[@]}"
step overhead "$PY" -m ghostsys.profile.overhead --out "$OUT" "${OVERHEAD[@]}"
step check "$PY" launch/check.py --out "$OUT/check" "${CHECK[@]}"
echo "tables: $OUT/{bench,bench-bf16,profile,overhead,check}.md; profile rows: $OUT/profile/profile.csv"
exit $FAILED
