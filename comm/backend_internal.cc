#include "comm/backend_internal.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"

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

OpPrecheck::OpPrecheck(std::string backend, int size, int rank, Rules rules,
                       const GroupHealth* health)
    : backend_(std::move(backend)), size_(size), rank_(rank), rules_(rules), health_(health) {}

absl::Status OpPrecheck::AllReduce(const at::Tensor& tensor, absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(health_->CheckUsable());
  return CheckTensor(tensor, "tensor", context);
}

absl::Status OpPrecheck::ReduceScatter(const at::Tensor& output, const at::Tensor& input,
                                       absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(health_->CheckUsable());
  return CheckSharded(output, input, /*input_is_big=*/true, context);
}

absl::Status OpPrecheck::AllGather(const at::Tensor& output, const at::Tensor& input,
                                   absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(health_->CheckUsable());
  return CheckSharded(output, input, /*input_is_big=*/false, context);
}

absl::Status OpPrecheck::Broadcast(const at::Tensor& tensor, int root,
                                   absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(health_->CheckUsable());
  SHOAL_RETURN_IF_ERROR(CheckTensor(tensor, "tensor", context));
  return CheckPeer(root, /*allow_self=*/true, "root", context);
}

absl::Status OpPrecheck::Send(const at::Tensor& tensor, int dst, int tag,
                              absl::string_view context) const {
  return CheckPointToPoint(tensor, dst, "dst", tag, context);
}

absl::Status OpPrecheck::Recv(const at::Tensor& tensor, int src, int tag,
                              absl::string_view context) const {
  return CheckPointToPoint(tensor, src, "src", tag, context);
}

absl::Status OpPrecheck::Barrier() const { return health_->CheckUsable(); }

absl::Status OpPrecheck::CheckTensor(const at::Tensor& tensor, absl::string_view name,
                                     absl::string_view context) const {
  if (!tensor.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is undefined"));
  }
  if (rules_.device == TensorDevice::kCpu && !tensor.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is on ",
                                                   tensor.device().str(), ", not the CPU"));
  }
  if (rules_.device == TensorDevice::kCuda && !tensor.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is a CPU tensor; the ",
                                                   backend_, " backend needs CUDA tensors"));
  }
  if (!tensor.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is not contiguous"));
  }
  if (rules_.check_dtype != nullptr) return rules_.check_dtype(tensor, name, context);
  return absl::OkStatus();
}

absl::Status OpPrecheck::CheckSharded(const at::Tensor& output, const at::Tensor& input,
                                      bool input_is_big, absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(CheckTensor(output, "output", context));
  SHOAL_RETURN_IF_ERROR(CheckTensor(input, "input", context));
  const at::Tensor& big = input_is_big ? input : output;
  const at::Tensor& small = input_is_big ? output : input;
  const absl::string_view big_name = input_is_big ? "input" : "output";
  const absl::string_view small_name = input_is_big ? "output" : "input";
  if (big.numel() != size_ * small.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        context, ": ", big_name, " has ", big.numel(), " elements, expected ", size_, " x ",
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

absl::Status OpPrecheck::CheckPeer(int peer, bool allow_self, absl::string_view what,
                                   absl::string_view context) const {
  if (peer < 0 || peer >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", what, " ", peer, " is not in [0, ", size_, ")"));
  }
  if (!allow_self && peer == rank_) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", what, " ", peer, " is this rank"));
  }
  return absl::OkStatus();
}

absl::Status OpPrecheck::CheckPointToPoint(const at::Tensor& tensor, int peer,
                                           absl::string_view what, int tag,
                                           absl::string_view context) const {
  SHOAL_RETURN_IF_ERROR(health_->CheckUsable());
  SHOAL_RETURN_IF_ERROR(CheckTensor(tensor, "tensor", context));
  SHOAL_RETURN_IF_ERROR(CheckPeer(peer, /*allow_self=*/false, what, context));
  if (rules_.max_tag.has_value() && (tag < 0 || tag > *rules_.max_tag)) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": tag not in [0, ", *rules_.max_tag, "]"));
  }
  return absl::OkStatus();
}

}  // namespace shoal::comm::internal
