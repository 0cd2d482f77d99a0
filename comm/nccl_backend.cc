#include "comm/nccl_backend.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <functional>
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

absl::Status CheckCudaTensor(const at::Tensor& t, absl::string_view name,
                             absl::string_view context) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is undefined"));
  if (!t.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        context, ": ", name, " is a CPU tensor; the nccl backend needs CUDA tensors"));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is not contiguous"));
  }
  return absl::OkStatus();
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
        timeout_(timeout), health_(absl::StrCat("nccl group of ", size)) {}
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
    if (absl::Status s = CheckCudaTensor(tensor, "tensor", context); !s.ok()) return DoneWork(s);
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
    if (absl::Status s = CheckPair(input, "input", output, "output", context); !s.ok()) {
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
    if (absl::Status s = CheckPair(output, "output", input, "input", context); !s.ok()) {
      return DoneWork(s);
    }
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
    if (absl::Status s = CheckCudaTensor(tensor, "tensor", context); !s.ok()) return DoneWork(s);
    if (absl::Status s = CheckPeer(root, size_, rank_, true, "root", context); !s.ok()) {
      return DoneWork(s);
    }
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), *type, root,
                           comm_, stream_);
    });
  }

  // NCCL has no tags: transfers between a pair of ranks match in issue order.
  std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int /*tag*/,
                             const CollectiveOptions& options) override {
    const std::string context = Context("send");
    if (absl::Status s = CheckCudaTensor(tensor, "tensor", context); !s.ok()) return DoneWork(s);
    if (absl::Status s = CheckPeer(dst, size_, rank_, false, "dst", context); !s.ok()) {
      return DoneWork(s);
    }
    auto type = ToNccl(tensor.scalar_type(), context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, [&] {
      return ncclSend(tensor.data_ptr(), tensor.numel(), *type, dst, comm_, stream_);
    });
  }

  std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int /*tag*/,
                             const CollectiveOptions& options) override {
    const std::string context = Context("recv");
    if (absl::Status s = CheckCudaTensor(tensor, "tensor", context); !s.ok()) return DoneWork(s);
    if (absl::Status s = CheckPeer(src, size_, rank_, false, "src", context); !s.ok()) {
      return DoneWork(s);
    }
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

  absl::Status CheckPair(const at::Tensor& big, absl::string_view big_name,
                         const at::Tensor& small, absl::string_view small_name,
                         absl::string_view context) {
    SHOAL_RETURN_IF_ERROR(CheckCudaTensor(big, big_name, context));
    SHOAL_RETURN_IF_ERROR(CheckCudaTensor(small, small_name, context));
    if (big.numel() != size_ * small.numel() || big.scalar_type() != small.scalar_type()) {
      return absl::InvalidArgumentError(absl::StrCat(
          context, ": ", big_name, " must hold ", size_, " x ", small_name, " of the same dtype"));
    }
    return absl::OkStatus();
  }

  // Enqueues `op` on the stream and returns a Work that waits for it.
  std::unique_ptr<Work> Issue(const std::string& context, const CollectiveOptions& options,
                              const std::function<ncclResult_t()>& op) {
    if (absl::Status s = health_.CheckUsable(); !s.ok()) return DoneWork(s);
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
