#include "parallel/adamw.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/simd.h"

namespace shoal::parallel {
namespace {
constexpr int64_t kNormBlock = 4096;
constexpr int64_t kStepGrain = 16384;

struct AdamWConstants {
  float decay, b1, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps, scale;
};

// The fused update of elements [0, n): one read of p, g, m, v and one write of p, m, v each.
SHOAL_SIMD_CLONES
void AdamWRange(const AdamWConstants& k, const float* gr, float* p, float* m, float* v,
                int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gr[i] * k.scale;
    const float pi = p[i] * k.decay;
    const float mi = m[i] * k.b1 + g * k.one_minus_b1;
    const float vi = v[i] * k.b2 + k.one_minus_b2 * (g * g);
    const float denom = std::sqrt(vi) / k.bc2_sqrt + k.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - k.step_size * (mi / denom);
  }
}

SHOAL_SIMD_CLONES
double SumSquares(const float* g, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
  return s;
}

}  // namespace

double GlobalL2Norm(const std::vector<at::Tensor>& flats) {
  double total = 0;
  for (const at::Tensor& t : flats) {
    const float* g = t.data_ptr<float>();
    const int64_t n = t.numel();
    const int64_t blocks = (n + kNormBlock - 1) / kNormBlock;
    std::vector<double> partial(blocks, 0.0);
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kNormBlock;
        partial[b] = SumSquares(g + begin, std::min(n, begin + kNormBlock) - begin);
      }
    });
    for (double s : partial) total += s;  // fixed order: independent of the thread count
  }
  return std::sqrt(total);
}

double ClipScale(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options)
    : groups_(std::move(groups)), options_(options) {
  for (const ParamGroup& g : groups_) {
    exp_avg_.push_back(g.params->MakeLike());
    exp_avg_sq_.push_back(g.params->MakeLike());
  }
}

void AdamW::Step(double lr, double grad_scale) {
  ++steps_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_));
  // Constants rounded to float once, as torch.optim.AdamW's tensor ops do.
  AdamWConstants k;
  k.b1 = static_cast<float>(options_.beta1);
  k.one_minus_b1 = static_cast<float>(1.0 - options_.beta1);
  k.b2 = static_cast<float>(options_.beta2);
  k.one_minus_b2 = static_cast<float>(1.0 - options_.beta2);
  k.step_size = static_cast<float>(lr / bc1);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.eps = static_cast<float>(options_.eps);
  k.scale = static_cast<float>(grad_scale);
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const ParamGroup& group = groups_[gi];
    k.decay = static_cast<float>(1.0 - lr * (group.decay ? options_.weight_decay : 0.0));
    float* p = group.params->flat().data_ptr<float>();
    const float* gr = group.grads->flat().data_ptr<float>();
    float* m = exp_avg_[gi].flat().data_ptr<float>();
    float* v = exp_avg_sq_[gi].flat().data_ptr<float>();
    at::parallel_for(0, group.params->numel(), kStepGrain, [&](int64_t i0, int64_t i1) {
      AdamWRange(k, gr + i0, p + i0, m + i0, v + i0, i1 - i0);
    });
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::StateDict() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const auto& entries = groups_[gi].params->entries();
    for (size_t e = 0; e < entries.size(); ++e) {
      out.emplace_back("exp_avg." + entries[e].name, exp_avg_[gi].View(static_cast<int>(e)));
      out.emplace_back("exp_avg_sq." + entries[e].name, exp_avg_sq_[gi].View(static_cast<int>(e)));
    }
  }
  out.emplace_back("step", at::scalar_tensor(steps_, at::kLong));
  return out;
}

absl::Status AdamW::LoadStateDict(const std::vector<std::pair<std::string, at::Tensor>>& state) {
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  auto step_it = by_name.find("step");
  if (step_it == by_name.end() || step_it->second.numel() != 1 ||
      step_it->second.scalar_type() != at::kLong) {
    return absl::DataLossError("optimizer state: missing or malformed 'step'");
  }
  const int64_t steps = step_it->second.item<int64_t>();
  if (steps < 0) return absl::DataLossError("optimizer state: negative 'step'");
  // Check everything before copying anything, so a bad state leaves the optimizer untouched.
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const auto& entries = groups_[gi].params->entries();
    for (size_t e = 0; e < entries.size(); ++e) {
      for (const auto& [prefix, buf] : {std::make_pair("exp_avg.", &exp_avg_[gi]),
                                        std::make_pair("exp_avg_sq.", &exp_avg_sq_[gi])}) {
        const std::string name = prefix + entries[e].name;
        auto it = by_name.find(name);
        if (it == by_name.end()) {
          return absl::DataLossError(absl::StrCat("optimizer state: missing tensor ", name));
        }
        at::Tensor dst = buf->View(static_cast<int>(e));
        if (it->second.sizes() != dst.sizes() || it->second.scalar_type() != at::kFloat) {
          return absl::DataLossError(absl::StrCat("optimizer state: tensor ", name,
                                                  " has the wrong shape or dtype"));
        }
        copies.emplace_back(dst, it->second);
      }
    }
  }
  for (auto& [dst, src] : copies) dst.copy_(src);
  steps_ = steps;
  return absl::OkStatus();
}

}  // namespace shoal::parallel
