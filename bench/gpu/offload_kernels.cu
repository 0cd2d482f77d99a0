#include "bench/gpu/offload_kernels.h"

#include <algorithm>

namespace shoal::bench {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill an H100 several times; grid-stride loops cover the rest.
unsigned ElementwiseBlocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 8192));
}

__global__ void ReluKernel(float* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = y[i] > 0.0f ? y[i] : 0.0f;
  }
}

__global__ void ReluBackwardKernel(float* __restrict__ g, const float* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    if (!(y[i] > 0.0f)) g[i] = 0.0f;
  }
}

// Sums the block's kThreads values of `s` into s[0] by a fixed tree (the same pairs every run).
__device__ void BlockTreeSum(double* s) {
  for (int width = kThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    if (threadIdx.x < width) s[threadIdx.x] += s[threadIdx.x + width];
  }
  __syncthreads();
}

// Pass 1: block b's threads stride over the elements in a fixed pattern (gridDim is fixed at
// kLossBlocks), each summing its squares in element order; the block's tree sum goes to
// partials[b]. Also writes the gradient, which needs the same difference.
__global__ void MsePartialsKernel(const float* __restrict__ y, const float* __restrict__ target,
                                  float* __restrict__ grad, int64_t n, float inv_n,
                                  double* __restrict__ partials) {
  __shared__ double s[kThreads];
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float diff = y[i] - target[i];
    grad[i] = diff * inv_n;
    acc += static_cast<double>(diff) * static_cast<double>(diff);
  }
  s[threadIdx.x] = acc;
  BlockTreeSum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}

// Pass 2: one block sums the partials in a fixed order.
__global__ void MseFinalKernel(const double* __restrict__ partials, int count, int64_t n,
                               double* __restrict__ loss) {
  __shared__ double s[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  s[threadIdx.x] = acc;
  BlockTreeSum(s);
  if (threadIdx.x == 0) *loss = s[0] / (2.0 * static_cast<double>(n));
}

}  // namespace

cudaError_t ReluInPlace(float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ReluKernel<<<ElementwiseBlocks(n), kThreads, 0, stream>>>(y, n);
  return cudaGetLastError();
}

cudaError_t ReluBackwardInPlace(float* g, const float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ReluBackwardKernel<<<ElementwiseBlocks(n), kThreads, 0, stream>>>(g, y, n);
  return cudaGetLastError();
}

cudaError_t MseLossAndGrad(const float* y, const float* target, float* grad, int64_t n,
                           double* partials, double* loss, cudaStream_t stream) {
  if (n <= 0) return cudaErrorInvalidValue;
  // The grid is fixed (not sized from the device), so the summation order depends on n only.
  MsePartialsKernel<<<kLossBlocks, kThreads, 0, stream>>>(y, target, grad, n,
                                                          static_cast<float>(1.0 / n), partials);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  MseFinalKernel<<<1, kThreads, 0, stream>>>(partials, kLossBlocks, n, loss);
  return cudaGetLastError();
}

}  // namespace shoal::bench
