#!/usr/bin/env bash
# Build a directory of wheels for a GPU cluster without internet access, on a machine that has it.
#
# The cluster is assumed to have Python, a CUDA build of torch, transformers, tokenizers and triton already (as GPU
# images usually do). The wheelhouse holds what such an image lacks: DeepSpeed (built here as a pure-Python wheel,
# its ops JIT-compile on the cluster), its dependencies, liger-kernel, and this project.
#
#   bash launch/make_wheelhouse.sh [OUT_DIR]          # default wheelhouse/
#   TARGET_PYTHON=3.12 bash launch/make_wheelhouse.sh  # wheels for the cluster's Python (default: this one's)
#
# Needs torch installed here (DeepSpeed's setup imports it; the CPU build is enough). At the end it prints the
# install line to run on the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-wheelhouse}"
TARGET_PYTHON="${TARGET_PYTHON:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
mkdir -p "$OUT"

# DeepSpeed from source, without its C++/CUDA ops (they build on first use on the cluster), for any platform.
DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DEEPSPEED_VERSION"
# This project, pure Python.
python -m pip wheel --no-deps --no-build-isolation -w "$OUT" .

# Binary wheels for the cluster's Python and Linux x86-64: what DeepSpeed and this project need beyond a GPU image.
download() {
    python -m pip download --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$OUT" "$@"
}
download pydantic hjson msgpack ninja py-cpuinfo einops psutil pyyaml tqdm
download --no-deps "liger-kernel>=0.5"   # its own needs (torch, triton) are the cluster's

cat <<EOF

wheelhouse ready: $OUT ($(ls "$OUT" | wc -l) wheels, for Python $TARGET_PYTHON on Linux x86-64)
copy it to the cluster and install with:
    python -m pip install --no-index --find-links $OUT --no-deps $OUT/*.whl
then, in the job: export TORCH_CUDA_ARCH_LIST=9.0   # (or your GPUs' arch, without suffixes like 9.0a)
EOF
