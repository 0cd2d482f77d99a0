#include "parallel/adamw.h"

#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/simd.h"
#include "common/status.h"
#include "memory/adamw_math.h"

namespace shoal::parallel {
namespace {
constexpr int64_t kNormBlock = memory::kNormBlockElements;
constexpr int64_t kStepGrain = 16384;

using memory::AdamWConstants;

// The fused update of elements [0, n) (memory/adamw_math.h, the device optimizer's formula too).
SHOAL_SIMD_CLONES
void AdamWRange(const AdamWConstants& k, const float* gr, float* p, float* m, float* v,
                int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) memory::AdamWElement(k, gr, p, m, v, i);
}


}  // namespace

double GlobalL2Norm(const std::vector<at::Tensor>& flats) {
  return std::sqrt(GlobalSumSquares(flats, 0.0));
}

double GlobalSumSquares(const std::vector<at::Tensor>& flats, double start) {
  double total = start;
  for (const at::Tensor& t : flats) {
    const float* g = t.data_ptr<float>();
    const int64_t n = t.numel();
    const int64_t blocks = (n + kNormBlock - 1) / kNormBlock;
    std::vector<double> partial(blocks, 0.0);
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kNormBlock;
        partial[b] = memory::BlockSumSquares(g + begin, std::min(n, begin + kNormBlock) - begin);
      }
    });
    for (double s : partial) total += s;  // fixed order: independent of the thread count
  }
  return total;
}

double ClipScale(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options, Shard shard,
             MomentOffload offload)
    : groups_(std::move(groups)), offload_(std::move(offload)), options_(options), shard_(shard) {
  TORCH_CHECK(shard_.count >= 1 && shard_.index >= 0 && shard_.index < shard_.count,
              "AdamW: bad shard ", shard_.index, " of ", shard_.count);
  for (size_t g = 0; g < groups_.size(); ++g) {
    TORCH_CHECK(groups_[g].params->numel() % shard_.count == 0, "AdamW: group of ",
                groups_[g].params->numel(), " elements cannot be split into ", shard_.count,
                " shards");
  }
  TORCH_CHECK(offload_.residency == nullptr || offload_.host_budget_bytes > 0,
              "AdamW: paged parameters need the moments offloaded too");
  if (offload_.host_budget_bytes <= 0) {
    for (size_t g = 0; g < groups_.size(); ++g) {
      exp_avg_.push_back(at::zeros({ShardSize(static_cast<int>(g))}, at::kFloat));
      exp_avg_sq_.push_back(at::zeros({ShardSize(static_cast<int>(g))}, at::kFloat));
    }
    return;
  }
  TORCH_CHECK(shard_.count == 1, "AdamW: moment offload does not combine with ZeRO-1 sharding");
  TORCH_CHECK(offload_.chunk_elements > 0, "AdamW: offload chunk_elements must be > 0");
  for (size_t g = 0; g < groups_.size(); ++g) {
    const int64_t n = ShardSize(static_cast<int>(g));
    first_chunk_.push_back(static_cast<int>(chunks_.size()));
    for (int64_t b = 0; b < n; b += offload_.chunk_elements) {
      chunks_.push_back({static_cast<int>(g), b, std::min(offload_.chunk_elements, n - b)});
    }
  }
  memory::TieredChunkStoreOptions o;
  o.num_chunks = static_cast<int>(chunks_.size());
  o.chunk_bytes = 2 * offload_.chunk_elements * static_cast<int64_t>(sizeof(float));
  o.host_budget_bytes = offload_.host_budget_bytes;
  o.disk_directory = offload_.disk_directory;
  o.disk_budget_bytes = offload_.disk_budget_bytes;
  o.disk_worker = offload_.worker;
  auto store = memory::TieredChunkStore::Create(o);
  TORCH_CHECK(store.ok(), "AdamW moment offload: ", store.status().ToString());
  store_ = std::move(*store);
  // Every step sweeps the chunks in order: that is the trace the eviction policy plans by.
  std::vector<int> trace(chunks_.size());
  for (size_t c = 0; c < trace.size(); ++c) trace[c] = static_cast<int>(c);
  const absl::Status traced = store_->SetTrace(trace);
  TORCH_CHECK(traced.ok(), "AdamW moment offload: ", traced.ToString());
}

AdamW::~AdamW() = default;

int64_t AdamW::ShardSize(int g) const { return groups_[g].params->numel() / shard_.count; }
int64_t AdamW::ShardBegin(int g) const { return ShardSize(g) * shard_.index; }

void AdamW::Step(double lr, double grad_scale) {
  BeginStep(lr, grad_scale);
  FinishStep();
}

void AdamW::BeginStep(double lr, double grad_scale) {
  TORCH_CHECK(!in_step_, "AdamW: BeginStep while a step is in progress");
  in_step_ = true;
  ++steps_;
  lr_ = lr;
  // Decay is per group: set in UpdateRange.
  k_ = memory::MakeAdamWConstants(options_.beta1, options_.beta2, options_.eps,
                                  /*weight_decay=*/0.0, steps_, lr, grad_scale);
  stepped_.assign(chunks_.size(), 0);
  read_chunk_ = -1;  // the moments change from now on
  if (recording_order_) {
    // The previous step was the first split one: its order is every later step's.
    const absl::Status traced = store_->SetTrace(order_);
    TORCH_CHECK(traced.ok(), "AdamW moment offload: ", traced.ToString());
    recording_order_ = false;
    traced_ = true;
  }
  order_pos_ = 0;
  split_this_step_ = false;
}

void AdamW::UpdateRange(size_t gi, int64_t first, int64_t count, float* m, float* v) {
  const ParamGroup& group = groups_[gi];
  const int64_t begin = ShardBegin(static_cast<int>(gi)) + first;
  AdamWConstants kg = k_;
  kg.decay = static_cast<float>(1.0 - lr_ * (group.decay ? options_.weight_decay : 0.0));
  float* p = group.params->flat().data_ptr<float>() + begin;
  const float* gr = group.grads->flat().data_ptr<float>() + begin;
  at::parallel_for(0, count, kStepGrain, [&](int64_t i0, int64_t i1) {
    AdamWRange(kg, gr + i0, p + i0, m + i0, v + i0, i1 - i0);
  });
}

void AdamW::StepOffloadedChunk(int id, int next) {
  RangeResidency* paged = offload_.residency;
  auto is_paged = [&](const MomentChunk& ch) { return paged != nullptr && paged->Paged(ch.group); };
  if (next >= 0) {
    const absl::Status hinted = store_->Prefetch(next);
    TORCH_CHECK(hinted.ok(), "AdamW moment offload: ", hinted.ToString());
    const MomentChunk& n = chunks_[next];
    if (is_paged(n)) paged->Prefetch(n.group, n.begin, n.count);
  }
  const MomentChunk& ch = chunks_[id];
  absl::StatusOr<float*> moments = store_->Acquire(id);
  TORCH_CHECK(moments.ok(), "AdamW moment offload: ", moments.status().ToString());
  if (is_paged(ch)) paged->Acquire(ch.group, ch.begin, ch.count);
  UpdateRange(ch.group, ch.begin, ch.count, *moments, *moments + offload_.chunk_elements);
  if (is_paged(ch)) paged->Release(ch.group, ch.begin, ch.count);
  const absl::Status released = store_->Release(id, /*dirty=*/true);
  TORCH_CHECK(released.ok(), "AdamW moment offload: ", released.ToString());
  stepped_[id] = 1;
}

void AdamW::StepChunk(int chunk) {
  TORCH_CHECK(in_step_, "AdamW: StepChunk outside BeginStep / FinishStep");
  TORCH_CHECK(store_ != nullptr, "AdamW: StepChunk needs offloaded moments");
  TORCH_CHECK(chunk >= 0 && chunk < num_moment_chunks() && !stepped_[chunk], "AdamW: chunk ",
              chunk, " is out of range or already stepped this step");
  if (!traced_ && !split_this_step_) {
    // The first split step: its order (these chunks, then FinishStep's) becomes the store's
    // trace at the next BeginStep.
    order_.clear();
    recording_order_ = true;
  }
  split_this_step_ = true;
  int next = -1;
  if (recording_order_) {
    order_.push_back(chunk);
  } else if (order_pos_ + 1 < order_.size() && order_[order_pos_] == chunk) {
    next = order_[order_pos_ + 1];  // the recorded order says which comes next
  }
  ++order_pos_;
  StepOffloadedChunk(chunk, next);
}

void AdamW::FinishStep() {
  TORCH_CHECK(in_step_, "AdamW: FinishStep without BeginStep");
  in_step_ = false;
  if (store_ == nullptr) {
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      UpdateRange(gi, 0, ShardSize(static_cast<int>(gi)), exp_avg_[gi].data_ptr<float>(),
                  exp_avg_sq_[gi].data_ptr<float>());
    }
    return;
  }
  std::vector<int> rest;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    if (!stepped_[c]) rest.push_back(static_cast<int>(c));
  }
  for (size_t i = 0; i < rest.size(); ++i) {
    if (recording_order_) order_.push_back(rest[i]);
    StepOffloadedChunk(rest[i], i + 1 < rest.size() ? rest[i + 1] : -1);
  }
}

absl::Status AdamW::ReadMoments(int g, bool second, int64_t first, int64_t count, float* out) {
  TORCH_CHECK(store_ != nullptr, "AdamW::ReadMoments needs offloaded moments");
  if (g < 0 || g >= static_cast<int>(groups_.size()) || first < 0 || count < 0 ||
      first + count > ShardSize(g)) {
    return absl::OutOfRangeError(absl::StrCat("AdamW moments: elements [", first, ", ",
                                              first + count, ") of group ", g,
                                              " are out of range"));
  }
  while (count > 0) {
    const int c = first_chunk_[g] + static_cast<int>(first / offload_.chunk_elements);
    if (c != read_chunk_) {
      read_buffer_.resize(2 * offload_.chunk_elements);
      SHOAL_RETURN_IF_ERROR(store_->Read(c, absl::MakeSpan(read_buffer_)));
      read_chunk_ = c;
    }
    const MomentChunk& ch = chunks_[c];
    const int64_t at = first - ch.begin;
    const int64_t n = std::min(count, ch.count - at);
    std::memcpy(out, read_buffer_.data() + (second ? offload_.chunk_elements : 0) + at,
                n * sizeof(float));
    out += n;
    first += n;
    count -= n;
  }
  return absl::OkStatus();
}

void AdamW::ReadOffloaded(std::vector<at::Tensor>* full_m, std::vector<at::Tensor>* full_v) const {
  std::vector<float> buffer(2 * offload_.chunk_elements);
  for (size_t g = 0; g < groups_.size(); ++g) {
    full_m->push_back(at::empty({ShardSize(static_cast<int>(g))}, at::kFloat));
    full_v->push_back(at::empty({ShardSize(static_cast<int>(g))}, at::kFloat));
  }
  for (size_t c = 0; c < chunks_.size(); ++c) {
    const MomentChunk& ch = chunks_[c];
    const absl::Status read = store_->Read(static_cast<int>(c), absl::MakeSpan(buffer));
    TORCH_CHECK(read.ok(), "AdamW moment offload: ", read.ToString());
    std::memcpy((*full_m)[ch.group].data_ptr<float>() + ch.begin, buffer.data(),
                ch.count * sizeof(float));
    std::memcpy((*full_v)[ch.group].data_ptr<float>() + ch.begin,
                buffer.data() + offload_.chunk_elements, ch.count * sizeof(float));
  }
}

void AdamW::AppendNamedViews(int g, const at::Tensor& full_m, const at::Tensor& full_v,
                             std::vector<std::pair<std::string, at::Tensor>>* out) const {
  for (const memory::FlatBuffer::Entry& e : groups_[g].params->entries()) {
    out->emplace_back(MomentName(false, e.name), full_m.narrow(0, e.offset, e.numel).view(e.shape));
    out->emplace_back(MomentName(true, e.name), full_v.narrow(0, e.offset, e.numel).view(e.shape));
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::StateDict() const {
  TORCH_CHECK(shard_.count == 1, "AdamW::StateDict on a sharded optimizer: use GatherStateDict");
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::vector<at::Tensor> full_m = exp_avg_, full_v = exp_avg_sq_;
  if (store_ != nullptr) ReadOffloaded(&full_m, &full_v);
  for (size_t g = 0; g < groups_.size(); ++g) {
    AppendNamedViews(static_cast<int>(g), full_m[g], full_v[g], &out);
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
  read_chunk_ = -1;  // the moments may change
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
      for (const auto& [second, full] : {std::make_pair(false, &full_m.back()),
                                         std::make_pair(true, &full_v.back())}) {
        const std::string name = MomentName(second, e.name);
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
  if (store_ != nullptr) {
    // Chunk by chunk through one buffer, so loading stays within the RAM budget too.
    std::vector<float> buffer(2 * offload_.chunk_elements, 0.0f);
    for (size_t c = 0; c < chunks_.size(); ++c) {
      const MomentChunk& ch = chunks_[c];
      std::memcpy(buffer.data(), full_m[ch.group].data_ptr<float>() + ch.begin,
                  ch.count * sizeof(float));
      std::memcpy(buffer.data() + offload_.chunk_elements,
                  full_v[ch.group].data_ptr<float>() + ch.begin, ch.count * sizeof(float));
      SHOAL_RETURN_IF_ERROR(store_->Write(static_cast<int>(c), absl::MakeConstSpan(buffer)));
    }
  } else {
    for (size_t g = 0; g < groups_.size(); ++g) {
      const int64_t begin = ShardBegin(static_cast<int>(g)), size = ShardSize(static_cast<int>(g));
      exp_avg_[g].copy_(full_m[g].narrow(0, begin, size));
      exp_avg_sq_[g].copy_(full_v[g].narrow(0, begin, size));
    }
  }
  steps_ = steps;
  return absl::OkStatus();
}

}  // namespace shoal::parallel
