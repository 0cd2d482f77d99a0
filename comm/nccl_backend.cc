#include "comm/nccl_backend.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "comm/backend_internal.h"
#include "common/status.h"

namespace shoal::comm::internal {
namespace {

absl::StatusOr<ncclDataType_t> ToNccl(at::ScalarType t, absl::string_view context) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(context, ": dtype ", c10::toString(t), " is not supported by NCCL"));
  }
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

// CUDA tensors; no tags (transfers between two ranks match in issue order). Dtypes: ToNccl.
OpPrecheck::Rules NcclRules() {
  OpPrecheck::Rules rules;
  rules.device = TensorDevice::kCuda;
  rules.max_tag = std::nullopt;
  return rules;
}

// Waits (polling) for a non-blocking communicator to leave ncclInProgress.
absl::Status AwaitComm(ncclComm_t comm, absl::Time deadline, absl::string_view context) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm, &state);
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      return absl::UnavailableError(
          absl::StrCat(context, ": ", ncclGetErrorString(state), " (a peer failed?)"));
    }
    if (absl::Now() > deadline) {
      ncclCommAbort(comm);
      return absl::DeadlineExceededError(absl::StrCat(context, ": timed out"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

class NcclWork final : public Work {
 public:
  NcclWork(ncclComm_t comm, cudaEvent_t event, absl::Time deadline, std::string context,
           GroupHealth* health, std::function<void()> finish)
      : comm_(comm), event_(event), deadline_(deadline), context_(std::move(context)),
        health_(health), finish_(std::move(finish)) {}
  ~NcclWork() override { cudaEventDestroy(event_); }

  absl::Status Wait() override {
    absl::Status s = Poll();
    health_->RecordFailure(s);
    return s;
  }

 private:
  absl::Status Poll() {
    while (true) {
      const cudaError_t q = cudaEventQuery(event_);
      if (q == cudaSuccess) {
        if (finish_) finish_();
        return absl::OkStatus();
      }
      if (q != cudaErrorNotReady) {
        return absl::InternalError(absl::StrCat(context_, ": ", cudaGetErrorString(q)));
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        ncclCommAbort(comm_);
        return absl::UnavailableError(
            absl::StrCat(context_, ": ", ncclGetErrorString(async), " (a peer failed?)"));
      }
      if (absl::Now() > deadline_) {
        ncclCommAbort(comm_);
        return absl::DeadlineExceededError(absl::StrCat(context_, ": timed out"));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  ncclComm_t comm_;
  cudaEvent_t event_;
  absl::Time deadline_;
  std::string context_;
  GroupHealth* health_;
  std::function<void()> finish_;
};

class NcclBackend final : public Backend {
 public:
  NcclBackend(int rank, int size, int device, ncclComm_t comm, cudaStream_t stream,
              absl::Duration timeout)
      : rank_(rank), size_(size), device_(device), comm_(comm), stream_(stream),
        timeout_(timeout), health_(absl::StrCat("nccl group of ", size)),
        precheck_("nccl", size, rank, NcclRules(), &health_) {}
  ~NcclBackend() override {
    cudaStreamSynchronize(stream_);
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                  const CollectiveOptions& options) override {
    const std::string context = Context("allreduce");
    if (absl::Status s = precheck_.AllReduce(tensor, context); !s.ok()) return DoneWork(s);
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), *type,
                           ToNccl(op), comm_, stream_);
    });
  }

  std::unique_ptr<Work> ReduceScatter(at::Tensor& output, const at::Tensor& input, ReduceOp op,
                                      const CollectiveOptions& options) override {
    const std::string context = Context("reduce_scatter");
    if (absl::Status s = precheck_.ReduceScatter(output, input, context); !s.ok()) {
      return DoneWork(s);
    }
    auto type = ToNccl(input.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(), *type,
                               ToNccl(op), comm_, stream_);
    });
  }

  std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                  const CollectiveOptions& options) override {
    const std::string context = Context("allgather");
    if (absl::Status s = precheck_.AllGather(output, input, context); !s.ok()) return DoneWork(s);
    auto type = ToNccl(input.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), *type, comm_,
                           stream_);
    });
  }

  std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                  const CollectiveOptions& options) override {
    const std::string context = Context("broadcast");
    if (absl::Status s = precheck_.Broadcast(tensor, root, context); !s.ok()) return DoneWork(s);
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), *type, root,
                           comm_, stream_);
    });
  }

  // NCCL has no tags: transfers between a pair of ranks match in issue order.
  std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = Context("send");
    if (absl::Status s = precheck_.Send(tensor, dst, tag, context); !s.ok()) return DoneWork(s);
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclSend(tensor.data_ptr(), tensor.numel(), *type, dst, comm_, stream_);
    });
  }

  std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = Context("recv");
    if (absl::Status s = precheck_.Recv(tensor, src, tag, context); !s.ok()) return DoneWork(s);
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclRecv(tensor.data_ptr(), tensor.numel(), *type, src, comm_, stream_);
    });
  }

  std::unique_ptr<Work> Barrier(const CollectiveOptions& options) override {
    if (!barrier_.defined()) {
      barrier_ = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_));
    }
    return AllReduce(barrier_, ReduceOp::kSum, options);
  }

 private:
  std::string Context(absl::string_view op) const { return OpContext(op, "nccl", size_, rank_); }

  // Enqueues `op` on the stream and returns a Work that waits for it. The caller has run the
  // precheck (which checks the group's health).
  std::unique_ptr<Work> Issue(const std::string& context, const CollectiveOptions& options,
                              const std::function<ncclResult_t()>& op) {
    const absl::Time deadline = absl::Now() + EffectiveTimeout(options, timeout_);
    cudaSetDevice(device_);
    const ncclResult_t r = op();
    if (r != ncclSuccess && r != ncclInProgress) {
      absl::Status s = absl::InternalError(absl::StrCat(context, ": ", ncclGetErrorString(r)));
      health_.RecordFailure(s);
      return DoneWork(s);
    }
    if (absl::Status s = AwaitComm(comm_, deadline, context); !s.ok()) {
      health_.RecordFailure(s);
      return DoneWork(s);
    }
    cudaEvent_t event;
    cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    cudaEventRecord(event, stream_);
    return std::make_unique<NcclWork>(comm_, event, deadline, context, &health_, nullptr);
  }

  int rank_, size_, device_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  absl::Duration timeout_;
  GroupHealth health_;
  const OpPrecheck precheck_;  // reads health_
  at::Tensor barrier_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateNcclBackend(const BackendOptions& options) {
  const std::string context =
      absl::StrCat("nccl rendezvous of rank ", options.rank, " in a group of ", options.world_size);
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    return absl::UnavailableError(absl::StrCat(
        context, ": no usable CUDA device (", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices",
        ")"));
  }
  if (options.store == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": needs a store"));
  }
  const int device = options.rank % devices;
  cudaSetDevice(device);
  ncclUniqueId id;
  const std::string key = "nccl/unique_id";
  if (options.rank == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      return absl::InternalError(absl::StrCat(context, ": ", ncclGetErrorString(r)));
    }
    SHOAL_RETURN_IF_ERROR(
        options.store->Set(key, std::string(reinterpret_cast<const char*>(&id), sizeof(id))));
  } else {
    SHOAL_ASSIGN_OR_RETURN(std::string bytes, options.store->Get(key, options.timeout));
    if (bytes.size() != sizeof(id)) {
      return absl::DataLossError(absl::StrCat(context, ": malformed NCCL id in the store"));
    }
    std::memcpy(&id, bytes.data(), sizeof(id));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm;
  const ncclResult_t r =
      ncclCommInitRankConfig(&comm, options.world_size, id, options.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    return absl::UnavailableError(absl::StrCat(context, ": ", ncclGetErrorString(r)));
  }
  SHOAL_RETURN_IF_ERROR(AwaitComm(comm, absl::Now() + options.timeout, context));
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  return std::unique_ptr<Backend>(new NcclBackend(options.rank, options.world_size, device, comm,
                                                  stream, options.timeout));
}

}  // namespace shoal::comm::internal
