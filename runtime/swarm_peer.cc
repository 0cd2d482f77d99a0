#include "runtime/swarm_peer.h"

#include "memory/checksum.h"
#include "parallel/swarm_router.h"
#include "runtime/profiler.h"
#include "runtime/swarm_sync.h"

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/grpc_util.h"
#include "comm/tensor_stream.h"
#include "common/net_util.h"
#include "common/status.h"
#include "proto/coordinator.pb.h"
#include "proto/swarm.grpc.pb.h"

namespace shoal::runtime {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A call is for the step whose state the peer holds (`held`: its optimizer steps so far).
// Computing another step's micro-batch with this state would be wrong: a joiner still catching
// up, or a trainer behind the swarm.
absl::Status CheckStep(const v1::CallInfo& call, int64_t held) {
  if (call.step() == held) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "a call for step ", call.step(), " to a peer holding the state after ", held, " step(s)"));
}

// Checks a call's fields against the stage; its step against `held`, the stage's step as last
// noted (the compute checks it again under the lock, CheckStep).
absl::Status CheckCall(const v1::CallInfo& call, const SwarmStage& stage, int64_t held) {
  if (call.protocol_version() != v1::PROTOCOL_VERSION_CURRENT) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol version ", call.protocol_version(), ", this peer speaks ",
        static_cast<int>(v1::PROTOCOL_VERSION_CURRENT)));
  }
  if (call.stage() != stage.stage()) {
    return absl::FailedPreconditionError(
        absl::StrCat("a call for stage ", call.stage(), " to a peer of stage ", stage.stage()));
  }
  SHOAL_RETURN_IF_ERROR(CheckStep(call, held));
  if (call.step() < 0 || call.micro_batch() < 0 || call.trainer_id().empty() ||
      call.trainer_id().size() > 200) {
    return absl::InvalidArgumentError(absl::StrCat(
        "call: step ", call.step(), ", micro-batch ", call.micro_batch(), ", trainer id of ",
        call.trainer_id().size(), " bytes (want step, micro-batch >= 0 and 1..200 bytes)"));
  }
  return absl::OkStatus();
}

// The order in which a peer's calls compute: one at a time, the lowest step first, then forwards
// before backwards, then in the order they asked. A forward first lets its micro-batch go on
// through the later stages while this peer works through the backwards queued here, so a step's
// last micro-batches leave this stage sooner and its tail, this peer waiting for their backwards,
// is shorter (`shoal bench swarm`, 120 s without kills: 1.17 s a step against 1.24 s in arrival
// order alone; one run each, and runs of the same code have differed by up to 10 %). A
// std::mutex, which this replaces, hands its lock to whichever waiter the scheduler wakes, so a
// call could wait behind any number of later ones.
class ComputeGate {
 public:
  enum class Kind { kForward = 0, kBackward = 1 };  // a last stage's ForwardBackward: kBackward

  // Holds the gate from construction (when it is this call's turn) to destruction.
  class Turn {
   public:
    Turn(ComputeGate* gate, int64_t step, Kind kind) : gate_(gate) { gate_->Acquire(step, kind); }
    ~Turn() { gate_->Release(); }
    Turn(const Turn&) = delete;
    Turn& operator=(const Turn&) = delete;

   private:
    ComputeGate* gate_;
  };

 private:
  using Key = std::tuple<int64_t, int, uint64_t>;  // (step, kind, arrival)
  void Acquire(int64_t step, Kind kind) {
    std::unique_lock<std::mutex> lock(mu_);
    const Key key{step, static_cast<int>(kind), next_++};
    waiting_.insert(key);
    cv_.wait(lock, [&] { return !busy_ && *waiting_.begin() == key; });
    waiting_.erase(waiting_.begin());
    busy_ = true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
    }
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::set<Key> waiting_;
  uint64_t next_ = 0;
  bool busy_ = false;
};

// Reads the rest of a request stream (pieces only) into `in`.
template <typename Request, typename Stream>
absl::Status ReadRest(Stream* stream, comm::TensorAssembler* in) {
  Request r;
  while (stream->Read(&r)) {
    if (!r.has_piece()) return absl::InvalidArgumentError("a second header in the call");
    SHOAL_RETURN_IF_ERROR(in->Add(r.piece()));
  }
  return in->CheckComplete();
}

// Writes the reply: its header, then `tensor`'s pieces (none when undefined).
template <typename Stream, typename Reply>
void WriteReply(Stream* stream, Reply header, const comm::WireTensor* tensor) {
  stream->Write(header);
  if (tensor == nullptr) return;
  std::vector<v1::TensorPiece> pieces;
  comm::AppendPieces(0, tensor->bytes, &pieces);
  for (v1::TensorPiece& p : pieces) {
    Reply r;
    *r.mutable_piece() = std::move(p);
    if (!stream->Write(r)) return;
  }
}

v1::TensorCodec OutputCodec(v1::TensorCodec asked) {
  return asked == v1::TENSOR_CODEC_UNSPECIFIED ? v1::TENSOR_CODEC_FP32 : asked;
}

}  // namespace

class SwarmPeerService final : public v1::SwarmPeer::Service {
 public:
  SwarmPeerService(SwarmStage* stage, std::shared_ptr<comm::ExchangeMailbox> mailbox,
                   SwarmPeerOptions options)
      : stage_(stage), mailbox_(std::move(mailbox)), options_(std::move(options)) {
    NoteStep();
  }

  std::mutex& compute_mu() { return mu_; }

  // Work done (SwarmPeerLoad::samples: forwards and backwards weighted) and seconds of compute.
  void CountWork(double samples, double seconds) {
    std::lock_guard<std::mutex> lock(load_mu_);
    load_.samples += samples;
    load_.compute_s += seconds;
  }
  // The deliberate slow-down after a compute timed by `work` (SwarmPeerOptions::slowdown).
  void SlowDown(const WorkClock& work) const {
    if (!options_.slowdown) return;
    Throttle(options_.slowdown()).After(work);
  }
  SwarmPeerLoad TakeLoad() {
    std::lock_guard<std::mutex> lock(load_mu_);
    SwarmPeerLoad out = load_;
    load_ = SwarmPeerLoad{};
    return out;
  }
  // After the step boundary ran under compute_mu() (held): notes the stage's step, then (after
  // the lock) StepChanged wakes the calls waiting for it.
  void NoteStep() {
    SwarmStage* stage = stage_.load();
    held_step_.store(stage == nullptr ? -2 : stage->optimizer_steps());
  }
  void StepChanged() { step_cv_.notify_all(); }

  // What a call's reply says of its time at this peer.
  struct CallTimes {
    double queued_s = 0;   // waiting for its turn at the gate and for the compute lock
    double compute_s = 0;  // from then until it let go (the slow-down and the commit included)
  };
  // Runs `compute` for `call` of `kind` in its turn at the gate, under the compute lock, if the
  // stage still holds the call's step; then the deliberate slow-down, which stands for a slower
  // device and so scales the compute alone; then `settle` (the ledger's commit), still under the
  // lock. Returns the call's times.
  template <typename ComputeFn, typename SettleFn>
  absl::StatusOr<CallTimes> Compute(const v1::CallInfo& call, const SwarmStage& stage,
                                    ComputeGate::Kind kind, ComputeFn&& compute,
                                    SettleFn&& settle) {
    const auto asked = std::chrono::steady_clock::now();
    ComputeGate::Turn turn(&gate_, call.step(), kind);
    std::lock_guard<std::mutex> lock(mu_);
    // The step cannot change while this call holds the lock (WithStage takes it).
    SHOAL_RETURN_IF_ERROR(CheckStep(call, stage.optimizer_steps()));
    const auto t0 = std::chrono::steady_clock::now();
    const WorkClock work = WorkClock::Start();
    compute();
    SlowDown(work);
    settle();
    return CallTimes{std::chrono::duration<double>(t0 - asked).count(), SecondsSince(t0)};
  }
  template <typename ReplyHeader>
  static void SetTimes(const CallTimes& times, ReplyHeader* header) {
    header->set_compute_s(times.compute_s);
    header->set_queued_s(times.queued_s);
  }

  // A call for the step after the one this stage holds usually arrives just before the peer
  // applies the decision the trainer has already seen: wait a moment for it rather than refuse.
  void WaitForStep(const SwarmStage& stage, int64_t step) {
    // Most calls are for the step the stage holds: they go on without taking the compute lock
    // (a second wait for it, behind the calls computing). held_step_ may lag the stage; the
    // check under the lock is the one that counts.
    if (held_step_.load() + 1 != step) return;
    std::unique_lock<std::mutex> lock(mu_);
    if (stage.optimizer_steps() + 1 != step) return;
    step_cv_.wait_for(lock, std::chrono::seconds(5),
                      [&] { return stage.optimizer_steps() >= step; });
  }
  SwarmStage* stage() const { return stage_.load(); }

  void Attach(SwarmStage* stage, int first_layer, int end_layer) {
    std::lock_guard<std::mutex> lock(mu_);
    options_.first_layer = first_layer;
    options_.end_layer = end_layer;
    stage_.store(stage);
    NoteStep();
  }

  grpc::Status Forward(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<v1::ForwardReply, v1::ForwardRequest>* stream)
      override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    SwarmStage* const stage = stage_.load();
    if (stage == nullptr) return NoStage();
    v1::ForwardRequest first;
    if (!stream->Read(&first) || !first.has_header()) {
      return Refuse("Forward: the call does not start with its header");
    }
    const v1::ForwardHeader& h = first.header();
    WaitForStep(*stage, h.call().step());
    if (absl::Status s = CheckCall(h.call(), *stage, held_step_.load()); !s.ok()) {
      return comm::ToGrpc(s);
    }
    absl::StatusOr<comm::TensorAssembler> in =
        comm::TensorAssembler::Create({h.input()}, {"input"}, options_.max_call_bytes);
    if (!in.ok()) return comm::ToGrpc(in.status());
    if (absl::Status s = ReadRest<v1::ForwardRequest>(stream, &*in); !s.ok()) {
      return comm::ToGrpc(s);
    }
    absl::StatusOr<at::Tensor> input = in->Take(0);
    if (!input.ok()) return comm::ToGrpc(input.status());
    absl::StatusOr<at::Tensor> out;
    const absl::StatusOr<CallTimes> times = Compute(
        h.call(), *stage, ComputeGate::Kind::kForward,
        [&] { out = stage->Forward({h.call().step(), h.call().micro_batch()}, *input); },
        [] {});
    if (!times.ok()) return comm::ToGrpc(times.status());
    if (!out.ok()) return comm::ToGrpc(out.status());
    absl::StatusOr<comm::WireTensor> wire = comm::EncodeForWire(*out, OutputCodec(h.output_codec()));
    if (!wire.ok()) return comm::ToGrpc(wire.status());
    v1::ForwardReply reply;
    *reply.mutable_header()->mutable_output() = wire->meta;
    SetTimes(*times, reply.mutable_header());
    CountWork(static_cast<double>(input->size(0)) * parallel::kSwarmForwardWork /
                  parallel::kSwarmForwardBackwardWork,
              times->compute_s);
    WriteReply(stream, reply, &*wire);
    return grpc::Status::OK;
  }

  grpc::Status Backward(grpc::ServerContext* ctx,
                        grpc::ServerReaderWriter<v1::BackwardReply, v1::BackwardRequest>* stream)
      override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    SwarmStage* const stage = stage_.load();
    if (stage == nullptr) return NoStage();
    v1::BackwardRequest first;
    if (!stream->Read(&first) || !first.has_header()) {
      return Refuse("Backward: the call does not start with its header");
    }
    const v1::BackwardHeader& h = first.header();
    WaitForStep(*stage, h.call().step());
    if (absl::Status s = CheckCall(h.call(), *stage, held_step_.load()); !s.ok()) {
      return comm::ToGrpc(s);
    }
    absl::StatusOr<comm::TensorAssembler> in = comm::TensorAssembler::Create(
        {h.input(), h.grad_output()}, {"input", "grad_output"}, options_.max_call_bytes);
    if (!in.ok()) return comm::ToGrpc(in.status());
    if (absl::Status s = ReadRest<v1::BackwardRequest>(stream, &*in); !s.ok()) {
      return comm::ToGrpc(s);
    }
    absl::StatusOr<at::Tensor> input = in->Take(0);
    if (!input.ok()) return comm::ToGrpc(input.status());
    absl::StatusOr<at::Tensor> grad_output = in->Take(1);
    if (!grad_output.ok()) return comm::ToGrpc(grad_output.status());
    const MicroBatchKey key{h.call().step(), h.call().micro_batch()};
    absl::StatusOr<at::Tensor> grad_input;
    absl::Status committed;
    int64_t accumulated = 0;
    const absl::StatusOr<CallTimes> times = Compute(
        h.call(), *stage, ComputeGate::Kind::kBackward,
        [&] {
          // The step's 1 / M reaches this stage through grad_output (the last stage scaled the
          // loss).
          grad_input = stage->Backward(key, *input, *grad_output, 1.0f, h.accumulate());
        },
        [&] {
          if (grad_input.ok() && h.accumulate()) {
            committed = Commit(stage, h.call(), key, std::nan(""));
          }
          accumulated = stage->kept_micro_batches();
        });
    if (!times.ok()) return comm::ToGrpc(times.status());
    if (!grad_input.ok()) return comm::ToGrpc(grad_input.status());
    if (!committed.ok()) return comm::ToGrpc(committed);
    v1::BackwardReply reply;
    v1::BackwardReplyHeader* rh = reply.mutable_header();
    rh->set_accumulated_micro_batches(accumulated);
    SetTimes(*times, rh);
    CountWork(static_cast<double>(input->size(0)) * parallel::kSwarmBackwardWork /
                  parallel::kSwarmForwardBackwardWork,
              times->compute_s);
    if (!grad_input->defined()) {
      WriteReply(stream, reply, nullptr);
      return grpc::Status::OK;
    }
    absl::StatusOr<comm::WireTensor> wire =
        comm::EncodeForWire(*grad_input, OutputCodec(h.grad_input_codec()));
    if (!wire.ok()) return comm::ToGrpc(wire.status());
    *rh->mutable_grad_input() = wire->meta;
    WriteReply(stream, reply, &*wire);
    return grpc::Status::OK;
  }

  grpc::Status ForwardBackward(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::ForwardBackwardReply, v1::ForwardBackwardRequest>* stream)
      override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    SwarmStage* const stage = stage_.load();
    if (stage == nullptr) return NoStage();
    v1::ForwardBackwardRequest first;
    if (!stream->Read(&first) || !first.has_header()) {
      return Refuse("ForwardBackward: the call does not start with its header");
    }
    const v1::ForwardBackwardHeader& h = first.header();
    WaitForStep(*stage, h.call().step());
    if (absl::Status s = CheckCall(h.call(), *stage, held_step_.load()); !s.ok()) {
      return comm::ToGrpc(s);
    }
    if (!(h.loss_scale() > 0) || !(h.loss_scale() <= 1)) {
      return Refuse(absl::StrCat("ForwardBackward: loss_scale ", h.loss_scale(),
                                 " is not in (0, 1]"));
    }
    absl::StatusOr<comm::TensorAssembler> in = comm::TensorAssembler::Create(
        {h.input(), h.targets()}, {"input", "targets"}, options_.max_call_bytes);
    if (!in.ok()) return comm::ToGrpc(in.status());
    if (absl::Status s = ReadRest<v1::ForwardBackwardRequest>(stream, &*in);
        !s.ok()) {
      return comm::ToGrpc(s);
    }
    absl::StatusOr<at::Tensor> input = in->Take(0);
    if (!input.ok()) return comm::ToGrpc(input.status());
    absl::StatusOr<at::Tensor> targets = in->Take(1);
    if (!targets.ok()) return comm::ToGrpc(targets.status());
    const MicroBatchKey key{h.call().step(), h.call().micro_batch()};
    absl::StatusOr<SwarmStage::LossAndGrad> out;
    absl::Status committed;
    int64_t accumulated = 0;
    const absl::StatusOr<CallTimes> times = Compute(
        h.call(), *stage, ComputeGate::Kind::kBackward,
        [&] {
          out = stage->ForwardBackward(key, *input, *targets, static_cast<float>(h.loss_scale()),
                                        h.accumulate());
        },
        [&] {
          if (out.ok() && h.accumulate()) committed = Commit(stage, h.call(), key, out->loss);
          accumulated = stage->kept_micro_batches();
        });
    if (!times.ok()) return comm::ToGrpc(times.status());
    if (!out.ok()) return comm::ToGrpc(out.status());
    if (!committed.ok()) return comm::ToGrpc(committed);
    v1::ForwardBackwardReply reply;
    v1::ForwardBackwardReplyHeader* rh = reply.mutable_header();
    rh->set_loss(out->loss);
    rh->set_tokens(input->size(0) * input->size(1));
    rh->set_accumulated_micro_batches(accumulated);
    SetTimes(*times, rh);
    CountWork(static_cast<double>(input->size(0)), times->compute_s);
    if (!out->grad_input.defined()) {
      WriteReply(stream, reply, nullptr);
      return grpc::Status::OK;
    }
    absl::StatusOr<comm::WireTensor> wire =
        comm::EncodeForWire(out->grad_input, OutputCodec(h.grad_input_codec()));
    if (!wire.ok()) return comm::ToGrpc(wire.status());
    *rh->mutable_grad_input() = wire->meta;
    WriteReply(stream, reply, &*wire);
    return grpc::Status::OK;
  }

  grpc::Status GetStageState(grpc::ServerContext* ctx, const v1::GetStageStateRequest* request,
                             grpc::ServerWriter<v1::StageStatePart>* writer) override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    SwarmStage* const stage = stage_.load();
    if (stage == nullptr) return NoStage();
    if (request->stage() != stage->stage()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("state of stage ", request->stage(), " asked of a peer of stage ",
                                       stage->stage()));
    }
    StageSnapshot snap;
    {
      // Between two calls: the state is a step boundary unless a step is under way, which a
      // donor does not do while it serves a joiner at the newest step (the coordinator asks it
      // between rounds).
      std::lock_guard<std::mutex> lock(mu_);
      if (request->step() != -1 && request->step() != stage->optimizer_steps()) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("this peer holds the state after step ",
                                         stage->optimizer_steps(), ", not ", request->step()));
      }
      snap = SnapshotOf(*stage, options_.first_layer, options_.end_layer);
    }
    const int64_t chunk = std::clamp<int64_t>(options_.state_chunk_bytes, 1, comm::kMaxFrameBytes);
    snap.manifest.set_chunk_bytes(static_cast<int32_t>(chunk));
    const int64_t total = snap.manifest.total_bytes();
    const int64_t from = request->offset();
    if (from < 0 || from % chunk != 0 || (from > 0 && from >= total)) {
      return grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                          absl::StrCat("offset ", from, ": not a multiple of ", chunk,
                                       " below the snapshot's ", total, " bytes"));
    }
    v1::StageStatePart part;
    *part.mutable_manifest() = snap.manifest;
    if (!writer->Write(part)) return grpc::Status::OK;
    for (int64_t at = from; at < total; at += chunk) {
      v1::StageStatePart c;
      const size_t n = static_cast<size_t>(std::min(chunk, total - at));
      c.mutable_chunk()->set_offset(at);
      c.mutable_chunk()->set_data(snap.bytes.substr(static_cast<size_t>(at), n));
      c.mutable_chunk()->set_crc32c(memory::Crc32c(snap.bytes.data() + at, n));
      if (!writer->Write(c)) break;
    }
    return grpc::Status::OK;
  }

  grpc::Status GetUpdates(grpc::ServerContext* ctx, const v1::GetUpdatesRequest* request,
                          grpc::ServerWriter<v1::StepUpdatePart>* writer) override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    SwarmStage* const stage = stage_.load();
    if (stage == nullptr) return NoStage();
    if (request->stage() != stage->stage()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("updates of stage ", request->stage(),
                                       " asked of a peer of stage ", stage->stage()));
    }
    std::vector<EncodedUpdate> updates;
    {
      std::lock_guard<std::mutex> lock(mu_);
      absl::StatusOr<std::vector<StepUpdate>> got =
          stage->UpdatesFrom(request->from_step(), request->to_step());
      if (!got.ok()) return comm::ToGrpc(got.status());
      for (const StepUpdate& u : *got) updates.push_back(EncodeUpdate(u));
    }
    const int64_t chunk = std::clamp<int64_t>(options_.state_chunk_bytes, 1, comm::kMaxFrameBytes);
    for (const EncodedUpdate& u : updates) {
      v1::StepUpdatePart head;
      *head.mutable_header() = u.header;
      if (!writer->Write(head)) return grpc::Status::OK;
      const int64_t total = static_cast<int64_t>(u.bytes.size());
      for (int64_t at = 0; at < total; at += chunk) {
        v1::StepUpdatePart c;
        const size_t n = static_cast<size_t>(std::min(chunk, total - at));
        c.mutable_chunk()->set_offset(at);
        c.mutable_chunk()->set_data(u.bytes.substr(static_cast<size_t>(at), n));
        c.mutable_chunk()->set_crc32c(memory::Crc32c(u.bytes.data() + at, n));
        if (!writer->Write(c)) return grpc::Status::OK;
      }
    }
    return grpc::Status::OK;
  }

  grpc::Status Exchange(grpc::ServerContext* ctx, const v1::ExchangeFrame* frame,
                        v1::ExchangeAck* ack) override {
    if (grpc::Status auth = comm::CheckBearer(*ctx, options_.token); !auth.ok()) return auth;
    return comm::ToGrpc(mailbox_->Deliver(*frame, ack));
  }

 private:
  static grpc::Status NoStage() {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this peer is still joining: it serves no stage yet");
  }

  static grpc::Status Refuse(const std::string& why) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, why);
  }

  // The ledger's decision on the pending micro-batch; the stage keeps or drops it.
  absl::Status Commit(SwarmStage* stage, const v1::CallInfo& call, const MicroBatchKey& key,
                      double loss) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status recorded = options_.commit ? options_.commit(call, loss) : absl::OkStatus();
    {
      std::lock_guard<std::mutex> lock(load_mu_);
      load_.commit_s += SecondsSince(t0);
    }
    const bool keep = recorded.ok();
    // The ledger took it in its epoch: work kept in an earlier one belongs to a step the swarm
    // rolled back (this peer may not have acted on the rollback yet), and goes first.
    if (keep) (void)stage->EnterEpoch(call.rollbacks());
    SHOAL_RETURN_IF_ERROR(stage->Settle(key, keep));
    if (absl::IsAlreadyExists(recorded)) return absl::OkStatus();
    return recorded;
  }

  std::atomic<SwarmStage*> stage_;
  ComputeGate gate_;  // before mu_ for a call: its turn, then the lock
  std::atomic<int64_t> held_step_{-2};  // the stage's optimizer steps, as of the last NoteStep
  std::condition_variable step_cv_;
  std::mutex load_mu_;
  SwarmPeerLoad load_;
  std::shared_ptr<comm::ExchangeMailbox> mailbox_;
  SwarmPeerOptions options_;
  std::mutex mu_;
};

struct SwarmPeerServer::Impl {
  std::unique_ptr<SwarmPeerService> service;
  std::unique_ptr<grpc::Server> server;
  std::string host;
  int port = 0;
  std::mutex mu;
  bool down = false;
};

absl::StatusOr<std::unique_ptr<SwarmPeerServer>> SwarmPeerServer::Start(
    SwarmStage* stage, std::shared_ptr<comm::ExchangeMailbox> mailbox,
    const SwarmPeerOptions& options) {
  if (mailbox == nullptr) return absl::InvalidArgumentError("swarm peer: no mailbox");
  std::string host;
  int port = 0;
  SHOAL_RETURN_IF_ERROR(SplitHostPort(options.listen, "the swarm peer's listen address", 0,
                                      &host, &port));
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                         comm::ServerCredentials(options.tls_cert_file, options.tls_key_file,
                                                 "swarm peer"));
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<SwarmPeerService>(stage, std::move(mailbox), options);
  impl->host = host;
  grpc::ServerBuilder builder;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(comm::kMaxExchangeMessageBytes);
  builder.SetMaxSendMessageSize(comm::kMaxExchangeMessageBytes);
  builder.AddListeningPort(options.listen, credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(
        absl::StrCat("swarm peer: cannot listen on ", options.listen));
  }
  return std::unique_ptr<SwarmPeerServer>(new SwarmPeerServer(std::move(impl)));
}

SwarmPeerServer::SwarmPeerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SwarmPeerServer::~SwarmPeerServer() { Shutdown(); }

int SwarmPeerServer::port() const { return impl_->port; }
std::string SwarmPeerServer::address() const { return absl::StrCat(impl_->host, ":", impl_->port); }

void SwarmPeerServer::Shutdown() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->down) return;
  impl_->down = true;
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

SwarmPeerLoad SwarmPeerServer::TakeLoad() { return impl_->service->TakeLoad(); }

void SwarmPeerServer::Attach(SwarmStage* stage, int first_layer, int end_layer) {
  impl_->service->Attach(stage, first_layer, end_layer);
}

absl::Status SwarmPeerServer::WithStage(const std::function<absl::Status(SwarmStage&)>& fn) {
  absl::Status s;
  {
    std::lock_guard<std::mutex> lock(impl_->service->compute_mu());
    SwarmStage* stage = impl_->service->stage();
    if (stage == nullptr) return absl::FailedPreconditionError("swarm peer: no stage attached");
    s = fn(*stage);
    impl_->service->NoteStep();
  }
  impl_->service->StepChanged();
  return s;
}

absl::StatusOr<std::vector<at::Tensor>> SumOverRound(const SwarmStage& stage,
                                                      const std::vector<at::Tensor>& own,
                                                      comm::Backend* stage_group,
                                                      comm::Backend* tied_group) {
  const std::vector<at::Tensor> layout = stage.Gradients();
  if (own.size() != layout.size()) {
    return absl::InvalidArgumentError(absl::StrCat("swarm round: ", own.size(),
                                                   " buffers for a stage of ", layout.size()));
  }
  for (size_t i = 0; i < own.size(); ++i) {
    if (!own[i].defined() || !own[i].sizes().equals(layout[i].sizes()) ||
        own[i].scalar_type() != layout[i].scalar_type() || !own[i].is_contiguous()) {
      return absl::InvalidArgumentError(
          absl::StrCat("swarm round: buffer ", i, " is not laid out as the stage's"));
    }
  }
  // The tied wte's place in `own`: where the stage's view sits in its accumulation buffer.
  at::Tensor own_tied;
  if (tied_group != nullptr) {
    const at::Tensor tied = stage.TiedWteGradient();
    if (!tied.defined()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "swarm round: a tied-embedding group for stage ", stage.stage(),
          ", which holds one copy of wte only on the first or the last stage"));
    }
    for (size_t i = 0; i < layout.size() && !own_tied.defined(); ++i) {
      if (!tied.is_alias_of(layout[i])) continue;
      own_tied = own[i].as_strided(tied.sizes(), tied.strides(),
                                   tied.storage_offset() - layout[i].storage_offset() +
                                       own[i].storage_offset());
    }
    if (!own_tied.defined()) {
      return absl::InternalError("swarm round: the tied wte is in none of the stage's buffers");
    }
  }
  std::vector<at::Tensor> sums;
  for (const at::Tensor& g : own) sums.push_back(g.clone());
  if (stage_group != nullptr) {
    for (at::Tensor& s : sums) {
      SHOAL_RETURN_IF_ERROR(stage_group->AllReduce(s, comm::ReduceOp::kSum)->Wait());
    }
  }
  if (tied_group != nullptr) {
    // Each peer's own copy (not the stage's sum): over the first and the last stage's peers
    // together that is the embedding's gradient plus the head's.
    at::Tensor tied = own_tied.clone();
    SHOAL_RETURN_IF_ERROR(tied_group->AllReduce(tied, comm::ReduceOp::kSum)->Wait());
    for (size_t i = 0; i < own.size(); ++i) {
      if (!own_tied.is_alias_of(own[i])) continue;
      sums[i].as_strided(own_tied.sizes(), own_tied.strides(),
                         own_tied.storage_offset() - own[i].storage_offset() +
                             sums[i].storage_offset())
          .copy_(tied);
    }
  }
  return sums;
}

absl::Status ReduceRound(SwarmStage& stage, comm::Backend* stage_group, comm::Backend* tied_group) {
  std::vector<at::Tensor> own;
  for (const at::Tensor& g : stage.Gradients()) own.push_back(g.clone());
  SHOAL_ASSIGN_OR_RETURN(std::vector<at::Tensor> sums,
                         SumOverRound(stage, own, stage_group, tied_group));
  // The accumulation changes only once every reduction succeeded.
  const std::vector<at::Tensor> grads = stage.Gradients();
  for (size_t i = 0; i < grads.size(); ++i) grads[i].copy_(sums[i]);
  return absl::OkStatus();
}

}  // namespace shoal::runtime
