// The AdamW update of one element, shared by the host optimizer (parallel/adamw.cc, vectorised
// over flat buffers) and the device one (memory/device_adamw.cu, one thread per element), so both
// compute the same formula in the same order:
//   p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
//   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)        with g = grad * scale
// Header-only, no dependencies: it compiles as C++ and as CUDA.
#ifndef SHOAL_MEMORY_ADAMW_MATH_H_
#define SHOAL_MEMORY_ADAMW_MATH_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SHOAL_HOST_DEVICE __host__ __device__
#else
#define SHOAL_HOST_DEVICE
#endif

namespace shoal::memory {

// The step's constants, rounded to float once (as torch.optim.AdamW's tensor ops do).
struct AdamWConstants {
  float decay, b1, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps, scale;
};

// Constants for step `step` (1-based) at learning rate `lr`; `weight_decay` is the group's
// (0 for a group without decay); gradients are multiplied by `grad_scale`.
inline AdamWConstants MakeAdamWConstants(double beta1, double beta2, double eps,
                                         double weight_decay, int64_t step, double lr,
                                         double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWConstants k;
  k.decay = static_cast<float>(1.0 - lr * weight_decay);
  k.b1 = static_cast<float>(beta1);
  k.one_minus_b1 = static_cast<float>(1.0 - beta1);
  k.b2 = static_cast<float>(beta2);
  k.one_minus_b2 = static_cast<float>(1.0 - beta2);
  k.step_size = static_cast<float>(lr / bc1);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.eps = static_cast<float>(eps);
  k.scale = static_cast<float>(grad_scale);
  return k;
}

// Element i of the fused update: one read of p, g, m, v and one write of p, m, v.
SHOAL_HOST_DEVICE inline void AdamWElement(const AdamWConstants& k, const float* gr, float* p,
                                           float* m, float* v, int64_t i) {
  const float g = gr[i] * k.scale;
  const float pi = p[i] * k.decay;
  const float mi = m[i] * k.b1 + g * k.one_minus_b1;
  const float vi = v[i] * k.b2 + k.one_minus_b2 * (g * g);
  const float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
  m[i] = mi;
  v[i] = vi;
  p[i] = pi - k.step_size * (mi / denom);
}

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_ADAMW_MATH_H_
