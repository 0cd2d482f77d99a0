// SwarmStage: what one swarm peer computes for the stage it serves. A stage is a contiguous range
// of the GPT's pieces (Gpt::CreateStage) with its own AdamW; trainers send it micro-batches hop by
// hop, in any order and from any number of trainers, each named by a key (step, id), id being the
// micro-batch's global number within the step.
//
// Trainers are the hub: a trainer keeps each stage's input for the backward, so a backward may go
// to any peer of the stage (trainers send it to the forward's peer while that one serves). The
// forward's activations are cached here in a few slots (least recently used goes first); a
// backward whose forward is not cached (another peer ran it, or the slot was reused) runs the
// forward again first. The kernels are deterministic, so a recomputed
// backward is bit-identical to a cached one.
//
// Exactly-once accounting (the coordinator's ledger) decides whether a backward accumulates: a
// replayed micro-batch passes through stages that already hold its gradient without adding to it
// (`accumulate` false), and accumulates only at the stages that lost it. An accumulating backward
// leaves the micro-batch's gradient (times loss_scale: 1 / M for a step of M micro-batches, so a
// step equals one process with grad_accum = M) *pending*: it joins the stage's accumulation only
// when Settle(key, true) says the ledger recorded it, and Settle(key, false) drops it. The peer is
// the party that commits, so a trainer that dies between a peer's backward and its own next move
// can never leave an accumulation the ledger does not know of (which a replay would then add a
// second time). One micro-batch may be pending at a time.
//
// At the step boundary the peers of a stage sum their gradient buffers (Gradients(), in a fixed
// peer order), the tied wte is summed over the first and the last stage, and every peer applies
// the same update (Apply) with the clip scale the coordinator computed from every stage's sum of
// squares (SumSquares counts each element of the model once). Peers of a stage then hold
// bit-identical parameters; ParamHash checks it.
//
// Every tensor a trainer sends is checked (dtype, shape against the model, token ids against the
// vocabulary) before any computation: kInvalidArgument names it. Not thread-safe: a peer serves
// its stage from one compute thread.
#ifndef SHOAL_RUNTIME_SWARM_STAGE_H_
#define SHOAL_RUNTIME_SWARM_STAGE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/flat_buffer.h"
#include "parallel/adamw.h"
#include "parallel/demo.h"
#include "runtime/config.h"
#include "runtime/piece_ops.h"

namespace shoal::runtime {

class Gpt;

struct SwarmStageOptions {
  // Forwards whose activations are kept for their backward, >= 1: as many as one trainer has in
  // flight by default (`shoal worker --in-flight`), so a stage's only peer still holds them all.
  int cache_slots = 8;
  // DeMo instead of AdamW (see "DeMo" below); its `include` is set by the stage.
  std::optional<parallel::DemoOptions> demo;
  // Steps kept in the catch-up log (UpdatesFrom), >= 0.
  int catchup_steps = 4;
  // The model's operations besides its matmuls (the job's train.kernels; runtime/piece_ops.h).
  Kernels kernels = Kernels::kFused;
};

// One step of the catch-up log: what turned state step - 1 into state `step`, enough for a
// stage at step - 1 to take the same step bit for bit (the reduced gradient with the step's lr
// and clip scale, or every peer's DeMo payloads with its lr).
struct StepUpdate {
  int64_t step = 0;
  double lr = 0;
  double clip_scale = 1;
  std::vector<at::Tensor> gradient;         // AdamW: Gradients()' layout, summed over the round
  std::vector<at::Tensor> own_payloads;     // DeMo: the stage's peers', in the group's order
  std::vector<at::Tensor> tied_payloads;    // DeMo, first and last stage: the tied wte's
};

// A micro-batch of a step: `id` in [0, M).
struct MicroBatchKey {
  int64_t step = 0;
  int64_t id = 0;
  bool operator==(const MicroBatchKey& o) const { return step == o.step && id == o.id; }
};

class SwarmStage {
 public:
  // Stage `stage` of `num_stages`, serving blocks [first_block, end_block) (the first stage also
  // holds the embedding, the last the final LayerNorm and the head, with its copy of the tied
  // wte). Parameters start as the full model's for `seed`. kInvalidArgument names a bad range.
  static absl::StatusOr<std::unique_ptr<SwarmStage>> Create(
      const ModelConfig& model, uint64_t seed, int stage, int num_stages, int first_block,
      int end_block, const parallel::AdamWOptions& adamw, const SwarmStageOptions& options = {});
  ~SwarmStage();

  int stage() const { return stage_; }
  int num_stages() const { return num_stages_; }
  bool first() const { return stage_ == 0; }
  bool last() const { return stage_ == num_stages_ - 1; }

  // Forward of a stage that is not the last: `input` is (B, T) int64 token ids on the first
  // stage, else the previous stage's (B, T, C) float32 output. Returns this stage's output
  // (B, T, C), a new tensor. The activations stay cached for the key's backward.
  absl::StatusOr<at::Tensor> Forward(const MicroBatchKey& key, const at::Tensor& input);

  // Backward of a stage that is not the last: `input` is the input the trainer kept (the one it
  // sent to Forward), `grad_output` the gradient of this stage's output. Uses the cached forward
  // of `key` when its input is bitwise the same, else runs the forward again. With `accumulate`,
  // adds the parameter gradients * loss_scale into the stage's buffers; without, leaves them
  // as they were. Returns the gradient of the input (B, T, C), or an undefined tensor on the
  // first stage.
  absl::StatusOr<at::Tensor> Backward(const MicroBatchKey& key, const at::Tensor& input,
                                      const at::Tensor& grad_output, float loss_scale,
                                      bool accumulate);

  // The last stage's forward and backward in one call: `targets` (B, T) int64. Returns the mean
  // loss over the micro-batch's tokens (unscaled) and the gradient of the input (undefined when
  // this stage is also the first).
  struct LossAndGrad {
    double loss = 0;
    at::Tensor grad_input;
  };
  absl::StatusOr<LossAndGrad> ForwardBackward(const MicroBatchKey& key, const at::Tensor& input,
                                              const at::Tensor& targets, float loss_scale,
                                              bool accumulate);

  // Ends the pending accumulation of `key`: `keep` adds it to the stage's accumulation, otherwise
  // it is dropped. kFailedPrecondition when `key` is not the pending micro-batch.
  absl::Status Settle(const MicroBatchKey& key, bool keep);
  // Whether a micro-batch's gradient is pending.
  bool pending() const { return pending_; }
  // Micro-batches kept in the accumulation since the last Apply.
  int64_t kept_micro_batches() const { return kept_; }

  // The accumulation (decay, no-decay flat buffers, laid out as the parameters), to be summed
  // over the stage's peers in place.
  std::vector<at::Tensor> Gradients() const;
  // The accumulation per parameter, by name (views), in NamedParameters() order.
  std::vector<std::pair<std::string, at::Tensor>> NamedGradients() const;
  // The gradient of the tied wte when this stage holds exactly one of its two copies (first
  // stage: the embedding's; last stage: the head's), to be summed over the two; else undefined.
  at::Tensor TiedWteGradient() const;
  // Sum of squares of this stage's gradients, each element of the model counted once over the
  // stages (the head's copy of wte is not counted), in the fixed-block order that makes
  // sqrt(sum over stages) equal the single process's norm up to the order of stage sums.
  double SumSquares() const;
  // The same count over buffers laid out as Gradients() (a round's sums, say) instead of the
  // accumulation. REQUIRES: as many buffers as Gradients(), each of its buffer's size.
  double SumSquaresOf(const std::vector<at::Tensor>& buffers) const;

  // A step's learning rate and clip scale as they arrive from outside (the coordinator's
  // decision, a peer's catch-up log): lr in [0, 1e6], clip scale in (0, 1]. kInvalidArgument
  // names the bad one. Apply, DemoCompress and DemoApply require them.
  static absl::Status CheckStepArgs(double lr, double clip_scale);
  // The step's update: AdamW with learning rate `lr` on gradients multiplied by `clip_scale`,
  // then gradients zeroed and the activation cache dropped. REQUIRES: !demo(), CheckStepArgs.
  void Apply(double lr, double clip_scale);
  // Forgets the step in progress without applying it (a rollback, a round reopened): the
  // accumulation, the pending micro-batch and the activation cache are dropped (and a DeMo
  // residual is put back as it was before the step's DemoCompress).
  void DropStep();
  // The swarm's rollback count the accumulation belongs to (the micro-batches' CallInfo
  // rollbacks). A rollback voids the step in progress: EnterEpoch(e) with e newer than epoch()
  // drops what was kept (and puts a DeMo residual back as DropStep does) but keeps a pending
  // micro-batch and the activation cache, which may already be the new epoch's; true when it
  // dropped anything. An older or equal e changes nothing.
  bool EnterEpoch(int64_t epoch);
  int64_t epoch() const { return epoch_; }

  // DeMo. A DeMo stage keeps no AdamW moments: each peer keeps its own residual and the stage's
  // peers exchange top-k DCT payloads of it (all-gather) instead of summing gradients. Two
  // optimizers: one for the stage's own parameters, exchanged over the stage's peers, and, on
  // the first and the last stage of several, one for the tied wte, exchanged over the peers of
  // both (each holds part of its gradient: the embedding's or the head's).
  bool demo() const { return demo_own_ != nullptr; }
  struct DemoPayloads {
    at::Tensor own;           // this peer's payload for the stage's own parameters
    at::Tensor tied;          // for the tied wte; undefined where there is no tied optimizer
    double sum_squares = 0;   // of the gradient DeMo was given, before clipping
  };
  // This peer's half of the round, before the exchange. DeMo's gradient is the accumulation
  // times `stage_peers` (own parameters) or `tied_peers` (the tied wte): peer i holds
  // n_i micro-batches at 1/M each, so the mean over the peers of P·(its accumulation) is the
  // step's gradient, as one process with grad_accum = M has it. Clipped by its own norm to
  // `max_norm` (0: not clipped), as a DeMo replica clips its own gradient; compressed with
  // `lr`. The residual as it was before is kept: calling this again for the same step (the
  // round ran again without a fenced peer) starts from it. kFailedPrecondition on an AdamW
  // stage; kInvalidArgument for peer counts < 1.
  absl::StatusOr<DemoPayloads> DemoCompress(double lr, int stage_peers, int tied_peers,
                                            double max_norm);
  // After the exchange: every peer's payloads in the groups' order (own: the stage's peers;
  // tied: the first stage's, then the last's). Moves the parameters (the same on every peer
  // that applies the same payloads), then drops the step. The payloads' checks (parallel::Demo::
  // Apply) come first: nothing changes on an error.
  absl::Status DemoApply(const std::vector<at::Tensor>& own, const std::vector<at::Tensor>& tied,
                         double lr);

  // The catch-up log: every Apply, DemoApply and ApplyUpdate records its step (the newest
  // options.catchup_steps are kept). UpdatesFrom returns steps [from, to] (to = 0: the newest),
  // kOutOfRange when the log no longer reaches back to `from` (the joiner needs a snapshot),
  // none when `from` is past the newest.
  absl::StatusOr<std::vector<StepUpdate>> UpdatesFrom(int64_t from, int64_t to) const;
  // Takes a step from the log of a peer at the same state: the update's step must be the next
  // (kFailedPrecondition), its tensors laid out as this stage's (kInvalidArgument). AdamW steps
  // on the logged gradient; DeMo applies the logged payloads (this peer's residual is left as it
  // is: it sent nothing that step). Bit-equal to the peer the update came from. Nothing pending.
  absl::Status ApplyUpdate(const StepUpdate& update);
  // The bytes one DeMo payload takes for the stage's own parameters and for the tied wte (0
  // without a tied optimizer); 0, 0 on an AdamW stage.
  std::pair<int64_t, int64_t> DemoPayloadBytes() const;

  // CRC32C of the parameters' bytes (both flat buffers).
  uint32_t ParamHash() const;
  int64_t optimizer_steps() const;
  // Parameters and optimizer state (NamedParameters; AdamW's StateDict, or DeMo's "demo.step"
  // and "demo.delta.<name>"), for a joiner's snapshot and for checkpoints; LoadState checks
  // everything before changing anything (kDataLoss names it). A DeMo stage loads "demo.step"
  // (or "step") with every residual or none (none: residual zero, as a joining replica starts).
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  std::vector<std::pair<std::string, at::Tensor>> OptimizerState() const;
  absl::Status LoadState(const std::vector<std::pair<std::string, at::Tensor>>& params,
                         const std::vector<std::pair<std::string, at::Tensor>>& optimizer);

  // Counters: forwards recomputed for a backward whose forward was not cached.
  int64_t recomputes() const { return recomputes_; }
  const Gpt& model() const { return *model_; }

 private:
  SwarmStage(const ModelConfig& model, int stage, int num_stages, const SwarmStageOptions& options);

  struct Slot {
    bool used = false;
    MicroBatchKey key;
    at::Tensor input;  // owned copy: the pieces read it again in the backward
    uint64_t last_use = 0;
  };
  absl::Status CheckInput(const at::Tensor& input, const char* what) const;
  absl::Status CheckActivation(const at::Tensor& t, int64_t batch, int64_t seq,
                               const char* what) const;
  // The slot caching `key`'s forward on exactly `input`, or -1.
  int CachedSlot(const MicroBatchKey& key, const at::Tensor& input) const;
  // A slot for a new forward of `key`: its old slot, a free one, or the least recently used.
  int TakeSlot(const MicroBatchKey& key);
  absl::Status CheckNothingPending(const char* call) const;
  // After a backward: the model's gradient buffers hold this micro-batch's gradient alone; it
  // becomes pending (`accumulate`) or is cleared.
  void AfterBackward(const MicroBatchKey& key, bool accumulate);
  // `view` (into the model's gradient buffer `group`) at the same place in `buffers[group]`.
  at::Tensor ViewIn(const memory::FlatBuffer* buffers, int group, const at::Tensor& view) const;
  // The parameter group (Gpt::kDecay, Gpt::kNoDecay) of a view into the model's gradients.
  int GroupOf(const at::Tensor& grad) const;
  at::Tensor AccumulationView(int group, const at::Tensor& view) const {
    return ViewIn(accumulation_, group, view);
  }
  absl::Status LoadDemoState(const std::vector<std::pair<std::string, at::Tensor>>& optimizer);
  // DeMo: demo_before_ = a copy of the residuals and step now; and back to it.
  void SaveDemoResidual();
  absl::Status RestoreDemoResidual();
  // The accumulation (and a DeMo residual's step in progress) back to none kept.
  void DropKept();

  ModelConfig config_;
  int stage_, num_stages_;
  SwarmStageOptions options_;
  std::unique_ptr<Gpt> model_;
  std::unique_ptr<parallel::AdamW> optimizer_;
  std::vector<Slot> slots_;
  uint64_t clock_ = 0;
  int64_t recomputes_ = 0;
  // The step's accumulation, laid out as the model's gradient buffers, which hold one micro-batch's
  // gradient at a time (zero between backwards).
  memory::FlatBuffer accumulation_[2];  // what AdamW steps on
  bool pending_ = false;
  MicroBatchKey pending_key_;
  int64_t kept_ = 0;
  int64_t epoch_ = 0;  // EnterEpoch's
  // What SumSquares counts: (group, the model's gradient view), placed in any buffers laid out
  // as Gradients().
  std::vector<std::pair<int, at::Tensor>> counted_grads_;
  at::Tensor tied_wte_grad_;               // a view into accumulation_, or undefined
  // DeMo: the gradient it is given (laid out as the accumulation), its optimizers (tied: null
  // unless this stage holds one of two wte copies), and the residuals before the step's
  // DemoCompress (empty when none ran since the last Apply or DropStep).
  memory::FlatBuffer demo_grads_[2];
  std::unique_ptr<parallel::Demo> demo_own_, demo_tied_;
  std::vector<std::pair<std::string, at::Tensor>> demo_before_;
  std::deque<StepUpdate> log_;  // the catch-up log, oldest first
  void Record(StepUpdate update);
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_SWARM_STAGE_H_
