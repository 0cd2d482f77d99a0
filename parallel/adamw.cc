#include "parallel/adamw.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/simd.h"
#include "common/status.h"

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

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options, Shard shard)
    : groups_(std::move(groups)), options_(options), shard_(shard) {
  TORCH_CHECK(shard_.count >= 1 && shard_.index >= 0 && shard_.index < shard_.count,
              "AdamW: bad shard ", shard_.index, " of ", shard_.count);
  for (size_t g = 0; g < groups_.size(); ++g) {
    TORCH_CHECK(groups_[g].params->numel() % shard_.count == 0, "AdamW: group of ",
                groups_[g].params->numel(), " elements cannot be split into ", shard_.count,
                " shards");
    exp_avg_.push_back(at::zeros({ShardSize(static_cast<int>(g))}, at::kFloat));
    exp_avg_sq_.push_back(at::zeros({ShardSize(static_cast<int>(g))}, at::kFloat));
  }
}

int64_t AdamW::ShardSize(int g) const { return groups_[g].params->numel() / shard_.count; }
int64_t AdamW::ShardBegin(int g) const { return ShardSize(g) * shard_.index; }

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
    const int64_t begin = ShardBegin(static_cast<int>(gi));
    k.decay = static_cast<float>(1.0 - lr * (group.decay ? options_.weight_decay : 0.0));
    float* p = group.params->flat().data_ptr<float>() + begin;
    const float* gr = group.grads->flat().data_ptr<float>() + begin;
    float* m = exp_avg_[gi].data_ptr<float>();
    float* v = exp_avg_sq_[gi].data_ptr<float>();
    at::parallel_for(0, ShardSize(static_cast<int>(gi)), kStepGrain, [&](int64_t i0, int64_t i1) {
      AdamWRange(k, gr + i0, p + i0, m + i0, v + i0, i1 - i0);
    });
  }
}

void AdamW::AppendNamedViews(int g, const at::Tensor& full_m, const at::Tensor& full_v,
                             std::vector<std::pair<std::string, at::Tensor>>* out) const {
  for (const memory::FlatBuffer::Entry& e : groups_[g].params->entries()) {
    out->emplace_back("exp_avg." + e.name, full_m.narrow(0, e.offset, e.numel).view(e.shape));
    out->emplace_back("exp_avg_sq." + e.name, full_v.narrow(0, e.offset, e.numel).view(e.shape));
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::StateDict() const {
  TORCH_CHECK(shard_.count == 1, "AdamW::StateDict on a sharded optimizer: use GatherStateDict");
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t g = 0; g < groups_.size(); ++g) {
    AppendNamedViews(static_cast<int>(g), exp_avg_[g], exp_avg_sq_[g], &out);
  }
  out.emplace_back("step", at::scalar_tensor(steps_, at::kLong));
  return out;
}

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> AdamW::GatherStateDict(
    comm::Backend* backend) const {
  if (shard_.count == 1) return StateDict();
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t g = 0; g < groups_.size(); ++g) {
    const int64_t n = groups_[g].params->numel();
    at::Tensor full_m = at::empty({n}, at::kFloat), full_v = at::empty({n}, at::kFloat);
    SHOAL_RETURN_IF_ERROR(backend->AllGather(full_m, exp_avg_[g])->Wait());
    SHOAL_RETURN_IF_ERROR(backend->AllGather(full_v, exp_avg_sq_[g])->Wait());
    AppendNamedViews(static_cast<int>(g), full_m, full_v, &out);
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
  // Assemble full moment buffers first; nothing of the optimizer changes unless all is right.
  std::vector<at::Tensor> full_m, full_v;
  for (size_t g = 0; g < groups_.size(); ++g) {
    const int64_t n = groups_[g].params->numel();
    full_m.push_back(at::zeros({n}, at::kFloat));
    full_v.push_back(at::zeros({n}, at::kFloat));
    for (const memory::FlatBuffer::Entry& e : groups_[g].params->entries()) {
      for (const auto& [prefix, full] : {std::make_pair("exp_avg.", &full_m.back()),
                                         std::make_pair("exp_avg_sq.", &full_v.back())}) {
        const std::string name = prefix + e.name;
        auto it = by_name.find(name);
        if (it == by_name.end()) {
          return absl::DataLossError(absl::StrCat("optimizer state: missing tensor ", name));
        }
        at::Tensor dst = full->narrow(0, e.offset, e.numel).view(e.shape);
        if (it->second.sizes() != dst.sizes() || it->second.scalar_type() != at::kFloat) {
          return absl::DataLossError(absl::StrCat("optimizer state: tensor ", name,
                                                  " has the wrong shape or dtype"));
        }
        dst.copy_(it->second);
      }
    }
  }
  for (size_t g = 0; g < groups_.size(); ++g) {
    const int64_t begin = ShardBegin(static_cast<int>(g)), size = ShardSize(static_cast<int>(g));
    exp_avg_[g].copy_(full_m[g].narrow(0, begin, size));
    exp_avg_sq_[g].copy_(full_v[g].narrow(0, begin, size));
  }
  steps_ = steps;
  return absl::OkStatus();
}

}  // namespace shoal::parallel
