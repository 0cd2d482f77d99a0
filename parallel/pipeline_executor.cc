#include "parallel/pipeline_executor.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace shoal::parallel {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// What a transfer carries; part of its tag. Evaluation has its own kind so that a forward-only
// pass can never be mistaken for a training step's traffic.
enum class DataKind { kActivation = 0, kGrad = 1, kEvalActivation = 2 };
constexpr int64_t kDataKinds = 3;
constexpr int64_t kTagLimit = int64_t{1} << 31;

const char* DataName(DataKind k) {
  switch (k) {
    case DataKind::kActivation: return "activation";
    case DataKind::kGrad: return "grad";
    case DataKind::kEvalActivation: return "eval activation";
  }
  return "?";
}

// tag = (micro_batch * model_stages + receiving model stage) * 3 + data kind. Unique per
// (kind, micro-batch, receiver), the same on both ends, and independent of the number of
// micro-batches, so a forward-only pass with another count keeps the same numbering.
int64_t TagOf(DataKind kind, int micro_batch, int receiver, int model_stages) {
  return (int64_t{micro_batch} * model_stages + receiver) * kDataKinds + static_cast<int64_t>(kind);
}

// The largest tag `micro_batches` micro-batches use, + 1.
int64_t TagSpan(int micro_batches, int model_stages) {
  return int64_t{micro_batches} * model_stages * kDataKinds;
}

std::string ShapeString(at::IntArrayRef shape) { return "[" + absl::StrJoin(shape, ", ") + "]"; }

absl::Status WithContext(const absl::Status& s, const std::string& context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

}  // namespace

// A posted send or recv: the Work and the buffer it reads or writes, which must stay alive until
// the Work is done.
struct Transfer {
  at::Tensor buffer;
  std::unique_ptr<comm::Work> work;  // declared after `buffer`: destroyed before it
  std::string what;                  // "send activation of micro-batch 3 to pipeline rank 1"
};

struct PipelineExecutor::Impl {
  // Sends posted and not yet waited on.
  std::vector<Transfer> sends;
  // The next recv of the step, posted ahead of its action (RunStep).
  Transfer next_recv;
  // Transfers dropped by a step that failed or threw. Both backends keep an unfinished
  // operation's buffers alive themselves, but the Backend contract only promises that tensors
  // need to live until Wait(); holding them here until the executor goes costs little (a failed
  // group is rebuilt with a new executor) and keeps to the contract.
  std::vector<Transfer> retired;
  // Per (micro-batch, chunk) of the current pass, at Index(mb, chunk): its slot (-1: none), its
  // received input / output gradient, and the copy of its output waiting for its Send action.
  int micro_batches = 0;
  std::vector<int> slot_of;
  std::vector<at::Tensor> received_activation, received_grad;
  std::vector<at::Tensor> outgoing_activation, outgoing_grad;
  // Per chunk, which of its slots are taken; the total across chunks is what peak_slots counts.
  std::vector<std::vector<bool>> slot_used;
  int slots_in_use = 0;

  int Index(int micro_batch, int chunk) const { return chunk * micro_batches + micro_batch; }

  // Forgets the last pass; anything it left in flight (it failed or threw) is retired.
  void Begin(int m, int chunks) {
    for (Transfer& t : sends) retired.push_back(std::move(t));
    sends.clear();
    if (next_recv.work != nullptr) retired.push_back(std::move(next_recv));
    next_recv = Transfer();
    micro_batches = m;
    const size_t n = static_cast<size_t>(m) * chunks;
    slot_of.assign(n, -1);
    slot_used.assign(chunks, {});
    slots_in_use = 0;
    received_activation.assign(n, at::Tensor());
    received_grad.assign(n, at::Tensor());
    outgoing_activation.assign(n, at::Tensor());
    outgoing_grad.assign(n, at::Tensor());
  }

  // Lowest free slot of the chunk first: with 1F1B the slots a stage touches stay
  // 0 .. p - rank - 1, so the model's per-slot activation buffers stay few and warm. Slots are
  // per chunk because each chunk is its own part of the model with its own buffers.
  int AllocateSlot(int chunk) {
    std::vector<bool>& used = slot_used[chunk];
    int slot = 0;
    while (slot < static_cast<int>(used.size()) && used[slot]) ++slot;
    if (slot == static_cast<int>(used.size())) used.push_back(false);
    used[slot] = true;
    ++slots_in_use;
    return slot;
  }
  void FreeSlot(int chunk, int slot) {
    slot_used[chunk][slot] = false;
    --slots_in_use;
  }
};

PipelineExecutor::PipelineExecutor(comm::Backend* group, PipelineSchedule schedule,
                                   StageCompute* stage, PipelineExecutorOptions options)
    : group_(group),
      schedule_(std::move(schedule)),
      stage_(stage),
      options_(options),
      impl_(std::make_unique<Impl>()) {}

PipelineExecutor::~PipelineExecutor() = default;

absl::StatusOr<std::unique_ptr<PipelineExecutor>> PipelineExecutor::Create(
    comm::Backend* group, PipelineSchedule schedule, StageCompute* stage,
    PipelineExecutorOptions options) {
  if (absl::Status s = Validate(schedule); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("pipeline executor: invalid schedule: ", s.message()));
  }
  if (stage == nullptr) {
    return absl::InvalidArgumentError("pipeline executor: stage (StageCompute) is null");
  }
  if (group == nullptr) {
    if (schedule.stages != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pipeline executor: no pipeline group given for a schedule of ", schedule.stages,
          " stages (only a single stage may run without one)"));
    }
  } else if (group->size() != schedule.stages) {
    return absl::InvalidArgumentError(
        absl::StrCat("pipeline executor: the pipeline group has ", group->size(),
                     " ranks but the schedule has ", schedule.stages, " stages"));
  } else if (group->rank() < 0 || group->rank() >= schedule.stages) {
    return absl::InvalidArgumentError(
        absl::StrCat("pipeline executor: group rank ", group->rank(), " is not a stage of ",
                     schedule.stages));
  }
  const int model_stages = schedule.stages * schedule.virtual_stages;
  if (TagSpan(schedule.micro_batches, model_stages) > kTagLimit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pipeline executor: ", schedule.micro_batches, " micro-batches x ", model_stages,
        " model stages need transfer tags beyond 2^31"));
  }
  return std::unique_ptr<PipelineExecutor>(
      new PipelineExecutor(group, std::move(schedule), stage, options));
}

namespace {

// The tensor to send for `what`, copied (the stage may overwrite its output at the next call),
// or an error when the stage returned something that does not fit the receiver's buffer.
absl::StatusOr<at::Tensor> SendCopy(const at::Tensor& out, const std::vector<int64_t>& shape,
                                    const std::string& what) {
  if (!out.defined()) {
    return absl::InternalError(absl::StrCat(what, " returned no tensor, but the schedule sends it"));
  }
  if (out.scalar_type() != at::kFloat || !out.sizes().equals(shape)) {
    return absl::InternalError(absl::StrCat(what, " returned a ", c10::toString(out.scalar_type()),
                                            " tensor of shape ", ShapeString(out.sizes()),
                                            "; the activation shape is float ",
                                            ShapeString(shape)));
  }
  at::Tensor copy = at::empty(shape, at::kFloat);
  copy.copy_(out);
  return copy;
}

absl::Status CheckShape(const std::vector<int64_t>& shape) {
  for (int64_t d : shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pipeline executor: StageCompute::ActivationShape() ", ShapeString(shape),
          " has a dimension < 1"));
    }
  }
  return absl::OkStatus();
}

// " (model stage 5)" when the schedule interleaves, so an error names the chunk involved; ""
// otherwise, where the rank already says which stage it is.
std::string ModelStageNote(const PipelineSchedule& s, int model_stage) {
  return s.virtual_stages > 1 ? absl::StrCat(" (model stage ", model_stage, ")") : std::string();
}

}  // namespace

absl::Status PipelineExecutor::RunStep(const std::function<absl::Status()>& reduce_grads) {
  const Clock::time_point start = Clock::now();
  timing_ = PipelineStepTiming{};
  peak_slots_ = 0;
  Impl& im = *impl_;
  im.Begin(schedule_.micro_batches, schedule_.virtual_stages);
  const int rank = group_ != nullptr ? group_->rank() : 0;
  const int model_stages = schedule_.stages * schedule_.virtual_stages;
  const std::vector<int64_t> shape = stage_->ActivationShape();
  SHOAL_RETURN_IF_ERROR(CheckShape(shape));
  const std::vector<Action>& actions = schedule_.per_rank[rank];

  // Posts the first recv at or after action `from` into im.next_recv. Posting it a computation
  // ahead of its wait lets the data move while this rank computes: Gloo starts moving a message
  // only once both ends have posted it, and posting at the recv action put that handshake and
  // the copy on the critical path. Measured with `shoal bench pipeline` (p = 4, m = 16, stages
  // of 20 + 40 ms, 128 KiB activations; 1.140 s per step in theory): 1.185 -> 1.167 s for 1F1B,
  // 1.200 -> 1.162 s for GPipe. One recv ahead costs one extra activation buffer, not a step's
  // worth.
  auto post_next_recv = [&](size_t from) {
    for (size_t j = from; j < actions.size(); ++j) {
      const Action& r = actions[j];
      if (r.kind != ActionKind::kRecvActivation && r.kind != ActionKind::kRecvGrad) continue;
      const DataKind kind =
          r.kind == ActionKind::kRecvGrad ? DataKind::kGrad : DataKind::kActivation;
      const int receiver = ModelStage(schedule_, rank, r.chunk);
      Transfer& t = im.next_recv;
      t.what = absl::StrCat("recv ", DataName(kind), " of micro-batch ", r.micro_batch,
                            " from pipeline rank ", r.peer, ModelStageNote(schedule_, receiver));
      t.buffer = at::empty(shape, at::kFloat);
      t.work = group_->Recv(t.buffer, r.peer,
                            static_cast<int>(TagOf(kind, r.micro_batch, receiver, model_stages)),
                            options_.transfer);
      return;
    }
  };
  post_next_recv(0);

  for (size_t i = 0; i < actions.size(); ++i) {
    const Action& a = actions[i];
    const int mb = a.micro_batch;
    // Only meaningful for the per-(micro-batch, chunk) actions; Validate keeps their fields in
    // range.
    const int idx = a.micro_batch >= 0 ? im.Index(mb, a.chunk) : -1;
    const int model_stage = ModelStage(schedule_, rank, a.chunk);
    switch (a.kind) {
      case ActionKind::kRecvActivation:
      case ActionKind::kRecvGrad: {
        // Posted when the previous recv completed (or at the start): see post_next_recv.
        Transfer t = std::move(im.next_recv);
        if (t.work == nullptr) {
          return absl::InternalError(absl::StrCat("pipeline executor: recv of micro-batch ", mb,
                                                  " was not posted"));
        }
        const Clock::time_point wait_start = Clock::now();
        const absl::Status s = t.work->Wait();
        timing_.recv_wait_s += Seconds(wait_start);
        if (!s.ok()) {
          const std::string what = std::move(t.what);
          im.retired.push_back(std::move(t));
          return WithContext(s, what);
        }
        (a.kind == ActionKind::kRecvGrad ? im.received_grad : im.received_activation)[idx] =
            std::move(t.buffer);
        post_next_recv(i + 1);
        break;
      }
      case ActionKind::kForward: {
        const int slot = im.AllocateSlot(a.chunk);
        im.slot_of[idx] = slot;
        peak_slots_ = std::max(peak_slots_, im.slots_in_use);
        at::Tensor input = std::move(im.received_activation[idx]);
        const Clock::time_point t0 = Clock::now();
        at::Tensor out = stage_->Forward(a.chunk, mb, slot, input);
        timing_.compute_s += Seconds(t0);
        if (model_stage < model_stages - 1) {
          SHOAL_ASSIGN_OR_RETURN(
              im.outgoing_activation[idx],
              SendCopy(out, shape,
                       absl::StrCat("forward of micro-batch ", mb,
                                    ModelStageNote(schedule_, model_stage))));
        }
        break;
      }
      case ActionKind::kBackward: {
        const int slot = im.slot_of[idx];
        at::Tensor grad_output = std::move(im.received_grad[idx]);
        const Clock::time_point t0 = Clock::now();
        at::Tensor grad_input = stage_->Backward(a.chunk, mb, slot, grad_output);
        timing_.compute_s += Seconds(t0);
        im.FreeSlot(a.chunk, slot);
        im.slot_of[idx] = -1;
        if (model_stage > 0) {
          SHOAL_ASSIGN_OR_RETURN(
              im.outgoing_grad[idx],
              SendCopy(grad_input, shape,
                       absl::StrCat("backward of micro-batch ", mb,
                                    ModelStageNote(schedule_, model_stage))));
        }
        break;
      }
      case ActionKind::kSendActivation:
      case ActionKind::kSendGrad: {
        const bool grad = a.kind == ActionKind::kSendGrad;
        const DataKind kind = grad ? DataKind::kGrad : DataKind::kActivation;
        const int receiver = ModelStage(schedule_, a.peer, PeerChunk(schedule_, rank, a));
        Transfer t;
        t.what = absl::StrCat("send ", DataName(kind), " of micro-batch ", mb,
                              " to pipeline rank ", a.peer, ModelStageNote(schedule_, receiver));
        t.buffer = std::move((grad ? im.outgoing_grad : im.outgoing_activation)[idx]);
        t.work = group_->Send(t.buffer, a.peer,
                              static_cast<int>(TagOf(kind, mb, receiver, model_stages)),
                              options_.transfer);
        im.sends.push_back(std::move(t));
        break;
      }
      case ActionKind::kReduceGrads:
        if (reduce_grads) SHOAL_RETURN_IF_ERROR(reduce_grads());
        break;
      case ActionKind::kOptimizerStep: {
        // Validate makes this the last action: the step's traffic must be done before the
        // caller steps (and before the next step reuses the tags).
        const Clock::time_point wait_start = Clock::now();
        for (Transfer& t : im.sends) {
          const absl::Status s = t.work->Wait();
          if (!s.ok()) return WithContext(s, t.what);  // Begin() retires what is left
        }
        im.sends.clear();
        timing_.send_wait_s = Seconds(wait_start);
        timing_.total_s = Seconds(start);
        return absl::OkStatus();
      }
    }
  }
  return absl::InternalError("pipeline executor: the schedule has no optimizer step");
}

absl::Status PipelineExecutor::RunForward(int micro_batches) {
  if (micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("pipeline executor: RunForward of ", micro_batches, " micro-batches"));
  }
  const int model_stages = schedule_.stages * schedule_.virtual_stages;
  if (TagSpan(micro_batches, model_stages) > kTagLimit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pipeline executor: RunForward of ", micro_batches, " micro-batches x ", model_stages,
        " model stages needs transfer tags beyond 2^31"));
  }
  Impl& im = *impl_;
  im.Begin(0, 0);
  const int rank = group_ != nullptr ? group_->rank() : 0;
  const int stages = schedule_.stages;
  // Model stage j - 1 lives on the previous rank and j + 1 on the next, wrapping around between
  // chunks: rank p - 1's chunk c feeds rank 0's chunk c + 1.
  const int prev = (rank - 1 + stages) % stages, next = (rank + 1) % stages;
  const std::vector<int64_t> shape = stage_->ActivationShape();
  SHOAL_RETURN_IF_ERROR(CheckShape(shape));
  // Micro-batch by micro-batch, each through this rank's chunks in model-stage order. Every
  // recv waits on a model stage that comes earlier in this same order on its own rank, and
  // sends never block, so the ranks cannot wait on each other in a cycle.
  for (int mb = 0; mb < micro_batches; ++mb) {
    for (int chunk = 0; chunk < schedule_.virtual_stages; ++chunk) {
      const int j = ModelStage(schedule_, rank, chunk);
      at::Tensor input;
      if (j > 0) {
        Transfer t;
        t.buffer = at::empty(shape, at::kFloat);
        t.work = group_->Recv(t.buffer, prev,
                              static_cast<int>(TagOf(DataKind::kEvalActivation, mb, j,
                                                     model_stages)),
                              options_.transfer);
        if (absl::Status s = t.work->Wait(); !s.ok()) {
          im.retired.push_back(std::move(t));
          return WithContext(s, absl::StrCat("recv eval activation of micro-batch ", mb,
                                             " from pipeline rank ", prev,
                                             ModelStageNote(schedule_, j)));
        }
        input = std::move(t.buffer);
      }
      at::Tensor out = stage_->Forward(chunk, mb, /*slot=*/0, input);
      if (j < model_stages - 1) {
        Transfer t;
        t.what = absl::StrCat("send eval activation of micro-batch ", mb, " to pipeline rank ",
                              next, ModelStageNote(schedule_, j + 1));
        SHOAL_ASSIGN_OR_RETURN(
            t.buffer, SendCopy(out, shape,
                               absl::StrCat("eval forward of micro-batch ", mb,
                                            ModelStageNote(schedule_, j))));
        t.work = group_->Send(
            t.buffer, next,
            static_cast<int>(TagOf(DataKind::kEvalActivation, mb, j + 1, model_stages)),
            options_.transfer);
        im.sends.push_back(std::move(t));
      }
    }
  }
  for (Transfer& t : im.sends) {
    if (absl::Status s = t.work->Wait(); !s.ok()) return WithContext(s, t.what);
  }
  im.sends.clear();
  return absl::OkStatus();
}

}  // namespace shoal::parallel
