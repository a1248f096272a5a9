#!/usr/bin/env bash
# The benchmark pass for a lent NVIDIA GPU, sized to fit one short lease (about 10 minutes).
#
#   bash benchmarks/gpu.sh            # JSON lines and logs under $OUT (default /tmp/eegkd-gpu)
#
# It runs under the machine's own python3, which is expected to hold JAX with CUDA and PyTorch
# (the project's pins do not apply there). Python wheels that machine lacks (ml_collections) can
# be put in .whl/ beside this repository's root: they are installed to /tmp/site first. tf.data
# is not needed by anything run here, so the pipeline and first-step-through-train.py records are
# left to the CPU runs.
#
# In order of what matters most, each part under its own time limit so that one slow compile
# cannot take the rest with it (on an H200 the f32 part needed about 300 s, bf16 about 100 s:
# step compiles there take 11 - 28 s each, autotuning cuDNN's algorithms):
#   f32    every model and mode at batch 32 and at the largest batch up to 512, the PyTorch
#          reference step on the same GPU, and the card's measured ceilings (matrix products, copy)
#   bf16   the supervised steps in bfloat16 (batch 32 and largest)
#   start  whole-night inference, time to the first step (default online-KD config), cold / warm
#   cmdbuf U-Sleep's batch-32 steps with command buffers around cuDNN / cuBLAS (an experiment),
#          and the same steps without them just before, for a same-machine comparison
#   big    the supervised steps at the largest batch up to 4096
# PARTS="cmdbuf big" bash benchmarks/gpu.sh runs only the parts named (default: all).
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
  python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, "flax",
flax.__version__, "optax", optax.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$OUT/machine.txt"

PARTS=${PARTS:-f32 bf16 start cmdbuf big}
part() {  # part NAME SECONDS run.py-arguments...
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" ${name%%-*} "*) ;; *) return 0 ;; esac
  # One shared stderr log: the lease brings back at most 8 files.
  echo "== $name" >>"$OUT/stderr.log"
  timeout "$limit" python3 benchmarks/run.py "$@" 2>>"$OUT/stderr.log" | tee "$OUT/$name.jsonl"
  echo "== $name: exit ${PIPESTATUS[0]} (124 = over its ${limit} s)"
  tail -n 5 "$OUT/stderr.log"
}

part f32 ${F32_S:-310} --torch --torch-python python3 --steps 20 --max-batch 512 \
  --skip online_kd_cost,first_step,night_inference,pipeline
part bf16 ${BF16_S:-110} --dtype bfloat16 --modes supervised --steps 20 --max-batch 512 \
  --skip ceilings,online_kd_cost,first_step,night_inference,pipeline
# The first-step children start their own JAX: no process may take three quarters of the card.
XLA_PYTHON_CLIENT_PREALLOCATE=false part start ${START_S:-60} --quick --models usleep,cmt \
  --skip ceilings,train_step,online_kd_cost,pipeline

# At batch 32 the U-Sleep steps were launch-bound on an H200 (README): the same steps with XLA's
# command buffers (CUDA graphs) extended to the cuDNN and cuBLAS calls, against the same steps
# without them run just before on the same card.
CMDBUF_ARGS="--models usleep --modes supervised,offline_kd,online_kd --steps 20
  --skip ceilings,largest,online_kd_cost,first_step,night_inference,pipeline"
part cmdbuf-off ${CMDBUF_S:-100} $CMDBUF_ARGS
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL" \
  part cmdbuf ${CMDBUF_S:-100} $CMDBUF_ARGS
part big ${BIG_S:-150} --models usleep,cmt --modes supervised --steps 20 --max-batch 4096 \
  --skip ceilings,online_kd_cost,first_step,night_inference,pipeline

# A short table last (the lease's reply carries the end of the output).
python3 - "$OUT" <<'EOF'
import glob, json, sys
rows = []
for path in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        k = r.get("kind")
        if k in ("train_step", "torch_step"):
            rows.append(f'{k[:5]:5} {r.get("framework", "torch"):5} {r["model"]:6} {r["mode"]:10} '
                        f'{r.get("dtype", "f32"):8} b{r["batch"]:<4} {r["windows_per_s"]:>9} w/s '
                        f'{r.get("tflop_per_s", "")} TF/s peak {r.get("peak_device_mb", "")} MB '
                        f'compile {r.get("compile_s", "")} s')
        elif k:
            rows.append(json.dumps({a: b for a, b in r.items() if a not in ("host", "cpu")})[:300])
print("\n".join(rows))
EOF
