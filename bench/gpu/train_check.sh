#!/usr/bin/env bash
# shoal's trainer on a GPU machine (issue 16), run from the repository root, unattended:
#
#   OUT=/tmp/out bash bench/gpu/train_check.sh [--device cuda|cpu]
#
# It builds shoal's core (SHOAL_COORDINATOR=OFF, SHOAL_MPI=OFF: the GPU machines have no gRPC or
# MPI) against the LibTorch it finds: PyTorch's (python3 -c 'import torch'), with CUDA, on a GPU
# machine; Debian's elsewhere. Debian packages for the rest (abseil, protobuf, toml++, JSON,
# CLI11, OpenSSL headers, googletest) come from .gpu-debs/ (bench/gpu/README.md says how to
# fetch them) and are unpacked into a prefix. Then it runs the model's tests that do not need
# the coordinator, `shoal profile`, and `bench train` on tiny and small at fp32 and bf16, one
# JSON line per result in $OUT/results.jsonl. With --device cuda it ends with memory_check.sh
# (the device tier and NCCL). A failed step does not stop the ones that do not depend on it.
#
#   OUT        results: train_check.log, results.jsonl, profile.json, and details.tar.gz (each
#              test's JSON, memory_check.sh's results): four files, as a device call returns
#   BUILD_DIR  the build tree (default /tmp/shoal-core)
#   CUDA_ARCH  CMAKE_CUDA_ARCHITECTURES (default 90, H100/H200)
#   STEPS      timed steps of each bench train run (default 20)
#
# --device cpu checks the script itself on a machine without a GPU (what CI machines are).
# Exit status: 0 when every step passed, 77 when none failed but one was skipped, else 1.
#
# What it does not do yet: train on the GPU (train.device = "cuda" is not implemented; the
# bench train runs use the CPU, with the aten kernels the GPU path will use).
set -u
cd "$(dirname "$0")/../.." || exit 1
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 ;;
    *) echo "train_check: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cpu) ;;
  *) echo "train_check: --device must be cuda or cpu" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}
BUILD_DIR=${BUILD_DIR:-/tmp/shoal-core}
CUDA_ARCH=${CUDA_ARCH:-90}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
LOG=$OUT/train_check.log
RESULTS=$OUT/results.jsonl
DETAILS=$BUILD_DIR/details   # tarred into $OUT at the end
rm -rf "$DETAILS"
mkdir -p "$DETAILS/tests"
: > "$LOG"
: > "$RESULTS"
export PATH="$PATH:$CUDA_HOME/bin"
NAME=train_check
# shellcheck source=bench/gpu/steps.sh
source bench/gpu/steps.sh

say "repository $(pwd), device $DEVICE, results in $OUT, build in $BUILD_DIR"
say "started $(date -u +%FT%TZ)"
if [ "$DEVICE" = cuda ]; then
  step nvidia-smi 30 nvidia-smi -L
  info nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
info nvcc --version
info g++ --version
info cmake --version
info nproc

# A python3 with PyTorch (the golden test's reference runs on it): the one on PATH, else the
# system's (Debian's python3-torch).
PY=$(command -v python3 || true)
for p in "$PY" /usr/bin/python3; do
  if [ -n "$p" ] && "$p" -c 'import torch' 2> /dev/null; then PY=$p; break; fi
done
# LibTorch: PyTorch's where that python3 has it (its CMake prefix), else the system's.
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
if [ -n "$TORCH_PREFIX" ]; then
  info "$PY" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda,
    "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
else
  say "no PyTorch for python3: the system's LibTorch"
fi
unpack_debs /tmp/gpu-debs-root
if [ -n "$TORCH_PREFIX" ]; then
  if [ ${#PREFIX_ARGS[@]} -gt 0 ]; then
    PREFIX_ARGS=(-DCMAKE_PREFIX_PATH="${PREFIX_ARGS[0]#-DCMAKE_PREFIX_PATH=};$TORCH_PREFIX")
  else
    PREFIX_ARGS=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX")
  fi
fi

GENERATOR=(-G Ninja)
command -v ninja > /dev/null 2>&1 || GENERATOR=()
TESTS=(runtime_piece_ops_test runtime_mixed_precision_test runtime_gpt_golden_test
       runtime_kernels_test memory_device_cache_test comm_backend_test)
built=0
if step configure 300 cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
     -DSHOAL_COORDINATOR=OFF -DSHOAL_MPI=OFF -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
     -DSHOAL_PYTHON="$PY" "${PREFIX_ARGS[@]}"; then
  # The binary first and alone, so that a test that does not build leaves it usable.
  step build-shoal 900 cmake --build "$BUILD_DIR" --target shoal -j "$(nproc)" && built=1
  step build-tests 900 cmake --build "$BUILD_DIR" --target "${TESTS[@]}" -j "$(nproc)"
else
  not_run build-shoal "configure failed"
fi

for t in "${TESTS[@]}"; do
  bin=$(find "$BUILD_DIR/tests" -name "$t" -type f -perm -u+x 2> /dev/null | head -1)
  if [ -z "$bin" ]; then
    not_run "$t" "not built"
    continue
  fi
  step "$t" 600 "$bin" --gtest_output="json:$DETAILS/tests/$t.json"
done

if [ "$built" = 1 ]; then
  SHOAL=$BUILD_DIR/shoal
  step profile 300 bash -c "'$SHOAL' profile --json > '$OUT/profile.json'"
  # A corpus from the repository's own text (no network on the GPU machines).
  data=$BUILD_DIR/train-check-data
  if step prepare-data 300 "$SHOAL" prepare-data --input README.md docs runtime parallel memory \
       comm --out "$data" --no-progress; then
    for config in tiny small; do
      for dtype in fp32 bf16; do
        step "bench-train-$config-$dtype" 600 bash -c "set -o pipefail; \
          '$SHOAL' bench train --config configs/$config.toml --set data.dir='$data' \
             train.dtype=$dtype train.kernels=aten --steps $STEPS \
           | tee /dev/stderr | tail -1 \
           | sed 's/^{/{\"check\":\"bench-train\",\"dtype\":\"$dtype\",\"kernels\":\"aten\",/' \
           >> '$RESULTS'"
      done
    done
  else
    not_run bench-train "no data"
  fi
else
  not_run profile "shoal did not build"
  not_run bench-train "shoal did not build"
fi

if [ "$DEVICE" = cuda ]; then
  # The device tier under relu layers and NCCL (issue 7's check, its own build).
  step memory-check 900 env OUT="$DETAILS/memory" bash bench/gpu/memory_check.sh
fi
tar czf "$OUT/details.tar.gz" -C "$DETAILS" . && say "details in $OUT/details.tar.gz"
finish
