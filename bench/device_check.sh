#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA paths end to end and the side-by-side benchmark with every model on
# the GPU. The machine has torch but no fastapi/uvicorn/pydantic and no network, so the call carries:
#   .whl/      the service's and LitServe's wheels for its Python (bench/README.md, "On a GPU": how to make both)
#   .devdata/  mnist/ (IDX files), bin/wrk and lib/libluajit-5.1.so.2 (wrk's one library the machine lacks)
# Phases, each bounded and chosen with PHASES (default all): train on CUDA (digits, then MNIST 28x28; the others
# need it), bench (the side-by-side benchmark), costs (service.core.runtime_costs: the runtime over the model alone),
# tests (the serving tests on CUDA). Everything worth keeping lands in $OUT (at most 8 files come back).
set -u
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
PHASES="${PHASES:-bench costs tests}"
log() { echo "== $(date +%T) $*"; }
want() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; echo "$((SECONDS - t0)) s wall, exit $rc: $*" >> "$OUT/train.log"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
if LD_LIBRARY_PATH=.devdata/lib .devdata/bin/wrk -v 2>&1 | grep -q "^wrk"; then
  export PATH="$PWD/.devdata/bin:$PATH" LD_LIBRARY_PATH="$PWD/.devdata/lib"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import fastapi, uvicorn, litserve" || exit 1  # every wheel there: fail before any work
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); import shutil; print('wrk', shutil.which('wrk'))" \
  | tee -a "$OUT/machine.txt"
nproc | tee -a "$OUT/machine.txt"

if want bench; then  # the cold-start model
  log "train: digits on CUDA"
  timed timeout 120 python3 -m training --device cuda --out /tmp/m/digits/vae.ts --no-report >> "$OUT/train.log" 2>&1
  tail -4 "$OUT/train.log"
fi
log "train: MNIST 28x28 on CUDA, ${MNIST_EPOCHS:-3} epochs"
timed timeout 150 python3 -m training --device cuda --data idx:.devdata/mnist --epochs "${MNIST_EPOCHS:-3}" \
  --eval-k 100 --eval-n 500 --out /tmp/m/mnist/vae.ts --no-report >> "$OUT/train.log" 2>&1
grep -E "epoch|bits/dim|nats|wall" "$OUT/train.log" | tail -8

if want bench && [ -f /tmp/m/mnist/vae.ts ]; then
  log "bench on CUDA"
  timeout "${BENCH_TIMEOUT:-240}" python3 -m bench --device cuda --model /tmp/m/mnist/vae.ts \
    --images idx:.devdata/mnist --cold-start-model /tmp/m/digits/vae.ts --servers ours naive litserve ceiling \
    --workloads encode_c1 encode_c64 anomaly_c16 npy256_c1 --lit-workers 1 --rounds 1 --duration 4 --warmup 1 \
    --open-loop 4 --cold-starts 1 --out /tmp/bench-gpu > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  cp /tmp/bench-gpu/results.md /tmp/bench-gpu/results.json "$OUT/" 2>/dev/null
  tail -n 30 /tmp/bench-gpu/logs/*.log > "$OUT/server-logs.txt" 2>/dev/null
  tail -5 "$OUT/bench.log"
fi

if want costs && [ -f /tmp/m/mnist/vae.ts ]; then
  log "runtime costs on CUDA (MNIST 28x28 model)"
  timeout 90 python3 -m service.core.runtime_costs --model /tmp/m/mnist/vae.ts --device cuda 2>&1 | tee "$OUT/costs.md"
fi

if want tests; then
  log "serving tests on CUDA"
  timeout "${TEST_TIMEOUT:-130}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" \
    tests/service/core tests/service/api tests/training/test_export.py > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/pytest.log" | tail -25
fi
log "done"
[ -f "$OUT/results.md" ] && sed -n '1,60p' "$OUT/results.md"
