// The elementwise and reduction kernels of offload_bench's model (the matrix products are
// cuBLAS's): y = relu(x W) per layer, loss = mean((y - target)^2) / 2. Every call only queues work
// on `stream` and returns the launch error (cudaSuccess when queued). The loss is reduced in a
// fixed order (per-block sums over a fixed grid, then one block sums those in order; no atomics),
// so the same inputs give the same bits on every run: offload_bench's bit-identity check needs it.
#ifndef SHOAL_BENCH_GPU_OFFLOAD_KERNELS_H_
#define SHOAL_BENCH_GPU_OFFLOAD_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace shoal::bench {

// Blocks of the loss's first pass: the size of `partials` below.
inline constexpr int kLossBlocks = 1024;

// y[i] = max(y[i], 0) for i in [0, n).
cudaError_t ReluInPlace(float* y, int64_t n, cudaStream_t stream);

// The gradient through relu, in place: g[i] = y[i] > 0 ? g[i] : 0, where y = relu(z) is the
// layer's output (y > 0 exactly where z > 0).
cudaError_t ReluBackwardInPlace(float* g, const float* y, int64_t n, cudaStream_t stream);

// Over n elements: grad[i] = (y[i] - target[i]) * (1/n) (the gradient of the loss w.r.t. y), and
// *loss = sum((y - target)^2) / (2n), accumulated in double. `partials`: kLossBlocks doubles of
// scratch. `loss`: one double on the device.
cudaError_t MseLossAndGrad(const float* y, const float* target, float* grad, int64_t n,
                           double* partials, double* loss, cudaStream_t stream);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_GPU_OFFLOAD_KERNELS_H_
