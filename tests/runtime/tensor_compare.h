// How the runtime tests compare a tensor with its reference.
#ifndef SHOAL_TESTS_RUNTIME_TENSOR_COMPARE_H_
#define SHOAL_TESTS_RUNTIME_TENSOR_COMPARE_H_

#include <ATen/ATen.h>

#include <algorithm>

namespace shoal::runtime {

// max |a - b| / max(max |b|, tiny), over b's finite entries for the scale: an error relative to
// the reference's size, so a sign or index slip cannot pass. Equal entries count as no error
// (infinities included: a rank holding no vocabulary rows has -inf row maxima); a NaN anywhere
// makes the result NaN, which fails every `<` bound.
inline double RelMaxError(const at::Tensor& a, const at::Tensor& b) {
  if (b.numel() == 0) return a.numel() == 0 ? 0.0 : 1.0;
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  const double denom = std::max(
      at::where(bd.isfinite(), bd.abs(), at::zeros_like(bd)).max().item<double>(), 1e-12);
  return (ad - bd).abs().masked_fill_(ad.eq(bd), 0.0).max().item<double>() / denom;
}

}  // namespace shoal::runtime

#endif  // SHOAL_TESTS_RUNTIME_TENSOR_COMPARE_H_
