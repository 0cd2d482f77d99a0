#!/usr/bin/env bash
# The device tier's check on a GPU machine (issue 7), run from the repository root:
#
#   OUT=/tmp/out bash bench/gpu/memory_check.sh
#
# It prints the toolchain, unpacks abseil and googletest from .gpu-debs/ into a prefix if that
# folder is there (the GPU machines have no development packages; bench/gpu/fetch-debs), builds
# bench/gpu/ (a standalone CMake project: the device tier's sources, its test and offload_bench)
# into $BUILD_DIR, then runs the test, offload_bench's self-check against a CPU reference, the
# benchmark at its defaults (states 4x over the device budget) and at 8x, the offloaded run of
# a model whose states exceed the device's memory, and bench/gpu/nccl_check.sh. Each step is logged with
# its time to $OUT/memory_check.log; a failed step does not stop the ones that do not depend on it.
#
#   OUT        results: memory_check.log, device_test.json, offload_bench*.json (default /tmp/out)
#   BUILD_DIR  the build tree (default /tmp/gpu-build)
#   CUDA_ARCH  CMAKE_CUDA_ARCHITECTURES (default 90, H100/H200)
#
# Exit status: 0 when every step passed, 77 when none failed but one was skipped (no usable GPU),
# else 1. About 2 minutes on an H100, most of it the build.
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/out}
BUILD_DIR=${BUILD_DIR:-/tmp/gpu-build}
CUDA_ARCH=${CUDA_ARCH:-90}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$OUT"
LOG=$OUT/memory_check.log
: > "$LOG"
export PATH="$PATH:$CUDA_HOME/bin"

NAME=memory_check
# shellcheck source=bench/gpu/steps.sh
source bench/gpu/steps.sh

say "repository $(pwd), results in $OUT, build in $BUILD_DIR, started $(date -u +%FT%TZ)"
step nvidia-smi 30 nvidia-smi -L
info nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max,driver_version \
  --format=csv
info nvcc --version
info g++ --version
info cmake --version
info nproc

# abseil and googletest as Debian packages (with the rest of .gpu-debs), unpacked into a prefix
# that CMake is pointed at: over / they would replace the machine's own libraries (OpenSSL).
unpack_debs /tmp/gpu-debs-root

GENERATOR=(-G Ninja)
command -v ninja > /dev/null 2>&1 || GENERATOR=()
built=0
if step configure 180 cmake -S bench/gpu -B "$BUILD_DIR" "${GENERATOR[@]}" \
     -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" "${PREFIX_ARGS[@]}"; then
  # Separately, so that a test that does not build leaves the benchmark buildable.
  step build-bench 300 cmake --build "$BUILD_DIR" --target offload_bench -j 16 && built=1
  step build-test 300 cmake --build "$BUILD_DIR" --target memory_device_cache_test -j 16
else
  not_run build-bench "configure failed"
fi

if [ -x "$BUILD_DIR/memory_device_cache_test" ]; then
  step device-test 180 "$BUILD_DIR/memory_device_cache_test" \
    --gtest_output="json:$OUT/device_test.json"
else
  not_run device-test "no test binary"
fi

if [ "$built" = 1 ]; then
  step offload-check 120 "$BUILD_DIR/offload_bench" --check --json "$OUT/offload_check.json"
  case $? in
    0)
      step offload-bench 240 "$BUILD_DIR/offload_bench" --json "$OUT/offload_bench.json"
      step offload-bench-over8 240 "$BUILD_DIR/offload_bench" --over 8 \
        --json "$OUT/offload_bench_over8.json"
      # States beyond the device's whole memory (108 layers of 8192^2: 81 GiB of weights and
      # moments in pinned host memory, against an 80 GB H100), under a budget of a tenth of them.
      step offload-beyond-device 300 "$BUILD_DIR/offload_bench" --offloaded-only --d 8192 \
        --layers "${BEYOND_LAYERS:-108}" --tokens 4096 --steps 3 --over 10 \
        --json "$OUT/offload_beyond_device.json"
      ;;
    77) say "no usable GPU: the benchmark is skipped too"; skipped+=(offload-bench) ;;
    *) not_run offload-bench "the self-check failed: its figures would mean nothing" ;;
  esac
else
  not_run offload-check "offload_bench did not build"
fi

# NCCL on this machine too (bench/gpu/nccl_check.sh: one rank per GPU here), since it is lent.
step nccl-check 300 env OUT_DIR=/tmp/nccl bash bench/gpu/nccl_check.sh 2 268435456 10

finish
