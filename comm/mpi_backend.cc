#include "comm/mpi_backend.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/backend_internal.h"

namespace shoal::comm::internal {
namespace {

// ---- The process's MPI: initialised once, finalised at exit. ----

// Every MPI call of the process holds this: with MPI_THREAD_SERIALIZED, calls from different
// threads (a Work waited on elsewhere) must not overlap.
std::mutex& MpiMutex() {
  static std::mutex mu;
  return mu;
}

template <typename T, ReduceOp kOp>
void Reduce16Bit(void* in, void* inout, int* len, MPI_Datatype* /*type*/) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) {
    const float x = static_cast<float>(a[i]);
    const float y = static_cast<float>(b[i]);
    if constexpr (kOp == ReduceOp::kMax) {
      b[i] = static_cast<T>(std::max(x, y));
    } else if constexpr (kOp == ReduceOp::kMin) {
      b[i] = static_cast<T>(std::min(x, y));
    } else {
      b[i] = static_cast<T>(x + y);
    }
  }
}

// MPI_Init_thread on first use; MPI_Finalize when the process exits (a static's destructor), if
// this code initialised MPI. Also owns the MPI_Op's for 16-bit floats.
class MpiRuntime {
 public:
  static absl::StatusOr<MpiRuntime*> Get() {
    static MpiRuntime runtime;
    std::lock_guard<std::mutex> lock(MpiMutex());
    if (!runtime.init_status_.ok() || runtime.initialized_) return runtime.Result();
    runtime.Initialize();
    return runtime.Result();
  }

  // The MPI_Op for `op` on `type` (kAvg: its sum). Only for float16/bfloat16.
  MPI_Op Op16(at::ScalarType type, ReduceOp op) const {
    const int t = type == at::kBFloat16 ? 1 : 0;
    const int o = op == ReduceOp::kMax ? 1 : op == ReduceOp::kMin ? 2 : 0;
    return ops16_[t][o];
  }
  int tag_ub() const { return tag_ub_; }

  ~MpiRuntime() {
    if (!initialized_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& row : ops16_) {
      for (MPI_Op& op : row) {
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
      }
    }
    if (we_initialized_) MPI_Finalize();
  }

 private:
  MpiRuntime() = default;

  absl::StatusOr<MpiRuntime*> Result() {
    if (!init_status_.ok()) return init_status_;
    return this;
  }

  void Initialize() {
    int already = 0;
    MPI_Initialized(&already);
    int provided = MPI_THREAD_SINGLE;
    if (already) {
      MPI_Query_thread(&provided);
    } else {
      const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
      if (rc != MPI_SUCCESS) {
        init_status_ = absl::UnavailableError(absl::StrCat("mpi backend: MPI_Init_thread failed (",
                                                           rc, ")"));
        return;
      }
      we_initialized_ = true;
    }
    initialized_ = true;
    if (provided < MPI_THREAD_SERIALIZED) {
      init_status_ = absl::FailedPreconditionError(absl::StrCat(
          "mpi backend: MPI provides thread level ", provided,
          ", below MPI_THREAD_SERIALIZED (", MPI_THREAD_SERIALIZED, ")"));
      return;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    void* value = nullptr;
    int flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &value, &flag);
    if (flag) tag_ub_ = *static_cast<int*>(value);
    MPI_Op_create(&Reduce16Bit<c10::Half, ReduceOp::kSum>, 1, &ops16_[0][0]);
    MPI_Op_create(&Reduce16Bit<c10::Half, ReduceOp::kMax>, 1, &ops16_[0][1]);
    MPI_Op_create(&Reduce16Bit<c10::Half, ReduceOp::kMin>, 1, &ops16_[0][2]);
    MPI_Op_create(&Reduce16Bit<c10::BFloat16, ReduceOp::kSum>, 1, &ops16_[1][0]);
    MPI_Op_create(&Reduce16Bit<c10::BFloat16, ReduceOp::kMax>, 1, &ops16_[1][1]);
    MPI_Op_create(&Reduce16Bit<c10::BFloat16, ReduceOp::kMin>, 1, &ops16_[1][2]);
  }

  bool initialized_ = false;     // MPI is initialised (by us or before us)
  bool we_initialized_ = false;  // so we finalise it
  absl::Status init_status_;
  int tag_ub_ = 32767;  // the smallest MPI_TAG_UB the standard allows
  MPI_Op ops16_[2][3] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                         {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
};

// ---- Types, ops, errors. ----

// The MPI datatype of `tensor`'s elements; kInvalidArgument for a dtype MPI cannot move or more
// elements than MPI's int counts can say.
absl::StatusOr<MPI_Datatype> ToMpiType(const at::Tensor& tensor, absl::string_view context) {
  if (tensor.numel() > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": ", tensor.numel(), " elements exceed MPI's int count"));
  }
  const at::ScalarType type = tensor.scalar_type();
  switch (type) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kShort: return MPI_INT16_T;
    case at::kChar: return MPI_INT8_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBool: return MPI_C_BOOL;
    case at::kHalf:
    case at::kBFloat16: return MPI_UINT16_T;  // moved as bits; reduced by our own MPI_Op's
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(context, ": dtype ", c10::toString(type), " is not supported"));
  }
}

absl::StatusOr<MPI_Op> ToMpiOp(ReduceOp op, at::ScalarType type, const MpiRuntime& runtime,
                               absl::string_view context) {
  if (type == at::kBool) {
    return absl::InvalidArgumentError(absl::StrCat(context, ": cannot reduce bool tensors"));
  }
  if (type == at::kHalf || type == at::kBFloat16) return runtime.Op16(type, op);
  switch (op) {
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return MPI_SUM;  // kAvg: Wait() divides
  }
  return MPI_SUM;
}

absl::Status MpiErrorStatus(int rc, absl::string_view context) {
  int error_class = MPI_ERR_UNKNOWN;
  MPI_Error_class(rc, &error_class);
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  absl::StatusCode code = absl::StatusCode::kInternal;
  switch (error_class) {
    case MPI_ERR_BUFFER:
    case MPI_ERR_COUNT:
    case MPI_ERR_TYPE:
    case MPI_ERR_TAG:
    case MPI_ERR_RANK:
    case MPI_ERR_ROOT:
    case MPI_ERR_OP:
    case MPI_ERR_ARG:
    case MPI_ERR_TRUNCATE:
      code = absl::StatusCode::kInvalidArgument;
      break;
#if defined(MPIX_ERR_PROC_FAILED)
    case MPIX_ERR_PROC_FAILED:
    case MPIX_ERR_REVOKED:
      code = absl::StatusCode::kUnavailable;
      break;
#endif
    default:
      break;
  }
  return absl::Status(code, absl::StrCat(context, ": MPI error ", rc, ": ",
                                         absl::string_view(text, static_cast<size_t>(len))));
}

// CPU tensors; tags up to the MPI_TAG_UB of this MPI. Dtypes and counts: ToMpiType.
OpPrecheck::Rules MpiRules(const MpiRuntime& runtime) {
  OpPrecheck::Rules rules;
  rules.device = TensorDevice::kCpu;
  rules.max_tag = runtime.tag_ub();
  return rules;
}

// ---- The group and its operations. ----

// A communicator and what its Works share; outlives the backend while Works are alive.
struct MpiGroupState {
  MpiGroupState(MPI_Comm c, std::string group) : comm(c), health(std::move(group)) {}

  ~MpiGroupState() {
    std::lock_guard<std::mutex> lock(MpiMutex());
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Requests that timed out: give them a last second, then leak them together with their
    // tensors and the communicator: MPI keeps progressing them (OpenMPI's libnbc touches the
    // communicator when it does), and freeing either under it would crash (see the header).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    bool all_done = true;
    for (auto& a : abandoned) {
      int done = 0;
      while (!done && std::chrono::steady_clock::now() < deadline) {
        if (MPI_Test(&a.request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      }
      if (!done) {
        new std::vector<at::Tensor>(std::move(a.tensors));  // deliberately leaked
        all_done = false;
      }
    }
    if (all_done) MPI_Comm_free(&comm);
  }

  struct Abandoned {
    MPI_Request request;
    std::vector<at::Tensor> tensors;
  };

  MPI_Comm comm;
  GroupHealth health;
  std::vector<Abandoned> abandoned;  // guarded by MpiMutex()
};

class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiGroupState> state, MPI_Request request,
          std::vector<at::Tensor> tensors, std::string context, absl::Duration timeout,
          std::function<absl::Status(const MPI_Status&)> finish)
      : state_(std::move(state)),
        request_(request),
        tensors_(std::move(tensors)),
        context_(std::move(context)),
        timeout_(timeout),
        finish_(std::move(finish)) {}

  ~MpiWork() override {
    if (request_ != MPI_REQUEST_NULL) Abandon();
  }

  // Polls MPI_Test: busy for the first millisecond (latency), then yielding, then sleeping a
  // little after 2 s (a peer is late: leave it the CPU), until done or the timeout.
  absl::Status Wait() override {
    if (request_ == MPI_REQUEST_NULL && waited_) {
      return absl::FailedPreconditionError(absl::StrCat(context_, ": waited twice"));
    }
    waited_ = true;
    const auto start = std::chrono::steady_clock::now();
    const auto limit = absl::ToChronoNanoseconds(timeout_);
    MPI_Status mpi_status;
    while (true) {
      int done = 0;
      int rc;
      {
        std::lock_guard<std::mutex> lock(MpiMutex());
        rc = MPI_Test(&request_, &done, &mpi_status);
      }
      if (rc != MPI_SUCCESS) {
        absl::Status s = MpiErrorStatus(rc, context_);
        state_->health.RecordFailure(s);
        request_ = MPI_REQUEST_NULL;
        return s;
      }
      if (done) break;
      const auto elapsed = std::chrono::steady_clock::now() - start;
      if (elapsed > limit) {
        absl::Status s = absl::DeadlineExceededError(
            absl::StrCat(context_, ": not done within ", absl::FormatDuration(timeout_),
                         " (a peer is missing or slow)"));
        state_->health.RecordFailure(s);
        Abandon();
        return s;
      }
      // MPI moves data only inside MPI calls (libnbc's schedules advance in MPI_Test), so a
      // sleep between tests stalls large transfers: sleeping 50 us between tests after 50 ms
      // gave 0.30-0.34 GB/s bus bandwidth for 64-256 MiB between two ranks on a 2-core host,
      // yielding instead gives 0.73-0.83 GB/s. Yielding still hands the core to a peer that
      // shares it; only a long wait backs off to sleeping.
      if (elapsed < std::chrono::milliseconds(1)) continue;
      if (elapsed < std::chrono::seconds(2)) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    absl::Status s = finish_ ? finish_(mpi_status) : absl::OkStatus();
    tensors_.clear();
    return s;
  }

 private:
  void Abandon() {
    std::lock_guard<std::mutex> lock(MpiMutex());
    state_->abandoned.push_back({request_, std::move(tensors_)});
    request_ = MPI_REQUEST_NULL;
  }

  std::shared_ptr<MpiGroupState> state_;
  MPI_Request request_;
  std::vector<at::Tensor> tensors_;  // keep the buffers alive while MPI uses them
  const std::string context_;
  const absl::Duration timeout_;
  std::function<absl::Status(const MPI_Status&)> finish_;
  bool waited_ = false;
};

class MpiBackend final : public Backend {
 public:
  MpiBackend(MpiRuntime* runtime, std::shared_ptr<MpiGroupState> state, int rank, int size,
             absl::Duration timeout)
      : runtime_(runtime),
        state_(std::move(state)),
        rank_(rank),
        size_(size),
        timeout_(timeout),
        precheck_("mpi", size_, rank_, MpiRules(*runtime_), &state_->health) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                  const CollectiveOptions& options) override {
    const std::string context =
        absl::StrCat(Context("allreduce"), " [", ReduceOpName(op), ", ", tensor.numel(), " x ",
                     c10::toString(tensor.scalar_type()), "]");
    if (absl::Status s = precheck_.AllReduce(tensor, context); !s.ok()) return DoneWork(s);
    auto type = ToMpiType(tensor, context);
    if (!type.ok()) return DoneWork(type.status());
    auto mpi_op = ToMpiOp(op, tensor.scalar_type(), *runtime_, context);
    if (!mpi_op.ok()) return DoneWork(mpi_op.status());
    std::function<absl::Status(const MPI_Status&)> finish;
    if (op == ReduceOp::kAvg) {
      finish = [tensor, n = size_](const MPI_Status&) mutable {
        DivideInPlace(tensor, n);
        return absl::OkStatus();
      };
    }
    return Issue(context, options, {tensor}, std::move(finish), [&](MPI_Request* r) {
      return MPI_Iallreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(tensor.numel()),
                            *type, *mpi_op, state_->comm, r);
    });
  }

  std::unique_ptr<Work> ReduceScatter(at::Tensor& output, const at::Tensor& input, ReduceOp op,
                                      const CollectiveOptions& options) override {
    const std::string context =
        absl::StrCat(Context("reduce_scatter"), " [", ReduceOpName(op), ", ", input.numel(),
                     " x ", c10::toString(input.scalar_type()), "]");
    if (absl::Status s = precheck_.ReduceScatter(output, input, context); !s.ok()) {
      return DoneWork(s);
    }
    auto type = ToMpiType(output, context);  // MPI's count; input has the same dtype
    if (!type.ok()) return DoneWork(type.status());
    auto mpi_op = ToMpiOp(op, input.scalar_type(), *runtime_, context);
    if (!mpi_op.ok()) return DoneWork(mpi_op.status());
    std::function<absl::Status(const MPI_Status&)> finish;
    if (op == ReduceOp::kAvg) {
      finish = [output, n = size_](const MPI_Status&) mutable {
        DivideInPlace(output, n);
        return absl::OkStatus();
      };
    }
    return Issue(context, options, {output, input}, std::move(finish), [&](MPI_Request* r) {
      return MPI_Ireduce_scatter_block(input.data_ptr(), output.data_ptr(),
                                       static_cast<int>(output.numel()), *type, *mpi_op,
                                       state_->comm, r);
    });
  }

  std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                  const CollectiveOptions& options) override {
    const std::string context =
        absl::StrCat(Context("allgather"), " [", input.numel(), " x ",
                     c10::toString(input.scalar_type()), " per rank]");
    if (absl::Status s = precheck_.AllGather(output, input, context); !s.ok()) return DoneWork(s);
    auto type = ToMpiType(output, context);  // the larger buffer; input has the same dtype
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, {output, input}, nullptr, [&](MPI_Request* r) {
      const int n = static_cast<int>(input.numel());
      return MPI_Iallgather(input.data_ptr(), n, *type, output.data_ptr(), n, *type,
                            state_->comm, r);
    });
  }

  std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                  const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("broadcast"), " [root ", root, ", ",
                                             tensor.numel(), " x ",
                                             c10::toString(tensor.scalar_type()), "]");
    if (absl::Status s = precheck_.Broadcast(tensor, root, context); !s.ok()) return DoneWork(s);
    auto type = ToMpiType(tensor, context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, {tensor}, nullptr, [&](MPI_Request* r) {
      return MPI_Ibcast(tensor.data_ptr(), static_cast<int>(tensor.numel()), *type, root,
                        state_->comm, r);
    });
  }

  std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("send"), " [to rank ", dst, ", tag ", tag,
                                             ", ", tensor.nbytes(), " bytes]");
    if (absl::Status s = precheck_.Send(tensor, dst, tag, context); !s.ok()) return DoneWork(s);
    auto type = ToMpiType(tensor, context);
    if (!type.ok()) return DoneWork(type.status());
    return Issue(context, options, {tensor}, nullptr, [&](MPI_Request* r) {
      return MPI_Isend(tensor.data_ptr(), static_cast<int>(tensor.numel()), *type, dst, tag,
                       state_->comm, r);
    });
  }

  std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("recv"), " [from rank ", src, ", tag ",
                                             tag, ", ", tensor.nbytes(), " bytes]");
    if (absl::Status s = precheck_.Recv(tensor, src, tag, context); !s.ok()) return DoneWork(s);
    auto type = ToMpiType(tensor, context);
    if (!type.ok()) return DoneWork(type.status());
    const int count = static_cast<int>(tensor.numel());
    // A shorter message than expected is not an MPI error; the contract says same size.
    auto finish = [context, count, type = *type](const MPI_Status& st) {
      int received = 0;
      MPI_Get_count(&st, type, &received);
      if (received != count) {
        return absl::InvalidArgumentError(absl::StrCat(context, ": received ", received,
                                                       " elements, expected ", count));
      }
      return absl::OkStatus();
    };
    return Issue(context, options, {tensor}, std::move(finish), [&](MPI_Request* r) {
      return MPI_Irecv(tensor.data_ptr(), count, *type, src, tag, state_->comm, r);
    });
  }

  std::unique_ptr<Work> Barrier(const CollectiveOptions& options) override {
    const std::string context = Context("barrier");
    if (absl::Status s = precheck_.Barrier(); !s.ok()) return DoneWork(s);
    return Issue(context, options, {}, nullptr,
                 [&](MPI_Request* r) { return MPI_Ibarrier(state_->comm, r); });
  }

 private:
  std::string Context(absl::string_view op) const { return OpContext(op, "mpi", size_, rank_); }

  // Starts one nonblocking MPI call under the process's MPI mutex.
  std::unique_ptr<Work> Issue(const std::string& context, const CollectiveOptions& options,
                              std::vector<at::Tensor> tensors,
                              std::function<absl::Status(const MPI_Status&)> finish,
                              const std::function<int(MPI_Request*)>& start) {
    MPI_Request request = MPI_REQUEST_NULL;
    int rc;
    {
      std::lock_guard<std::mutex> lock(MpiMutex());
      rc = start(&request);
    }
    if (rc != MPI_SUCCESS) {
      absl::Status s = MpiErrorStatus(rc, context);
      state_->health.RecordFailure(s);
      return DoneWork(std::move(s));
    }
    return std::make_unique<MpiWork>(state_, request, std::move(tensors), context,
                                     EffectiveTimeout(options, timeout_), std::move(finish));
  }

  MpiRuntime* runtime_;
  std::shared_ptr<MpiGroupState> state_;
  const int rank_;
  const int size_;
  const absl::Duration timeout_;
  const OpPrecheck precheck_;  // reads state_->health
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateMpiBackend(const BackendOptions& options) {
  absl::StatusOr<MpiRuntime*> runtime = MpiRuntime::Get();
  if (!runtime.ok()) return runtime.status();
  int rank = -1;
  int size = -1;
  MPI_Comm comm = MPI_COMM_NULL;
  {
    std::lock_guard<std::mutex> lock(MpiMutex());
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank != options.rank || size != options.world_size) {
      return absl::FailedPreconditionError(absl::StrCat(
          "mpi backend: options say rank ", options.rank, " of ", options.world_size,
          " but MPI_COMM_WORLD has rank ", rank, " of ", size,
          " (start the ranks with mpirun -np ", options.world_size, ")"));
    }
    // Collective over MPI_COMM_WORLD: every rank creates its backends in the same order.
    const int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    if (rc != MPI_SUCCESS) {
      return MpiErrorStatus(rc, absl::StrCat("mpi backend: MPI_Comm_dup on rank ", rank));
    }
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  }
  auto state = std::make_shared<MpiGroupState>(
      comm, absl::StrCat("mpi group of ", size, " (rank ", rank, ")"));
  return std::unique_ptr<Backend>(
      std::make_unique<MpiBackend>(*runtime, std::move(state), rank, size, options.timeout));
}

}  // namespace shoal::comm::internal
