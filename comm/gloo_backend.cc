#include "comm/gloo_backend.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <csignal>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/backend_internal.h"
#include "comm/c10d_status.h"

namespace shoal::comm::internal {
namespace {

// State that Works share with their backend and that outlives both.
struct GlooGroupState {
  explicit GlooGroupState(std::string group) : health(std::move(group)) {}
  GroupHealth health;
  // c10d works that failed while still running (a timed-out wait). They own the tensors and
  // Gloo buffers a background transfer may still touch, so they are kept until the backend is
  // destroyed (after its process group, whose destructor joins Gloo's threads).
  std::mutex mu;
  std::vector<c10::intrusive_ptr<c10d::Work>> abandoned;  // guarded by mu
};

c10d::ReduceOp ToC10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return c10d::ReduceOp::SUM;  // kAvg: Wait() divides
  }
  return c10d::ReduceOp::SUM;
}

// The dtypes Gloo handles. c10d checks the dtype only on its worker thread, where a failure
// would look like a broken group, so the precheck refuses the others up front.
absl::Status CheckGlooDtype(const at::Tensor& tensor, absl::string_view name,
                            absl::string_view context) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kChar:
    case at::kByte:
    case at::kInt:
    case at::kLong:
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(context, ": ", name, " has dtype ", c10::toString(tensor.scalar_type()),
                       "; gloo takes float32/64, float16, int8/32/64 and uint8"));
  }
}

// CPU tensors of Gloo's dtypes; tags are ints, so any non-negative one.
OpPrecheck::Rules GlooRules() {
  OpPrecheck::Rules rules;
  rules.device = TensorDevice::kCpu;
  rules.max_tag = std::numeric_limits<int>::max();
  rules.check_dtype = &CheckGlooDtype;
  return rules;
}

// One c10d operation in flight; `finish` runs after it succeeded (kAvg's division, the
// reduce-scatter's local reduction).
class GlooWork final : public Work {
 public:
  GlooWork(c10::intrusive_ptr<c10d::Work> work, std::string context,
           absl::Duration timeout, std::shared_ptr<GlooGroupState> state,
           std::function<void()> finish)
      : work_(std::move(work)),
        context_(std::move(context)),
        timeout_(timeout),
        state_(std::move(state)),
        finish_(std::move(finish)) {}

  ~GlooWork() override {
    if (work_ && !work_->isCompleted()) {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->abandoned.push_back(std::move(work_));
    }
  }

  absl::Status Wait() override {
    if (!work_) return absl::FailedPreconditionError(absl::StrCat(context_, ": waited twice"));
    absl::Status status;
    try {
      work_->wait(absl::ToChronoMilliseconds(timeout_));
    } catch (...) {
      const std::string text = ExceptionText(std::current_exception());
      if (absl::StrContains(text, "Operation timed out")) {
        // c10d's own wait deadline, whose message says only that.
        status = absl::DeadlineExceededError(
            absl::StrCat(context_, ": not done within ", absl::FormatDuration(timeout_),
                         " (a peer is missing or slow)"));
      } else {
        status = absl::Status(ClassifyFailureText(text, absl::StatusCode::kInternal),
                              absl::StrCat(context_, ": ", text));
      }
    }
    if (status.ok() && finish_) {
      try {
        finish_();
      } catch (...) {
        status = StatusFromException(std::current_exception(), context_);
      }
    }
    state_->health.RecordFailure(status);
    if (!status.ok() && !work_->isCompleted()) {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->abandoned.push_back(std::move(work_));
    }
    work_.reset();
    return status;
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  const std::string context_;
  const absl::Duration timeout_;
  std::shared_ptr<GlooGroupState> state_;
  std::function<void()> finish_;
};

class GlooBackend final : public Backend {
 public:
  GlooBackend(const BackendOptions& options, std::shared_ptr<GlooGroupState> state)
      : rank_(options.rank),
        size_(options.world_size),
        timeout_(options.timeout),
        store_(options.store),
        state_(std::move(state)),
        precheck_("gloo", size_, rank_, GlooRules(), &state_->health) {}

  ~GlooBackend() override {
    pg_.reset();  // joins Gloo's worker threads; abandoned works finish or fail by the timeout
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->abandoned.clear();
  }

  // Rendezvous through the store, then a full mesh of TCP pairs.
  absl::Status Connect(const BackendOptions& options) {
    const std::string context =
        absl::StrCat("gloo rendezvous of rank ", rank_, " in a group of ", size_);
    auto pg_options =
        c10d::ProcessGroupGloo::Options::create(absl::ToChronoMilliseconds(options.timeout));
    pg_options->threads = 2;
    try {
      if (!options.gloo_hostname.empty()) {
        pg_options->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForHostname(options.gloo_hostname));
      } else if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
                 ifname != nullptr && *ifname != '\0') {
        pg_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        pg_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
    } catch (...) {
      return StatusFromException(std::current_exception(),
                                 absl::StrCat(context, ": cannot make a Gloo device for '",
                                              options.gloo_hostname, "'"),
                                 absl::StatusCode::kInvalidArgument);
    }
    try {
      auto store = c10::intrusive_ptr<c10d::Store>::reclaim_copy(store_->c10d_store());
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(std::move(store), rank_, size_,
                                                        pg_options);
    } catch (...) {
      // Whatever went wrong, the group could not form: a missing rank shows up as a timeout,
      // anything else as an unreachable peer.
      absl::Status s = StatusFromException(std::current_exception(), context,
                                           absl::StatusCode::kUnavailable);
      const std::string missing = MissingRanks();
      if (!missing.empty()) {
        s = absl::Status(s.code(), absl::StrCat(s.message(), " (never arrived: rank",
                                                missing.find(',') == std::string::npos ? " " : "s ",
                                                missing, ")"));
      }
      if (!absl::IsDeadlineExceeded(s)) s = absl::UnavailableError(s.message());
      return s;
    }
    return absl::OkStatus();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "gloo"; }

  // After a failed rendezvous: the ranks whose address is not in the store, "3" or "2, 3".
  // c10d 1.13 has Gloo publish rank r's address of device 0 under "0/<r>"; if this rank's own
  // key is not there, the layout is not the one assumed and nothing is claimed.
  std::string MissingRanks() const {
    auto present = [&](int r) {
      return store_->Wait({absl::StrCat("0/", r)}, absl::ZeroDuration()).ok();
    };
    if (!present(rank_)) return "";
    std::vector<std::string> missing;
    for (int r = 0; r < size_; ++r) {
      if (!present(r)) missing.push_back(std::to_string(r));
    }
    return absl::StrJoin(missing, ", ");
  }

  std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                  const CollectiveOptions& options) override {
    const std::string context =
        absl::StrCat(Context("allreduce"), " [", ReduceOpName(op), ", ", tensor.numel(), " x ",
                     c10::toString(tensor.scalar_type()), "]");
    if (absl::Status s = precheck_.AllReduce(tensor, context); !s.ok()) return DoneWork(s);
    const absl::Duration timeout = EffectiveTimeout(options, timeout_);
    std::function<void()> finish;
    if (op == ReduceOp::kAvg) {
      finish = [tensor, n = size_]() mutable { DivideInPlace(tensor, n); };
    }
    return Issue(context, timeout, std::move(finish), [&] {
      std::vector<at::Tensor> tensors{tensor};
      c10d::AllreduceOptions o;
      o.reduceOp = ToC10d(op);
      o.timeout = absl::ToChronoMilliseconds(timeout);
      return pg_->allreduce(tensors, o);
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
    const absl::Duration timeout = EffectiveTimeout(options, timeout_);
    // received: (N, M): row i is rank i's copy of this rank's shard.
    const int64_t shard = output.numel();
    at::Tensor received = at::empty({size_ * shard}, input.options());
    std::function<void()> finish = [output, received, op, n = size_, shard]() mutable {
      at::Tensor out = output.view({shard});
      at::Tensor rows = received.view({n, shard});
      // Rows in rank order, so every rank reduces in the same order.
      out.copy_(rows[0]);
      for (int i = 1; i < n; ++i) {
        if (op == ReduceOp::kMax) {
          at::maximum_out(out, out, rows[i]);
        } else if (op == ReduceOp::kMin) {
          at::minimum_out(out, out, rows[i]);
        } else {
          out.add_(rows[i]);
        }
      }
      if (op == ReduceOp::kAvg) DivideInPlace(out, n);
    };
    return Issue(context, timeout, std::move(finish), [&] {
      at::Tensor in = input.view({-1});
      std::vector<int64_t> equal_splits;  // empty: N equal splits
      c10d::AllToAllOptions o;
      o.timeout = absl::ToChronoMilliseconds(timeout);
      return pg_->alltoall_base(received, in, equal_splits, equal_splits, o);
    });
  }

  std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                  const CollectiveOptions& options) override {
    const std::string context =
        absl::StrCat(Context("allgather"), " [", input.numel(), " x ",
                     c10::toString(input.scalar_type()), " per rank]");
    if (absl::Status s = precheck_.AllGather(output, input, context); !s.ok()) return DoneWork(s);
    const absl::Duration timeout = EffectiveTimeout(options, timeout_);
    return Issue(context, timeout, nullptr, [&] {
      // Gloo wants one output tensor per rank shaped like the input: flat views of `output`.
      std::vector<std::vector<at::Tensor>> outputs(1);
      outputs[0] = output.view({-1}).chunk(size_);
      std::vector<at::Tensor> inputs{input.view({-1})};
      c10d::AllgatherOptions o;
      o.timeout = absl::ToChronoMilliseconds(timeout);
      return pg_->allgather(outputs, inputs, o);
    });
  }

  std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                  const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("broadcast"), " [root ", root, ", ",
                                             tensor.numel(), " x ",
                                             c10::toString(tensor.scalar_type()), "]");
    if (absl::Status s = precheck_.Broadcast(tensor, root, context); !s.ok()) return DoneWork(s);
    const absl::Duration timeout = EffectiveTimeout(options, timeout_);
    return Issue(context, timeout, nullptr, [&] {
      std::vector<at::Tensor> tensors{tensor};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      o.timeout = absl::ToChronoMilliseconds(timeout);
      return pg_->broadcast(tensors, o);
    });
  }

  std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("send"), " [to rank ", dst, ", tag ", tag,
                                             ", ", tensor.nbytes(), " bytes]");
    if (absl::Status s = precheck_.Send(tensor, dst, tag, context); !s.ok()) return DoneWork(s);
    return Issue(context, EffectiveTimeout(options, timeout_), nullptr, [&] {
      std::vector<at::Tensor> tensors{tensor};
      return pg_->send(tensors, dst, tag);
    });
  }

  std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                             const CollectiveOptions& options) override {
    const std::string context = absl::StrCat(Context("recv"), " [from rank ", src, ", tag ",
                                             tag, ", ", tensor.nbytes(), " bytes]");
    if (absl::Status s = precheck_.Recv(tensor, src, tag, context); !s.ok()) return DoneWork(s);
    return Issue(context, EffectiveTimeout(options, timeout_), nullptr, [&] {
      std::vector<at::Tensor> tensors{tensor};
      return pg_->recv(tensors, src, tag);
    });
  }

  std::unique_ptr<Work> Barrier(const CollectiveOptions& options) override {
    const std::string context = Context("barrier");
    if (absl::Status s = precheck_.Barrier(); !s.ok()) return DoneWork(s);
    const absl::Duration timeout = EffectiveTimeout(options, timeout_);
    return Issue(context, timeout, nullptr, [&] {
      c10d::BarrierOptions o;
      o.timeout = absl::ToChronoMilliseconds(timeout);
      return pg_->barrier(o);
    });
  }

 private:
  std::string Context(absl::string_view op) const { return OpContext(op, "gloo", size_, rank_); }

  // Starts a c10d operation; c10d throws for arguments it rejects (an unsupported dtype).
  std::unique_ptr<Work> Issue(
      const std::string& context, absl::Duration timeout, std::function<void()> finish,
      const std::function<c10::intrusive_ptr<c10d::Work>()>& start) {
    try {
      return std::make_unique<GlooWork>(start(), context, timeout, state_, std::move(finish));
    } catch (...) {
      absl::Status s = StatusFromException(std::current_exception(), context,
                                           absl::StatusCode::kInvalidArgument);
      state_->health.RecordFailure(s);  // a dead peer can show up already here
      return DoneWork(std::move(s));
    }
  }

  const int rank_;
  const int size_;
  const absl::Duration timeout_;
  std::shared_ptr<Store> store_;  // the process group uses it; keep the TCP server alive
  std::shared_ptr<GlooGroupState> state_;
  const OpPrecheck precheck_;  // reads state_->health
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
};

// Gloo's TCP transport writes to sockets without MSG_NOSIGNAL, so a write to a peer that has
// just died raises SIGPIPE, whose default action kills this process before the failed write can
// become a status naming the peer. Ignore it (once, and only where nobody installed a handler):
// the write then fails with EPIPE and the collective reports kUnavailable.
void IgnoreSigpipeUnlessHandled() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      struct sigaction ignore {};
      ignore.sa_handler = SIG_IGN;
      sigemptyset(&ignore.sa_mask);
      ::sigaction(SIGPIPE, &ignore, nullptr);
    }
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateGlooBackend(const BackendOptions& options) {
  if (options.store == nullptr) {
    return absl::InvalidArgumentError("gloo backend: BackendOptions::store is required");
  }
  IgnoreSigpipeUnlessHandled();
  auto state = std::make_shared<GlooGroupState>(
      absl::StrCat("gloo group of ", options.world_size, " (rank ", options.rank, ")"));
  auto backend = std::make_unique<GlooBackend>(options, std::move(state));
  if (absl::Status s = backend->Connect(options); !s.ok()) return s;
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace shoal::comm::internal
