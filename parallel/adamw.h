// AdamW over flat buffers, with global gradient-norm clipping fused into the update.
//
// Each parameter group is one FlatBuffer of parameters and its gradient buffer (same layout);
// weight decay is a property of the group, which is why the model puts 2-D weights and
// biases/norm gains in separate buffers. The update follows torch.optim.AdamW (decoupled decay):
//   p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
//   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// with g = grad * grad_scale. One pass over memory per group (reads p, g, m, v once), split
// across the LibTorch/OpenMP pool. Deterministic for a given thread count and data.
// Not thread-safe; Step blocks until done.
#ifndef SHOAL_PARALLEL_ADAMW_H_
#define SHOAL_PARALLEL_ADAMW_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "comm/backend.h"
#include "memory/adamw_math.h"
#include "memory/flat_buffer.h"
#include "memory/state_paging.h"
#include "memory/tiered_store.h"

namespace shoal::parallel {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // applied to groups with decay = true
};

struct ParamGroup {
  memory::FlatBuffer* params;  // not owned
  memory::FlatBuffer* grads;   // same layout as params; not owned
  bool decay;
};

// ZeRO-1 sharding of the optimizer: rank `index` of `count` owns elements
// [index * n / count, (index + 1) * n / count) of every group's flat buffer (n = numel(), which
// the model pads to a multiple of count). It keeps moments for that range only and steps only it;
// the caller reduce-scatters gradients into that range before Step and all-gathers parameters
// after. count = 1 is plain AdamW.
struct Shard {
  int index = 0;
  int count = 1;
};

// sqrt(sum of squares) over the given flat gradient buffers, accumulated in double over fixed
// kNormBlockElements-element blocks so the result does not depend on the thread count.
double GlobalL2Norm(const std::vector<at::Tensor>& flats);
// The parts of it, for gradients that are never all in RAM at once: the sum of squares of one
// block (memory::BlockSumSquares, elements [0, n), n <= kNormBlockElements), and the sum over the
// blocks of `flats`, in order, added one by one to `start` (the running sum over earlier buffers'
// blocks, in order): GlobalL2Norm(f) == sqrt(GlobalSumSquares(f, 0)) exactly.
using memory::BlockSumSquares;
using memory::kNormBlockElements;
double GlobalSumSquares(const std::vector<at::Tensor>& flats, double start);

// The name of a parameter's first (`second` false: "exp_avg.<param>") or second moment
// ("exp_avg_sq.<param>") in a state dict or a checkpoint.
inline std::string MomentName(bool second, const std::string& param) {
  return (second ? "exp_avg_sq." : "exp_avg.") + param;
}

// Paged parameters and gradients (memory/state_paging.h, implemented by memory/model_pager.h).
using memory::RangeResidency;

// The factor torch.nn.utils.clip_grad_norm_ applies: min(1, max_norm / (norm + 1e-6));
// 1 when max_norm <= 0 (clipping off).
double ClipScale(double norm, double max_norm);

// Offload of the moments (issue 7, first step): m and v live in a memory::TieredChunkStore — up to
// `host_budget_bytes` of them in RAM, the rest in a disk tier under `disk_directory` — in chunks of
// `chunk_elements` elements (m then v: 8 bytes per element), and Step() runs over them chunk by
// chunk in order, prefetching the next chunk while it updates the current one. The update is the
// same element-wise arithmetic, so the results are bit-identical to moments in RAM.
struct MomentOffload {
  int64_t host_budget_bytes = 0;  // 0: moments in RAM, no offload
  std::string disk_directory;     // where the disk tier's file goes
  int64_t disk_budget_bytes = 0;  // 0: what the slots need
  int64_t chunk_elements = 1 << 18;
  int worker = 0;                 // names the disk file (one per worker)
  // Paged parameters and gradients (not owned): chunk_elements is then the pager's chunk
  // capacity, so that each moment chunk of a paged group covers exactly one chunk of them.
  RangeResidency* residency = nullptr;
};

class AdamW {
 public:
  // REQUIRES: each group's numel() is a multiple of shard.count; with `offload` on, shard.count
  // is 1 (ZeRO-1 and offload do not combine yet). Throws c10::Error when the moment store cannot
  // be created (a budget below two chunks, a disk tier that does not fit), naming the cause.
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options, Shard shard = {},
        MomentOffload offload = {});
  ~AdamW();

  // One update of this rank's shard with learning rate `lr`, gradients multiplied by
  // `grad_scale` first.
  void Step(double lr, double grad_scale);

  // The same update in pieces, for an optimizer that runs inside backward (issue 7: "overlapped
  // with backward where the order allows"): BeginStep fixes the step's constants; StepChunk(c)
  // updates offloaded moment chunk c's range at once (its gradients must be final: no clipping
  // that needs the global norm); FinishStep updates every range not updated yet. Element-wise,
  // so the result is bit-identical to Step whatever the order. StepChunk needs the offload;
  // the moment store plans by the order the first split step used, from the second one on.
  void BeginStep(double lr, double grad_scale);
  void StepChunk(int chunk);
  void FinishStep();
  // Moment chunk c covers elements [begin, begin + count) of group `group`'s shard.
  int num_moment_chunks() const { return static_cast<int>(chunks_.size()); }

  // The range of group `g` this rank owns: [ShardBegin(g), ShardBegin(g) + ShardSize(g)).
  int64_t ShardBegin(int g) const;
  int64_t ShardSize(int g) const;
  const Shard& shard() const { return shard_; }

  // Updates taken so far (t in the bias corrections).
  int64_t steps() const { return steps_; }
  // The store of offloaded moments (its counters), or null.
  const memory::TieredChunkStore* moment_store() const { return store_.get(); }

  // The offloaded moments read piece by piece, for a checkpoint that streams them: copies
  // elements [first, first + count) of group g's exp_avg (`second` false) or exp_avg_sq (true)
  // into `out`, chunk by chunk through the store (one chunk buffered; any step drops it).
  // REQUIRES: offloaded moments. kOutOfRange for a range outside the group.
  absl::Status ReadMoments(int g, bool second, int64_t first, int64_t count, float* out);

  // Full (unsharded) state as named tensors: "exp_avg.<param>", "exp_avg_sq.<param>" per
  // parameter, and "step" (int64 scalar). REQUIRES: not sharded (count == 1); the tensors are
  // views that share storage with the optimizer, or copies read from the store when the moments
  // are offloaded (which then needs their full size in RAM for a moment).
  std::vector<std::pair<std::string, at::Tensor>> StateDict() const;
  // The same for a sharded optimizer: all-gathers the moments over `backend` (a collective:
  // every rank of the group calls it). kUnavailable / kDeadlineExceeded from the backend.
  absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> GatherStateDict(
      comm::Backend* backend) const;
  // Restores a full state (from either of the above, possibly saved with another shard count)
  // and keeps this rank's shard. kDataLoss names a missing tensor or a shape mismatch; nothing
  // changes unless everything is right.
  absl::Status LoadStateDict(const std::vector<std::pair<std::string, at::Tensor>>& state);

 private:
  // Per-parameter views of full-size flat moment buffers laid out like group g's params.
  void AppendNamedViews(int g, const at::Tensor& full_m, const at::Tensor& full_v,
                        std::vector<std::pair<std::string, at::Tensor>>* out) const;

  // One chunk of offloaded moments: elements [begin, begin + count) of group `group`'s shard.
  struct MomentChunk {
    int group;
    int64_t begin;
    int64_t count;
  };
  // Full-size moments of every group read back from the store.
  void ReadOffloaded(std::vector<at::Tensor>* full_m, std::vector<at::Tensor>* full_v) const;
  // Elements [first, first + count) of group gi's shard, whose moments are at m and v, with the
  // current step's constants.
  void UpdateRange(size_t gi, int64_t first, int64_t count, float* m, float* v);
  // One offloaded chunk: residency, moments, update, release. `next`: a chunk to prefetch, or -1.
  void StepOffloadedChunk(int chunk, int next);

  std::vector<ParamGroup> groups_;
  MomentOffload offload_;
  std::unique_ptr<memory::TieredChunkStore> store_;  // null: moments in exp_avg_ / exp_avg_sq_
  std::vector<MomentChunk> chunks_;
  std::vector<int> first_chunk_;  // per group: its first moment chunk (offloaded)
  std::vector<at::Tensor> exp_avg_;     // per group, ShardSize(g) elements (empty when offloaded)
  std::vector<at::Tensor> exp_avg_sq_;
  AdamWOptions options_;
  Shard shard_;
  int64_t steps_ = 0;
  // The step in progress (between BeginStep and FinishStep).
  bool in_step_ = false;
  double lr_ = 0;
  memory::AdamWConstants k_{};
  std::vector<char> stepped_;      // per moment chunk, this step
  std::vector<int> order_;         // the first split step's chunk order, then the store's trace
  bool recording_order_ = false;   // this step records order_
  bool traced_ = false;            // the store plans by order_
  bool split_this_step_ = false;   // StepChunk was called this step
  size_t order_pos_ = 0;
  int read_chunk_ = -1;             // the moment chunk in read_buffer_, -1: none
  std::vector<float> read_buffer_;
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_ADAMW_H_
