#!/usr/bin/env bash
# Best-effort NCCL all-reduce check for a GPU machine: builds bench/gpu/nccl_allreduce_check.cu
# with nvcc against whichever NCCL it finds (the CUDA toolkit's, the system's, or the one pip's
# PyTorch ships), runs it, and says what happened. Standalone: shoal itself needs MPI, gRPC and
# abseil development packages that the GPU machines do not have.
#
#   bench/gpu/nccl_check.sh [ranks] [max_bytes] [iterations]     (arguments go to the program)
#   OUT_DIR=dir   where the binary and log go (default: a new temporary folder)
#
# Exit status: the program's (0 pass, 1 fail, 2 no GPU), or 3 when it cannot be built.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
CUDA=${CUDA_HOME:-/usr/local/cuda}
OUT=${OUT_DIR:-$(mktemp -d /tmp/nccl_check.XXXXXX)}
mkdir -p "$OUT"
say() { echo "nccl_check: $*"; }

say "output in $OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
else
  say "no nvidia-smi"
fi

NVCC=${NVCC:-$CUDA/bin/nvcc}
command -v "$NVCC" >/dev/null 2>&1 || NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || { say "no nvcc (set CUDA_HOME or NVCC)"; exit 3; }

# NCCL: header + library, from the first place that has both.
NCCL_INC="" NCCL_LIB=""
candidates=("$CUDA/include:$CUDA/lib64" "/usr/include:/usr/lib/x86_64-linux-gnu")
PY=${PYTHON:-python3}
if command -v "$PY" >/dev/null 2>&1; then
  pip_nccl=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  [ -n "$pip_nccl" ] && candidates+=("$pip_nccl/include:$pip_nccl/lib")
fi
for c in "${candidates[@]}"; do
  inc=${c%%:*} lib=${c##*:}
  if [ -f "$inc/nccl.h" ] && ls "$lib"/libnccl.so* >/dev/null 2>&1; then
    NCCL_INC=$inc NCCL_LIB=$lib; break
  fi
done
[ -n "$NCCL_INC" ] || { say "no nccl.h + libnccl found (looked in: ${candidates[*]})"; exit 3; }
# pip wheels ship only libnccl.so.2, without the libnccl.so link the linker looks for.
if [ -e "$NCCL_LIB/libnccl.so" ]; then LINK_NCCL=-lnccl; else LINK_NCCL=-l:libnccl.so.2; fi
say "nvcc $("$NVCC" --version | tail -1); NCCL from $NCCL_LIB"

if ! "$NVCC" -O2 -std=c++17 -o "$OUT/nccl_allreduce_check" "$HERE/nccl_allreduce_check.cu" \
     -I"$NCCL_INC" -L"$NCCL_LIB" $LINK_NCCL -Xlinker -rpath -Xlinker "$NCCL_LIB" -lpthread \
     > "$OUT/build.log" 2>&1; then
  say "build failed:"; cat "$OUT/build.log"; exit 3
fi
say "built $OUT/nccl_allreduce_check"

if command -v "$PY" >/dev/null 2>&1; then
  "$PY" -c 'import torch; print("nccl_check: PyTorch", torch.__version__, "CUDA", torch.version.cuda,
    "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "(no GPU visible)")' \
    2>/dev/null || say "no PyTorch with CUDA for a cross-check (fine)"
fi

# Ranks sharing one GPU may make NCCL hang rather than fail: bound the first try, then fall
# back to one rank per GPU.
timeout 300 "$OUT/nccl_allreduce_check" "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  say "timed out after 300 s; again with one rank per GPU ($gpus)"
  timeout 300 "$OUT/nccl_allreduce_check" "${gpus:-1}" "${@:2}" 2>&1 | tee -a "$OUT/run.log"
  rc=${PIPESTATUS[0]}
fi
case "$rc" in
  0) say "PASS";;
  2) say "SKIP: no usable GPU";;
  *) say "FAIL (exit $rc); log in $OUT/run.log";;
esac
exit "$rc"
