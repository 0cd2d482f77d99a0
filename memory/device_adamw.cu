#include "memory/device_adamw.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace shoal::memory {
namespace {

__global__ void AdamWKernel(AdamWConstants k, const float* __restrict__ g, float* __restrict__ p,
                            float* __restrict__ m, float* __restrict__ v, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    AdamWElement(k, g, p, m, v, i);
  }
}

}  // namespace

absl::Status DeviceAdamW(const AdamWConstants& k, const float* g, float* p, float* m, float* v,
                         int64_t n, void* stream) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("DeviceAdamW: n = ", n, " < 0"));
  if (n == 0) return absl::OkStatus();
  if (g == nullptr || p == nullptr || m == nullptr || v == nullptr) {
    return absl::InvalidArgumentError("DeviceAdamW: null pointer");
  }
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the loop strides over the rest.
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  AdamWKernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      k, g, p, m, v, n);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("DeviceAdamW: launch: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace shoal::memory
