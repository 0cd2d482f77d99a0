// DataParallel: keeps the gradients and parameters of model replicas in step across a
// data-parallel group, in one of two ways:
//
//  - all-reduce (default): the flat gradient buffers are cut into buckets of about
//    `bucket_bytes`, in the order backward finishes the parameters; a bucket's all-reduce (mean)
//    starts as soon as its last parameter is ready, so communication overlaps the rest of the
//    backward pass. With gradient accumulation only the last micro-batch syncs.
//  - ZeRO-1 (`zero1`): each rank owns 1/N of every flat buffer (the AdamW Shard); gradients are
//    reduce-scattered (mean) into the owned range after backward, the optimizer steps that range
//    only, and the parameters are all-gathered afterwards. Optimizer memory falls by N.
//
// Per step, every rank calls, in this order: BeginMicroBatch / OnParamReady (during backward) for
// each micro-batch, then FinishGradients, GradNorm, the optimizer step, FinishStep. All of them
// are collectives: every rank of the group must make the same calls (see comm/backend.h).
// Not thread-safe.
#ifndef SHOAL_PARALLEL_DATA_PARALLEL_H_
#define SHOAL_PARALLEL_DATA_PARALLEL_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "memory/flat_buffer.h"

namespace shoal::parallel {

struct DataParallelOptions {
  int64_t bucket_bytes = 25 << 20;     // all-reduce bucket size
  bool zero1 = false;                  // shard optimizer state (ZeRO stage 1)
  comm::CollectiveOptions collective;  // timeout of every collective
};

class DataParallel {
 public:
  // `params` and `grads`: the model's flat buffers, group by group (same layouts).
  // `ready_order`: every parameter as (group, entry index), in the order backward finishes
  // them. `backend` must outlive this object. REQUIRES: backend->size() > 1 or not zero1 ...
  // (a group of one is allowed and makes every call a no-op).
  DataParallel(comm::Backend* backend, std::vector<memory::FlatBuffer*> params,
               std::vector<memory::FlatBuffer*> grads,
               const std::vector<std::pair<int, int>>& ready_order, DataParallelOptions options);
  ~DataParallel();

  // Before each micro-batch's backward: `last` says whether it is the last of the step (only
  // then do buckets launch).
  void BeginMicroBatch(bool last);
  // During backward: parameter (group, entry) has its final gradient for this micro-batch.
  void OnParamReady(int group, int entry);
  // After the last backward: the gradients are the group mean (all-reduce: everywhere; ZeRO-1:
  // in this rank's shard range).
  absl::Status FinishGradients();
  // Global L2 norm of the mean gradients (the same value on every rank).
  absl::StatusOr<double> GradNorm();
  // After the optimizer step: ZeRO-1 all-gathers the parameters; otherwise nothing.
  absl::Status FinishStep();
  // Mean of `value` over the group (for reporting the loss once).
  absl::StatusOr<double> Mean(double value);

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  bool zero1() const { return options_.zero1; }

 private:
  struct Bucket {
    int group;
    int64_t begin, end;       // element range of the group's gradient buffer
    int pending;              // parameters still to finish this micro-batch
    int total;                // parameters in the bucket
  };

  comm::Backend* backend_;
  std::vector<memory::FlatBuffer*> params_, grads_;
  DataParallelOptions options_;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<int>> bucket_of_;  // [group][entry] -> bucket index
  std::vector<std::unique_ptr<comm::Work>> inflight_;
  std::vector<at::Tensor> shard_scratch_;    // ZeRO-1: reduce-scatter / all-gather staging
  bool sync_this_micro_ = false;
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_DATA_PARALLEL_H_
