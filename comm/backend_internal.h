// Pieces every backend implementation shares: argument checks with messages that name the op and
// group, a Work that is already finished, kAvg's division, and the record of a group's first
// failure that makes every later call fail fast. Internal to comm/.
#ifndef SHOAL_COMM_BACKEND_INTERNAL_H_
#define SHOAL_COMM_BACKEND_INTERNAL_H_

#include <memory>
#include <mutex>
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

// kInvalidArgument (message: `context` + what is wrong) unless `tensor` is defined, contiguous
// and on the CPU.
absl::Status CheckCpuTensor(const at::Tensor& tensor, absl::string_view name,
                            absl::string_view context);
// ReduceScatter / AllGather shapes: big.numel() == size * small.numel(), same dtype.
absl::Status CheckShardedPair(const at::Tensor& big, absl::string_view big_name,
                              const at::Tensor& small, absl::string_view small_name, int size,
                              absl::string_view context);
// A peer rank for Send/Recv/Broadcast: in [0, size), and (for point to point) not `self`.
absl::Status CheckPeer(int peer, int size, int self, bool allow_self, absl::string_view what,
                       absl::string_view context);

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

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_BACKEND_INTERNAL_H_
