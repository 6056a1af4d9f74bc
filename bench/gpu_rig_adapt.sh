#!/usr/bin/env bash
# The rig-adaptation bench on a GPU machine (issue 14): bench/deblur_sources.py's rig protocol with the
# leave-one-source-out folds, each adapted on the GPU on its source's 5 known-good tiles
# (models/deblur/adapt.py), then restored and scored on the machine's CPUs as on this one.
#
#   bench/gpu_rig_adapt.sh prepare      (here, once: builds the four carried folders below, ~60 MiB with the repo)
#   bench/gpu_rig_adapt.sh OUT_DIR STEPS [THREADS] [BENCH OPTIONS...]      (STEPS: one run per number, "1000 200")
#
# Carried (git-ignored; `prepare` builds them from ../shared and models/deblur/loso):
#   .whl/                pydantic and what it needs, for the machine's CPython 3.12 (it has the rest);
#   .gpu/em-corpus-1024  the em-corpus's top-level PNGs centre-cropped to 1024 px (the bench's tiles are
#                        unchanged: it never reads beyond the centre 1024 px), 13 MB instead of 20;
#   .gpu/isbi2012-train  the ISBI volume (its test slices are a source);
#   .gpu/loso-onnx       each fold's .onnx and .json; its .pt2 is rebuilt there for the machine's torch.
# DEVICE=cpu runs the same steps here (a rehearsal; it leaves .pt2 files in .gpu/loso-onnx: prepare again after).
set -u
if [ "${1:-}" = prepare ]; then
  set -e
  cd "$(dirname "$0")/.."
  [ -x .venv/bin/python ] && export PATH=$PWD/.venv/bin:$PATH  # the project's venv (cv2, the appliance)
  rm -rf .whl .gpu/em-corpus-1024 .gpu/loso-onnx && mkdir -p .whl .gpu/loso-onnx .gpu/isbi2012-train
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  [ -f .gpu/isbi2012-train/29.png ] || cp ../shared/data/isbi2012-train/*.png .gpu/isbi2012-train/
  cp models/deblur/loso/loso-*.onnx models/deblur/loso/loso-*.json .gpu/loso-onnx/ && rm .gpu/loso-onnx/loso-all.*
  PYTHONPATH=$PWD python3 - <<'PY'
from pathlib import Path
import cv2
from appliance.pixels import centre_crop
from appliance.tile_io import read_tile
for folder in sorted(p for p in Path("../shared/data/em-corpus").iterdir() if p.is_dir()):
    (Path(".gpu/em-corpus-1024") / folder.name).mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.png")):
        if path.name != "contact.png":  # bench/detector_sources.py reads these and crops <= 1024 px
            cv2.imwrite(str(Path(".gpu/em-corpus-1024") / folder.name / path.name), centre_crop(read_tile(path), 1024))
PY
  du -sh .whl .gpu/em-corpus-1024 .gpu/isbi2012-train .gpu/loso-onnx
  exit 0
fi
out=$(realpath -m "${1:?usage: bench/gpu_rig_adapt.sh OUT_DIR STEPS [THREADS] [OPTIONS...]}")
steps=${2:?steps}
threads=${3:-8}
shift $(($# < 3 ? $# : 3))
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1 ISBI2012_DIR=$PWD/.gpu/isbi2012-train
if [ "$device" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=$PWD:/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
else
  export PYTHONPATH=$PWD
fi
python3 -c 'import torch, pydantic, onnxruntime, cv2
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "pydantic", pydantic.__version__)' || exit 3
started=$SECONDS
for model in .gpu/loso-onnx/*.onnx; do  # a .pt2 saved by a newer torch does not load in an older one
  (python3 -c "import torch; torch.export.load('${model%.onnx}.pt2')" 2>/dev/null \
    || python3 -m models.deblur.rebuild_program --weights "$model" >/dev/null) &
done
wait $(jobs -p)  # not a bare wait: bash 5.1+ would also wait for the tee above
for model in .gpu/loso-onnx/*.onnx; do [ -f "${model%.onnx}.pt2" ] || { echo "no program for $model"; exit 4; }; done
echo "programs ready in $((SECONDS - started)) s"
for n in $steps; do  # STEPS may list several runs: "1000 200"
  python3 bench/deblur_sources.py --corpus .gpu/em-corpus-1024 --loso .gpu/loso-onnx --calibrated \
    --threads "$threads" --adapt-steps "$n" --adapt-device "$device" --out "$out/rig$n.json" "$@"
  echo "bench $n steps exit $?, $((SECONDS - started)) s"
done
