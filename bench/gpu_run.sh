#!/usr/bin/env bash
# One run on a GPU machine (H100/H200), sized to a time budget: bench/gpu_suite.py (issue 9's figures),
# then, when its recipe and packed data are there, a wall-clock-capped deblur training run
# (models/deblur/gpu.yaml) whose checkpoint and curves land in OUT_DIR/deblur/ for export on a CPU machine.
#
#   bench/gpu_run.sh OUT_DIR [BUDGET_S]
#
# Packages the GPU machine lacks can come as a tarball of site-packages: $CARRY_DIR/site.tar.xz (added to
# sys.path after the machine's own packages); real EM for the tiles: $CARRY_DIR/isbi2012-train/ (else
# ../shared/data); packed training data: $CARRY_DIR/em_train.npz (models/deblur/pack_data.py).
# `bash bench/gpu_carry.sh` builds all three.
#
# LOSO_BUDGET_S=N (seconds) then runs the leave-one-source-out deblur training of issue 14
# (models/deblur/loso.py, recipe models/deblur/loso.yaml; LOSO_ARGS adds options, e.g. round 2:
# "--config models/deblur/loso_deep.yaml --init-dir .gpu/loso-v4 --seen-by-parent"); its weights come
# back as OUT_DIR/loso/*.tar.
# SUITE_BUDGET_S=0 skips the suite.
#
# The suite includes rows with 2 and 4 microscopes on one appliance (sharp tiles at 25.4/s each).
# DEVICE=cpu SUITE_ARGS="--side 512 --scale 0.06" runs the same steps on a CPU machine (a rehearsal).
set -u
out=$(realpath -m "${1:?usage: bench/gpu_run.sh OUT_DIR [BUDGET_S]}")
budget=${2:-540}
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
carry=${CARRY_DIR:-.gpu}
started=$SECONDS
left() { echo $((budget - (SECONDS - started))); }
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled PYTHONPATH=$PWD

if [ -f "$carry/site.tar.xz" ] && [ "$device" = cuda ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf "$carry/site.tar.xz" || exit 2
  echo /tmp/site >"$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_carried.pth"
fi
[ -d "$carry/isbi2012-train" ] && export ISBI2012_DIR=$PWD/$carry/isbi2012-train
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
# Fail fast (seconds, not minutes) when the stack is incomplete.
python3 -c 'import ray, zmq, pydantic, torch, onnxruntime, cv2, tifffile, typer, rich, msgpack, yaml
print("ray", ray.__version__, "zmq", zmq.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())
assert torch.cuda.is_available() or "'"$device"'" == "cpu"' || exit 3
# A .pt2 saved by a newer torch does not load in an older one: rebuild it from the ONNX weights.
loadable_program() {  # loadable_program MODEL.onnx: its .pt2 loads in this torch, rebuilt from the ONNX if not
  python3 -c "import torch; torch.export.load('${1%.onnx}.pt2')" 2>/dev/null \
    || python3 -m models.deblur.rebuild_program --weights "$1"
}
loadable_program appliance/weights/deblur.onnx || exit 4
echo "setup done, $(left) s left"

suite_s=${SUITE_BUDGET_S:-230}
if [ "$suite_s" -gt 0 ]; then
  # shellcheck disable=SC2086  # SUITE_ARGS is a list of options
  timeout $((suite_s + 45)) python3 bench/gpu_suite.py --device "$device" --out "$out" --budget-s "$suite_s" ${SUITE_ARGS:-}
  echo "suite exit $?, $(left) s left"
fi

# DEBLUR_MODELS="A.onnx B.onnx" then times each model's bare deblur loop and torch.compile on this machine
# (bench/gpu_suite.py --deblur-only, DEBLUR_BUDGET_S each, into OUT_DIR/speed-<name>/): a candidate against
# the bundled weights in the same call.
for model in ${DEBLUR_MODELS:-}; do
  loadable_program "$model" || continue
  name=$(basename "$model" .onnx)
  # shellcheck disable=SC2086  # DEBLUR_ARGS is a list of options
  timeout $((${DEBLUR_BUDGET_S:-100} + 45)) python3 bench/gpu_suite.py --device "$device" --deblur-only \
    --deblur-model "$model" --out "$out/speed-$name" --budget-s "${DEBLUR_BUDGET_S:-100}" ${DEBLUR_ARGS:-}
  echo "deblur speed $name exit $?, $(left) s left"
done

loso_s=${LOSO_BUDGET_S:-0}
if [ "$loso_s" -gt 0 ] && [ -f "$carry/em_train.npz" ]; then
  # Runs train under /tmp: at most 8 files come back, so only the tars, the summary and the logs go to OUT.
  # shellcheck disable=SC2086  # LOSO_ARGS is a list of options (e.g. --config ... --init-dir ...)
  timeout $((loso_s + 90)) python3 -m models.deblur.loso --device "$device" --data "$carry/em_train.npz" \
    --out-dir /tmp/loso --budget-s "$loso_s" --workers "${LOSO_WORKERS:-5}" ${LOSO_ARGS:-}
  echo "loso exit $?, $(left) s left"
  mkdir -p "$out/loso" && cp /tmp/loso/*.tar /tmp/loso/loso.json "$out/loso/" 2>/dev/null
  tar -C /tmp/loso -czf "$out/loso/logs.tar.gz" --exclude='*.pt' --exclude='*.tar' .
fi

train_config=${TRAIN_CONFIG:-models/deblur/gpu.yaml}
if [ -f "$train_config" ] && [ -f "$carry/em_train.npz" ]; then
  # Leave 80 s for validation, saving and the exported program's speed.
  minutes=$(python3 -c "print(max(0.5, ($(left) - 80) / 60))")
  echo "training for $minutes min"
  timeout $(($(left) - 20)) python3 -m models.deblur.train --config "$train_config" --device "$device" \
    --data "$carry/em_train.npz" --out-dir /tmp/deblur-runs --max-minutes "$minutes"
  echo "train exit $?, $(left) s left"
  run=$(dirname "$(ls -t /tmp/deblur-runs/*/best.pt 2>/dev/null | head -1)")
  if [ -n "$run" ] && [ "$run" != . ]; then
    mkdir -p "$out/deblur" && cp "$run"/best.pt "$run"/metrics.json "$run"/config.yaml "$out/deblur/"
    if [ -f bench/gpu_deblur_speed.py ] && [ "$(left)" -gt 30 ]; then
      timeout $(($(left) - 10)) python3 bench/gpu_deblur_speed.py --run "$run" --device "$device" \
        --out "$out/deblur/speed.json"
    fi
  fi
fi
echo "done, $(left) s left"
