// Pieces every backend implementation shares: the argument checks at the top of every operation
// (one per kind of operation, with messages that name the op and group), a Work that is already
// finished, kAvg's division, and the record of a group's first failure that makes every later
// call fail fast. Internal to comm/.
#ifndef SHOAL_COMM_BACKEND_INTERNAL_H_
#define SHOAL_COMM_BACKEND_INTERNAL_H_

#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "comm/backend.h"

namespace shoal::comm::internal {

// A Work whose Wait() returns `status` at once (argument errors, a broken group, world of 1).
std::unique_ptr<Work> DoneWork(absl::Status status);

// "sum", "avg", "max", "min".
const char* ReduceOpName(ReduceOp op);

// "allreduce on gloo group of 4 (rank 1)": the prefix of every message about one operation.
std::string OpContext(absl::string_view op, absl::string_view backend, int size, int rank);

// The timeout an operation runs under: options.timeout, or `backend_default` when it is zero.
absl::Duration EffectiveTimeout(const CollectiveOptions& options, absl::Duration backend_default);

// kAvg after a sum: tensor /= n, truncating toward zero for integer dtypes.
void DivideInPlace(at::Tensor& tensor, int64_t n);

// The health of one group: OK until an operation fails with a transport error (timeout, dead
// peer, internal); from then on every call reports kFailedPrecondition naming that failure.
// Argument errors do not break a group. Thread-safe.
class GroupHealth {
 public:
  explicit GroupHealth(std::string group) : group_(std::move(group)) {}
  // OK, or kFailedPrecondition: "gloo group of 4 is unusable after an earlier failure (...)".
  absl::Status CheckUsable() const;
  // Remembers `status` as the group's first failure unless OK or an argument error.
  void RecordFailure(const absl::Status& status);

 private:
  const std::string group_;
  mutable std::mutex mu_;
  absl::Status first_failure_;  // guarded by mu_
};

// Where a backend's tensors live.
enum class TensorDevice { kCpu, kCuda };

// The argument checks every backend runs first in each operation, one method per kind of
// operation. Each returns kFailedPrecondition (GroupHealth::CheckUsable's message) when the
// group is unusable, else kInvalidArgument with a message that starts with `context` when an
// argument is wrong:
//   - a tensor is undefined, not on the backend's device, not contiguous, or (where the backend
//     gives Rules::check_dtype) of a dtype it does not move;
//   - ReduceScatter / AllGather: the big tensor (input / output) does not hold size x the
//     small one's elements, or the two dtypes differ;
//   - a Broadcast root is not in [0, size); a Send/Recv peer is not in [0, size) or is this
//     rank; a tag is not in [0, Rules::max_tag] (where the backend has tags).
// Checks run in that order (`output` before `input`) and the first failure is returned. The
// checks never touch the group, so an argument error leaves it usable. Thread-safe (reads only).
class OpPrecheck {
 public:
  // What one backend accepts beyond what every backend requires.
  struct Rules {
    // Where its tensors live: the CPU (gloo, mpi) or a CUDA device (nccl).
    TensorDevice device = TensorDevice::kCpu;
    // The largest Send/Recv tag; nullopt where the backend ignores tags (NCCL matches the
    // transfers between two ranks in issue order).
    std::optional<int> max_tag;
    // OK or kInvalidArgument for a tensor's dtype; null where the backend refuses a dtype itself
    // when it converts it to its library's type (mpi, nccl).
    absl::Status (*check_dtype)(const at::Tensor& tensor, absl::string_view name,
                                absl::string_view context) = nullptr;
  };

  // `backend`: "gloo", "mpi", "nccl", as named in messages; `size` and `rank`: the group's.
  // `health` must outlive this.
  OpPrecheck(std::string backend, int size, int rank, Rules rules, const GroupHealth* health);

  absl::Status AllReduce(const at::Tensor& tensor, absl::string_view context) const;
  // REQUIRES (else kInvalidArgument): input.numel() == size * output.numel(), same dtype.
  absl::Status ReduceScatter(const at::Tensor& output, const at::Tensor& input,
                             absl::string_view context) const;
  // REQUIRES (else kInvalidArgument): output.numel() == size * input.numel(), same dtype.
  absl::Status AllGather(const at::Tensor& output, const at::Tensor& input,
                         absl::string_view context) const;
  absl::Status Broadcast(const at::Tensor& tensor, int root, absl::string_view context) const;
  absl::Status Send(const at::Tensor& tensor, int dst, int tag, absl::string_view context) const;
  absl::Status Recv(const at::Tensor& tensor, int src, int tag, absl::string_view context) const;
  // Only the group's health: a barrier has no arguments.
  absl::Status Barrier() const;

 private:
  absl::Status CheckTensor(const at::Tensor& tensor, absl::string_view name,
                           absl::string_view context) const;
  // Both tensors, then: the bigger one (`input` when `input_is_big`) holds size x the other's
  // elements, of the same dtype.
  absl::Status CheckSharded(const at::Tensor& output, const at::Tensor& input, bool input_is_big,
                            absl::string_view context) const;
  // A peer rank in [0, size), and (for point to point) not this rank.
  absl::Status CheckPeer(int peer, bool allow_self, absl::string_view what,
                         absl::string_view context) const;
  absl::Status CheckPointToPoint(const at::Tensor& tensor, int peer, absl::string_view what,
                                 int tag, absl::string_view context) const;

  const std::string backend_;
  const int size_;
  const int rank_;
  const Rules rules_;
  const GroupHealth* const health_;
};

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_BACKEND_INTERNAL_H_
