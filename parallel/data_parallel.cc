#include "parallel/data_parallel.h"

#include <ATen/ATen.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "parallel/adamw.h"

namespace shoal::parallel {
namespace {

// Elements an entry occupies in its buffer, alignment padding included: entries are laid out
// back to back, so this is the distance to the next entry's offset.
int64_t PaddedSize(const memory::FlatBuffer& buf, int entry) {
  const auto& entries = buf.entries();
  const int64_t end = entry + 1 < static_cast<int>(entries.size())
                          ? entries[entry + 1].offset
                          : entries[entry].offset + (entries[entry].numel + 15) / 16 * 16;
  return end - entries[entry].offset;
}

}  // namespace

DataParallel::DataParallel(comm::Backend* backend, std::vector<memory::FlatBuffer*> params,
                           std::vector<memory::FlatBuffer*> grads,
                           const std::vector<std::pair<int, int>>& ready_order,
                           DataParallelOptions options)
    : backend_(backend),
      params_(std::move(params)),
      grads_(std::move(grads)),
      options_(options) {
  bucket_of_.resize(grads_.size());
  for (size_t g = 0; g < grads_.size(); ++g) bucket_of_[g].assign(grads_[g]->entries().size(), -1);
  // Walk parameters in readiness order; extend the group's open bucket while the parameter sits
  // right below it in memory (backward runs the layout in reverse) and the size allows.
  std::vector<int> open(grads_.size(), -1);
  const int64_t max_elems = std::max<int64_t>(1, options_.bucket_bytes / 4);
  for (const auto& [g, e] : ready_order) {
    const auto& entry = grads_[g]->entries()[e];
    const int64_t size = PaddedSize(*grads_[g], e);
    int b = open[g];
    if (b >= 0 && buckets_[b].begin == entry.offset + size &&
        buckets_[b].end - buckets_[b].begin + size <= max_elems) {
      buckets_[b].begin = entry.offset;
      ++buckets_[b].total;
    } else {
      buckets_.push_back(Bucket{g, entry.offset, entry.offset + size, 0, 1});
      b = open[g] = static_cast<int>(buckets_.size()) - 1;
    }
    bucket_of_[g][e] = b;
  }
  if (options_.zero1) {
    for (auto* g : grads_) shard_scratch_.push_back(at::empty({g->numel() / backend_->size()}));
  }
}

DataParallel::~DataParallel() {
  // Never leave a collective running on buffers that are about to go away.
  for (auto& w : inflight_) (void)w->Wait();
}

void DataParallel::BeginMicroBatch(bool last) {
  sync_this_micro_ = last && !options_.zero1 && backend_->size() > 1;
  for (Bucket& b : buckets_) b.pending = b.total;
}

void DataParallel::OnParamReady(int group, int entry) {
  if (!sync_this_micro_) return;
  Bucket& b = buckets_[bucket_of_[group][entry]];
  if (--b.pending == 0) {
    at::Tensor view = grads_[b.group]->flat().narrow(0, b.begin, b.end - b.begin);
    inflight_.push_back(backend_->AllReduce(view, comm::ReduceOp::kAvg, options_.collective));
  }
}

absl::Status DataParallel::FinishGradients() {
  if (backend_->size() == 1) return absl::OkStatus();
  if (!options_.zero1) {
    // Buckets whose parameters never reported (none in a full backward) go now.
    for (Bucket& b : buckets_) {
      if (b.pending > 0) {
        b.pending = 0;
        at::Tensor view = grads_[b.group]->flat().narrow(0, b.begin, b.end - b.begin);
        inflight_.push_back(backend_->AllReduce(view, comm::ReduceOp::kAvg, options_.collective));
      }
    }
    absl::Status first_error;
    for (auto& w : inflight_) {
      absl::Status s = w->Wait();
      if (first_error.ok() && !s.ok()) first_error = s;
    }
    inflight_.clear();
    return first_error;
  }
  // ZeRO-1: mean of each rank's shard range lands in that range.
  const int rank = backend_->rank(), n = backend_->size();
  for (size_t g = 0; g < grads_.size(); ++g) {
    at::Tensor full = grads_[g]->flat();
    const int64_t shard = full.numel() / n;
    SHOAL_RETURN_IF_ERROR(backend_->ReduceScatter(shard_scratch_[g], full, comm::ReduceOp::kAvg,
                                                  options_.collective)->Wait());
    full.narrow(0, rank * shard, shard).copy_(shard_scratch_[g]);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> DataParallel::GradNorm() {
  std::vector<at::Tensor> flats;
  const int n = backend_->size();
  for (auto* g : grads_) {
    const int64_t shard = g->numel() / n;
    flats.push_back(options_.zero1 ? g->flat().narrow(0, backend_->rank() * shard, shard)
                                   : g->flat());
  }
  const double local = GlobalL2Norm(flats);
  if (!options_.zero1 || n == 1) return local;
  at::Tensor sq = at::scalar_tensor(local * local, at::kDouble).reshape({1});
  SHOAL_RETURN_IF_ERROR(backend_->AllReduce(sq, comm::ReduceOp::kSum, options_.collective)->Wait());
  return std::sqrt(sq.item<double>());
}

absl::Status DataParallel::FinishStep() {
  if (!options_.zero1 || backend_->size() == 1) return absl::OkStatus();
  const int rank = backend_->rank(), n = backend_->size();
  for (size_t g = 0; g < params_.size(); ++g) {
    at::Tensor full = params_[g]->flat();
    const int64_t shard = full.numel() / n;
    shard_scratch_[g].copy_(full.narrow(0, rank * shard, shard));
    SHOAL_RETURN_IF_ERROR(
        backend_->AllGather(full, shard_scratch_[g], options_.collective)->Wait());
  }
  return absl::OkStatus();
}

absl::StatusOr<double> DataParallel::Mean(double value) {
  if (backend_->size() == 1) return value;
  at::Tensor t = at::scalar_tensor(value, at::kDouble).reshape({1});
  SHOAL_RETURN_IF_ERROR(backend_->AllReduce(t, comm::ReduceOp::kAvg, options_.collective)->Wait());
  return t.item<double>();
}

}  // namespace shoal::parallel
