#!/usr/bin/env bash
# The benchmark pass for a lent NVIDIA GPU, sized to fit one short lease (about 6 minutes).
#
#   bash benchmarks/gpu.sh            # JSON lines and logs under $OUT (default /tmp/eegkd-gpu)
#
# It runs under the machine's own python3, which is expected to hold JAX with CUDA (the project's
# pins do not apply there). Python wheels that machine lacks (ml_collections) can be put in .whl/
# beside this repository's root: they are installed to /tmp/site first. It has no TensorFlow, so
# the end-to-end records are benchmarks/end_to_end.py's "resident" path (the loop's data path and
# k-step calls without TFDS and TensorBoard); the step-only figures come with each record.
#
# In order of what matters most, each part under its own time limit:
#   okd32   U-Sleep online KD at batch 32, 1 and 5 steps per call (dispatch-bound at batch 32)
#   kd32    U-Sleep offline KD and supervised at batch 32, 1 and 5 steps per call (with okd32:
#           the per-run times of the :paper study)
#   sup512  U-Sleep supervised at batch 512
#   cmt     the transformer, supervised, batch 512
# PARTS="okd32 sup512" bash benchmarks/gpu.sh runs only the parts named (default: all).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/eegkd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv
  python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/machine.txt"

PARTS=${PARTS:-okd32 sup512 kd32 cmt}
part() {  # part NAME SECONDS end_to_end.py-arguments...
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" ${name%%-*} "*) ;; *) return 0 ;; esac
  echo "== $name" >>"$OUT/stderr.log"
  timeout "$limit" python3 benchmarks/end_to_end.py --path resident "$@" \
    2>>"$OUT/stderr.log" | tee -a "$OUT/end_to_end.jsonl"
  echo "== $name: exit ${PIPESTATUS[0]} (124 = over its ${limit} s)"
  tail -n 3 "$OUT/stderr.log"
}

# 8/3-h nights: 2 training nights of 320 epochs, 20 steps a pass at batch 32, so that calls of 5
# steps never cross a pass (the loop ends a call at a pass, see train/loop.py)
E2E="--steps 100 --hours 2.6667"
part okd32 ${OKD_S:-150} --model usleep --mode online_kd --batch 32 --steps-per-call 1,5 $E2E
part kd32-off ${KD_S:-110} --model usleep --mode offline_kd --batch 32 --steps-per-call 1,5 $E2E
part kd32-sup ${KD_S:-100} --model usleep --mode supervised --batch 32 --steps-per-call 1,5 $E2E
part sup512 ${SUP_S:-90} --model usleep --mode supervised --batch 512 --steps-per-call 1 $E2E
part cmt ${CMT_S:-90} --model cmt --mode supervised --batch 512 --steps-per-call 1 $E2E

# A short table last (the lease's reply carries the end of the output).
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1] + "/end_to_end.jsonl"):
    r = json.loads(line)
    print(f'{r["model"]:6} {r["mode"]:10} b{r["batch"]:<4} k{r["steps_per_call"]:<3} '
          f'{r["windows_per_s"]:>10} w/s  step-only {r["step_only_windows_per_s"]:>10}  '
          f'ratio {r["ratio"]}')
PY
