#include "comm/backend_internal.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

namespace shoal::comm::internal {
namespace {

class FinishedWork final : public Work {
 public:
  explicit FinishedWork(absl::Status status) : status_(std::move(status)) {}
  absl::Status Wait() override { return status_; }

 private:
  absl::Status status_;
};

}  // namespace

std::unique_ptr<Work> DoneWork(absl::Status status) {
  return std::make_unique<FinishedWork>(std::move(status));
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "unknown";
}

std::string OpContext(absl::string_view op, absl::string_view backend, int size, int rank) {
  return absl::StrCat(op, " on ", backend, " group of ", size, " (rank ", rank, ")");
}

absl::Duration EffectiveTimeout(const CollectiveOptions& options, absl::Duration backend_default) {
  return options.timeout > absl::ZeroDuration() ? options.timeout : backend_default;
}

absl::Status CheckCpuTensor(const at::Tensor& tensor, absl::string_view name,
                            absl::string_view context) {
  if (!tensor.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is undefined"));
  }
  if (!tensor.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is on ",
                                                   tensor.device().str(), ", not the CPU"));
  }
  if (!tensor.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is not contiguous"));
  }
  return absl::OkStatus();
}

absl::Status CheckShardedPair(const at::Tensor& big, absl::string_view big_name,
                              const at::Tensor& small, absl::string_view small_name, int size,
                              absl::string_view context) {
  if (big.numel() != size * small.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        context, ": ", big_name, " has ", big.numel(), " elements, expected ", size, " x ",
        small.numel(), " (", small_name, ")"));
  }
  if (big.scalar_type() != small.scalar_type()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", big_name, " is ",
                                                   c10::toString(big.scalar_type()), " but ",
                                                   small_name, " is ",
                                                   c10::toString(small.scalar_type())));
  }
  return absl::OkStatus();
}

absl::Status CheckPeer(int peer, int size, int self, bool allow_self, absl::string_view what,
                       absl::string_view context) {
  if (peer < 0 || peer >= size) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", what, " ", peer, " is not in [0, ", size, ")"));
  }
  if (!allow_self && peer == self) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", what, " ", peer, " is this rank"));
  }
  return absl::OkStatus();
}

void DivideInPlace(at::Tensor& tensor, int64_t n) {
  if (n == 1) return;
  if (at::isFloatingType(tensor.scalar_type())) {
    tensor.div_(n);
  } else {
    tensor.div_(n, "trunc");
  }
}

absl::Status GroupHealth::CheckUsable() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (first_failure_.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      group_, " is unusable after an earlier failure (", first_failure_.message(),
      "); rebuild the group"));
}

void GroupHealth::RecordFailure(const absl::Status& status) {
  if (status.ok() || absl::IsInvalidArgument(status) || absl::IsFailedPrecondition(status)) {
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (first_failure_.ok()) first_failure_ = status;
}

}  // namespace shoal::comm::internal
