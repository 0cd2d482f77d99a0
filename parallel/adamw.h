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
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "comm/backend.h"
#include "memory/flat_buffer.h"

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
// 4096-element blocks so the result does not depend on the thread count.
double GlobalL2Norm(const std::vector<at::Tensor>& flats);

// The factor torch.nn.utils.clip_grad_norm_ applies: min(1, max_norm / (norm + 1e-6));
// 1 when max_norm <= 0 (clipping off).
double ClipScale(double norm, double max_norm);

class AdamW {
 public:
  // REQUIRES: each group's numel() is a multiple of shard.count.
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options, Shard shard = {});

  // One update of this rank's shard with learning rate `lr`, gradients multiplied by
  // `grad_scale` first.
  void Step(double lr, double grad_scale);

  // The range of group `g` this rank owns: [ShardBegin(g), ShardBegin(g) + ShardSize(g)).
  int64_t ShardBegin(int g) const;
  int64_t ShardSize(int g) const;
  const Shard& shard() const { return shard_; }

  // Updates taken so far (t in the bias corrections).
  int64_t steps() const { return steps_; }

  // Full (unsharded) state as named tensors: "exp_avg.<param>", "exp_avg_sq.<param>" per
  // parameter, and "step" (int64 scalar). REQUIRES: not sharded (count == 1); the tensors are
  // views that share storage with the optimizer.
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

  std::vector<ParamGroup> groups_;
  std::vector<at::Tensor> exp_avg_;     // per group, ShardSize(g) elements
  std::vector<at::Tensor> exp_avg_sq_;
  AdamWOptions options_;
  Shard shard_;
  int64_t steps_ = 0;
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_ADAMW_H_
