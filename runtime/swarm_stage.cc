#include "runtime/swarm_stage.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "memory/checksum.h"
#include "runtime/gpt.h"
#include "runtime/torch_status.h"

namespace shoal::runtime {
namespace {

std::string ShapeText(const at::Tensor& t) {
  return absl::StrCat("(", absl::StrJoin(t.sizes(), ", "), ")");
}

}  // namespace

SwarmStage::SwarmStage(const ModelConfig& model, int stage, int num_stages,
                       const SwarmStageOptions& options)
    : config_(model), stage_(stage), num_stages_(num_stages), options_(options) {}

SwarmStage::~SwarmStage() = default;

absl::StatusOr<std::unique_ptr<SwarmStage>> SwarmStage::Create(
    const ModelConfig& model, uint64_t seed, int stage, int num_stages, int first_block,
    int end_block, const parallel::AdamWOptions& adamw, const SwarmStageOptions& options) {
  if (num_stages < 1 || stage < 0 || stage >= num_stages) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm stage: stage ", stage, " of ", num_stages, " stages"));
  }
  if (first_block < 0 || end_block > model.n_layer || first_block > end_block ||
      (first_block == end_block && stage != 0 && stage != num_stages - 1)) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage ", stage, ": blocks [",
                                                   first_block, ", ", end_block, ") of ",
                                                   model.n_layer));
  }
  if (options.cache_slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm stage: cache_slots must be >= 1, got ", options.cache_slots));
  }
  std::unique_ptr<SwarmStage> s(new SwarmStage(model, stage, num_stages, options));
  const int first_piece = stage == 0 ? 0 : first_block + 1;
  const int end_piece = stage == num_stages - 1 ? model.n_layer + 2 : end_block + 1;
  SHOAL_ASSIGN_OR_RETURN(s->model_, Gpt::CreateStage(model, seed, first_piece, end_piece));
  Gpt& m = *s->model_;
  m.SetKernels(options.kernels);
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) s->accumulation_[g] = m.grads(g).MakeLike();
  const bool one_copy = m.has_embedding() != m.has_head();
  if (options.demo.has_value()) {
    for (int g : {Gpt::kDecay, Gpt::kNoDecay}) s->demo_grads_[g] = m.grads(g).MakeLike();
    const std::vector<parallel::ParamGroup> groups{
        {&m.params(Gpt::kDecay), &s->demo_grads_[Gpt::kDecay], true},
        {&m.params(Gpt::kNoDecay), &s->demo_grads_[Gpt::kNoDecay], false}};
    parallel::DemoOptions own = *options.demo;
    own.include = [one_copy](const std::string& name) {
      return !one_copy || name != "wte.weight";
    };
    SHOAL_ASSIGN_OR_RETURN(s->demo_own_, parallel::Demo::Create(groups, own));
    if (one_copy) {
      parallel::DemoOptions tied = *options.demo;
      tied.include = [](const std::string& name) { return name == "wte.weight"; };
      SHOAL_ASSIGN_OR_RETURN(s->demo_tied_, parallel::Demo::Create(groups, tied));
    }
  } else {
    s->optimizer_ = std::make_unique<parallel::AdamW>(
        std::vector<parallel::ParamGroup>{
            {&m.params(Gpt::kDecay), &s->accumulation_[Gpt::kDecay], true},
            {&m.params(Gpt::kNoDecay), &s->accumulation_[Gpt::kNoDecay], false}},
        adamw);
  }
  s->slots_.resize(options.cache_slots);
  for (const auto& [name, grad] : m.NamedGradients()) {
    const int group = s->GroupOf(grad);
    const bool wte = name == "wte.weight";
    if (wte && one_copy) s->tied_wte_grad_ = s->AccumulationView(group, grad);
    // The head's copy of wte: its gradient equals the embedding's after the tied sum.
    if (wte && m.has_head() && !m.has_embedding()) continue;
    s->counted_grads_.emplace_back(group, grad);
  }
  return s;
}

std::vector<std::pair<std::string, at::Tensor>> SwarmStage::NamedGradients() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [name, grad] : model_->NamedGradients()) {
    out.emplace_back(name, AccumulationView(GroupOf(grad), grad));
  }
  return out;
}

int SwarmStage::GroupOf(const at::Tensor& grad) const {
  return grad.storage().is_alias_of(model_->grads(Gpt::kDecay).flat().storage()) ? Gpt::kDecay
                                                                                   : Gpt::kNoDecay;
}

namespace {

// `view`, a view into the flat tensor `from`, at the same place in `to` (laid out alike).
at::Tensor SamePlaceIn(const at::Tensor& view, const at::Tensor& from, const at::Tensor& to) {
  return to.as_strided(view.sizes(), view.strides(),
                       to.storage_offset() + view.storage_offset() - from.storage_offset());
}

}  // namespace

at::Tensor SwarmStage::ViewIn(const memory::FlatBuffer* buffers, int group,
                              const at::Tensor& view) const {
  return SamePlaceIn(view, model_->grads(group).flat(), buffers[group].flat());
}

absl::Status SwarmStage::CheckNothingPending(const char* call) const {
  if (!pending_) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "swarm stage ", stage_, ": ", call, " while micro-batch ", pending_key_.id, " of step ",
      pending_key_.step, " waits for the ledger (Settle first)"));
}

void SwarmStage::AfterBackward(const MicroBatchKey& key, bool accumulate) {
  if (accumulate) {
    pending_ = true;
    pending_key_ = key;
  } else {
    model_->ZeroGrad();
  }
}

absl::Status SwarmStage::Settle(const MicroBatchKey& key, bool keep) {
  if (!pending_ || !(pending_key_ == key)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm stage ", stage_, ": settle of micro-batch ", key.id, " of step ", key.step,
        ", which is not pending"));
  }
  if (keep) {
    ++kept_;
    for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
      accumulation_[g].flat().add_(model_->grads(g).flat());
    }
  }
  model_->ZeroGrad();
  pending_ = false;
  return absl::OkStatus();
}

absl::Status SwarmStage::CheckInput(const at::Tensor& input, const char* what) const {
  if (!input.defined()) return absl::InvalidArgumentError(absl::StrCat(what, ": no tensor"));
  if (first()) {
    if (input.scalar_type() != at::kLong || input.dim() != 2 || input.size(0) < 1 ||
        input.size(1) < 1 || input.size(1) > config_.block_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": stage 0 takes (B, T) int64 token ids with 1 <= T <= ", config_.block_size,
          ", got ", at::toString(input.scalar_type()), " ", ShapeText(input)));
    }
    const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
    if (lo < 0 || hi >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": token ids in [", lo, ", ", hi,
                                                     "], outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
    return absl::OkStatus();
  }
  if (input.scalar_type() != at::kFloat || input.dim() != 3 || input.size(0) < 1 ||
      input.size(1) < 1 || input.size(1) > config_.block_size ||
      input.size(2) != config_.n_embd) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": stage ", stage_, " takes (B, T, ", config_.n_embd,
        ") float32 activations with 1 <= T <= ", config_.block_size, ", got ",
        at::toString(input.scalar_type()), " ", ShapeText(input)));
  }
  return absl::OkStatus();
}

absl::Status SwarmStage::CheckActivation(const at::Tensor& t, int64_t batch, int64_t seq,
                                         const char* what) const {
  if (!t.defined() || t.scalar_type() != at::kFloat || t.dim() != 3 || t.size(0) != batch ||
      t.size(1) != seq || t.size(2) != config_.n_embd) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": expected (", batch, ", ", seq, ", ", config_.n_embd, ") float32, got ",
        t.defined() ? absl::StrCat(at::toString(t.scalar_type()), " ", ShapeText(t))
                    : std::string("no tensor")));
  }
  return absl::OkStatus();
}

int SwarmStage::CachedSlot(const MicroBatchKey& key, const at::Tensor& input) const {
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.used && s.key == key && s.input.sizes() == input.sizes() &&
        s.input.scalar_type() == input.scalar_type() && at::equal(s.input, input)) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

int SwarmStage::TakeSlot(const MicroBatchKey& key) {
  int pick = -1;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].used && slots_[i].key == key) return static_cast<int>(i);
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (!slots_[i].used) return static_cast<int>(i);
    if (pick < 0 || slots_[i].last_use < slots_[pick].last_use) pick = static_cast<int>(i);
  }
  return pick;
}

absl::StatusOr<at::Tensor> SwarmStage::Forward(const MicroBatchKey& key, const at::Tensor& input) {
  if (last()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm stage ", stage_, " is the last: it runs ForwardBackward, not Forward"));
  }
  SHOAL_RETURN_IF_ERROR(CheckInput(input, "forward input"));
  const int slot = TakeSlot(key);
  Slot& s = slots_[slot];
  s = Slot{true, key, input.contiguous().clone(), ++clock_};
  return CatchTorchOr("swarm stage forward", [&]() -> at::Tensor {
    MicroBatch mb{nullptr, s.input.size(0), s.input.size(1), slot};
    return model_->StageForward(s.input, mb).clone();
  });
}

absl::StatusOr<at::Tensor> SwarmStage::Backward(const MicroBatchKey& key, const at::Tensor& input,
                                                const at::Tensor& grad_output, float loss_scale,
                                                bool accumulate) {
  if (last()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm stage ", stage_, " is the last: it runs ForwardBackward, not Backward"));
  }
  SHOAL_RETURN_IF_ERROR(CheckNothingPending("backward"));
  SHOAL_RETURN_IF_ERROR(CheckInput(input, "backward input"));
  SHOAL_RETURN_IF_ERROR(
      CheckActivation(grad_output, input.size(0), input.size(1), "backward grad_output"));
  int slot = CachedSlot(key, input);
  if (slot < 0) {
    ++recomputes_;
    SHOAL_RETURN_IF_ERROR(Forward(key, input).status());
    slot = CachedSlot(key, input);
  }
  const at::Tensor g = grad_output.contiguous();
  absl::StatusOr<at::Tensor> out = CatchTorchOr("swarm stage backward", [&]() -> at::Tensor {
    at::Tensor gi = model_->StageBackward(g, loss_scale, slot);
    return gi.defined() ? gi.clone() : gi;
  });
  slots_[slot] = Slot{};  // the backward consumed its activations
  AfterBackward(key, accumulate && out.ok());
  if (!out.ok()) model_->ZeroGrad();
  return out;
}

absl::StatusOr<SwarmStage::LossAndGrad> SwarmStage::ForwardBackward(const MicroBatchKey& key,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& targets,
                                                                    float loss_scale,
                                                                    bool accumulate) {
  if (!last()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm stage ", stage_, " is not the last: ForwardBackward is the last stage's"));
  }
  SHOAL_RETURN_IF_ERROR(CheckNothingPending("forward-backward"));
  SHOAL_RETURN_IF_ERROR(CheckInput(input, "forward-backward input"));
  if (!targets.defined() || targets.scalar_type() != at::kLong || targets.dim() != 2 ||
      targets.size(0) != input.size(0) || targets.size(1) != input.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "forward-backward targets: expected (", input.size(0), ", ", input.size(1),
        ") int64, got ",
        targets.defined() ? absl::StrCat(at::toString(targets.scalar_type()), " ", ShapeText(targets))
                          : std::string("no tensor")));
  }
  const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
  if (lo < 0 || hi >= config_.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("forward-backward targets: ids in [", lo,
                                                   ", ", hi, "], outside the vocabulary [0, ",
                                                   config_.vocab_size, ")"));
  }
  const int slot = TakeSlot(key);
  slots_[slot] = Slot{true, key, input.contiguous().clone(), ++clock_};
  const at::Tensor y = targets.contiguous();
  absl::StatusOr<LossAndGrad> out =
      CatchTorchOr("swarm stage forward-backward", [&]() -> LossAndGrad {
        const at::Tensor& x = slots_[slot].input;
        MicroBatch mb{&y, x.size(0), x.size(1), slot};
        LossAndGrad r;
        r.loss = model_->StageForward(x, mb).item<double>();
        at::Tensor gi = model_->StageBackward(at::Tensor(), loss_scale, slot);
        r.grad_input = gi.defined() ? gi.clone() : gi;
        return r;
      });
  slots_[slot] = Slot{};
  AfterBackward(key, accumulate && out.ok());
  if (!out.ok()) model_->ZeroGrad();
  return out;
}

std::vector<at::Tensor> SwarmStage::Gradients() const {
  return {accumulation_[Gpt::kDecay].flat(), accumulation_[Gpt::kNoDecay].flat()};
}

at::Tensor SwarmStage::TiedWteGradient() const { return tied_wte_grad_; }

double SwarmStage::SumSquares() const { return SumSquaresOf(Gradients()); }

double SwarmStage::SumSquaresOf(const std::vector<at::Tensor>& buffers) const {
  // Each counted gradient at its place in the given buffers.
  std::vector<at::Tensor> views;
  for (const auto& [group, grad] : counted_grads_) {
    views.push_back(SamePlaceIn(grad, model_->grads(group).flat(), buffers[group]));
  }
  return parallel::GlobalSumSquares(views, 0.0);
}

absl::Status SwarmStage::CheckStepArgs(double lr, double clip_scale) {
  if (!(lr >= 0 && lr <= 1e6)) {
    return absl::InvalidArgumentError(absl::StrCat("a step's lr must be in [0, 1e6], got ", lr));
  }
  if (!(clip_scale > 0 && clip_scale <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("a step's clip scale must be in (0, 1], got ", clip_scale));
  }
  return absl::OkStatus();
}

void SwarmStage::Apply(double lr, double clip_scale) {
  StepUpdate u;
  u.step = optimizer_->steps() + 1;
  u.lr = lr;
  u.clip_scale = clip_scale;
  if (options_.catchup_steps > 0) {
    for (const at::Tensor& g : Gradients()) u.gradient.push_back(g.clone());
  }
  optimizer_->Step(lr, clip_scale);
  Record(std::move(u));
  DropStep();
}

void SwarmStage::Record(StepUpdate update) {
  if (options_.catchup_steps <= 0) return;
  log_.push_back(std::move(update));
  while (static_cast<int>(log_.size()) > options_.catchup_steps) log_.pop_front();
}

absl::StatusOr<std::vector<StepUpdate>> SwarmStage::UpdatesFrom(int64_t from, int64_t to) const {
  const int64_t newest = optimizer_steps();
  if (from < 1 || (to != 0 && to < from)) {
    return absl::InvalidArgumentError(
        absl::StrCat("catch-up log: steps ", from, " to ", to, " (from >= 1, to 0 or >= from)"));
  }
  std::vector<StepUpdate> out;
  if (from > newest) return out;
  if (log_.empty() || log_.front().step > from || log_.back().step != newest) {
    return absl::OutOfRangeError(absl::StrCat(
        "this peer's catch-up log holds steps ",
        log_.empty() ? std::string("none")
                     : absl::StrCat(log_.front().step, " to ", log_.back().step),
        " of state ", newest, "; step ", from, " is not among them"));
  }
  for (const StepUpdate& u : log_) {
    if (u.step >= from && (to == 0 || u.step <= to)) out.push_back(u);
  }
  return out;
}

std::pair<int64_t, int64_t> SwarmStage::DemoPayloadBytes() const {
  if (!demo()) return {0, 0};
  return {demo_own_->PayloadBytes(), demo_tied_ != nullptr ? demo_tied_->PayloadBytes() : 0};
}

absl::Status SwarmStage::ApplyUpdate(const StepUpdate& u) {
  SHOAL_RETURN_IF_ERROR(CheckNothingPending("a logged update"));
  if (u.step != optimizer_steps() + 1) {
    return absl::FailedPreconditionError(absl::StrCat("swarm stage ", stage_, " at state ",
                                                      optimizer_steps(), ": update of step ",
                                                      u.step));
  }
  if (absl::Status s = CheckStepArgs(u.lr, u.clip_scale); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("update of step ", u.step, ": ", s.message()));
  }
  if (demo()) {
    if (!u.gradient.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("update of step ", u.step, ": a gradient for a DeMo stage"));
    }
    // The residual is this peer's own: it sent nothing that step, so it stays as it is.
    SaveDemoResidual();
    absl::Status applied = DemoApply(u.own_payloads, u.tied_payloads, u.lr);
    if (!applied.ok()) demo_before_.clear();
    return applied;
  }
  const std::vector<at::Tensor> grads = Gradients();
  if (u.gradient.size() != grads.size()) {
    return absl::InvalidArgumentError(absl::StrCat("update of step ", u.step, ": ",
                                                   u.gradient.size(), " gradient buffers for ",
                                                   grads.size()));
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = u.gradient[i];
    if (!g.defined() || g.scalar_type() != at::kFloat || !g.sizes().equals(grads[i].sizes())) {
      return absl::InvalidArgumentError(absl::StrCat("update of step ", u.step,
                                                     ": gradient buffer ", i, " is not laid out "
                                                     "as the stage's"));
    }
  }
  DropStep();
  for (size_t i = 0; i < grads.size(); ++i) grads[i].copy_(u.gradient[i]);
  Apply(u.lr, u.clip_scale);
  return absl::OkStatus();
}

absl::StatusOr<SwarmStage::DemoPayloads> SwarmStage::DemoCompress(double lr, int stage_peers,
                                                                  int tied_peers,
                                                                  double max_norm) {
  if (!demo()) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm stage ", stage_, " runs AdamW, not DeMo"));
  }
  SHOAL_RETURN_IF_ERROR(CheckStepArgs(lr, 1.0));
  if (!(max_norm >= 0 && max_norm <= 1e30)) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage ", stage_, ": max_norm ", max_norm));
  }
  if (stage_peers < 1 || (demo_tied_ != nullptr && tied_peers < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage ", stage_, ": DeMo over ",
                                                   stage_peers, " stage peer(s) and ",
                                                   tied_peers, " tied peer(s)"));
  }
  if (demo_before_.empty()) {
    SaveDemoResidual();
  } else {
    // The round runs again: from the residual the step started with.
    SHOAL_RETURN_IF_ERROR(RestoreDemoResidual());
  }
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
    demo_grads_[g].flat().copy_(accumulation_[g].flat()).mul_(static_cast<double>(stage_peers));
  }
  if (demo_tied_ != nullptr) {
    const at::Tensor& decay = model_->grads(Gpt::kDecay).flat();
    for (const auto& [name, grad] : model_->NamedGradients()) {
      if (name != "wte.weight") continue;
      const int g = grad.storage().is_alias_of(decay.storage()) ? Gpt::kDecay : Gpt::kNoDecay;
      ViewIn(demo_grads_, g, grad)
          .copy_(AccumulationView(g, grad))
          .mul_(static_cast<double>(tied_peers));
    }
  }
  DemoPayloads out;
  out.sum_squares = parallel::GlobalSumSquares(
      {demo_grads_[Gpt::kDecay].flat(), demo_grads_[Gpt::kNoDecay].flat()}, 0.0);
  const double clip = parallel::ClipScale(std::sqrt(out.sum_squares), max_norm);
  out.own = demo_own_->Compress(lr, clip);
  if (demo_tied_ != nullptr) out.tied = demo_tied_->Compress(lr, clip);
  return out;
}

absl::Status SwarmStage::DemoApply(const std::vector<at::Tensor>& own,
                                   const std::vector<at::Tensor>& tied, double lr) {
  if (!demo()) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm stage ", stage_, " runs AdamW, not DeMo"));
  }
  SHOAL_RETURN_IF_ERROR(CheckStepArgs(lr, 1.0));
  if (demo_before_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm stage ", stage_, ": DeMo's update of step ", demo_own_->steps() + 1,
        " before its compression"));
  }
  if ((demo_tied_ != nullptr) != !tied.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm stage ", stage_, ": ", tied.size(), " tied-wte payload(s) for a stage ",
        demo_tied_ != nullptr ? "with" : "without", " a tied optimizer"));
  }
  // Each optimizer checks its payloads before it moves anything; should the own one refuse
  // after the tied one moved wte, wte goes back and the step count with the saved residual.
  at::Tensor wte, wte_before;
  if (demo_tied_ != nullptr) {
    for (const auto& [name, p] : model_->NamedParameters()) {
      if (name == "wte.weight") wte = p;
    }
    wte_before = wte.clone();
    SHOAL_RETURN_IF_ERROR(demo_tied_->Apply(tied, lr));
  }
  if (absl::Status s = demo_own_->Apply(own, lr); !s.ok()) {
    if (demo_tied_ != nullptr) {
      wte.copy_(wte_before);
      (void)RestoreDemoResidual();
    }
    return s;
  }
  StepUpdate u;
  u.step = demo_own_->steps();
  u.lr = lr;
  u.own_payloads = own;
  u.tied_payloads = tied;
  Record(std::move(u));
  demo_before_.clear();
  DropStep();
  return absl::OkStatus();
}

void SwarmStage::SaveDemoResidual() {
  demo_before_ = OptimizerState();
  for (auto& [name, t] : demo_before_) t = t.clone();
}

absl::Status SwarmStage::RestoreDemoResidual() {
  SHOAL_RETURN_IF_ERROR(demo_own_->LoadStateDict(demo_before_));
  if (demo_tied_ != nullptr) SHOAL_RETURN_IF_ERROR(demo_tied_->LoadStateDict(demo_before_));
  return absl::OkStatus();
}

void SwarmStage::DropKept() {
  if (!demo_before_.empty()) {
    (void)RestoreDemoResidual();
    demo_before_.clear();
  }
  for (memory::FlatBuffer& a : accumulation_) a.flat().zero_();
  kept_ = 0;
}

void SwarmStage::DropStep() {
  DropKept();
  model_->ZeroGrad();
  pending_ = false;
  for (Slot& s : slots_) s = Slot{};
}

bool SwarmStage::EnterEpoch(int64_t epoch) {
  if (epoch <= epoch_) return false;
  epoch_ = epoch;
  const bool dropped = kept_ > 0 || !demo_before_.empty();
  DropKept();
  return dropped;
}

uint32_t SwarmStage::ParamHash() const {
  uint32_t crc = 0;
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
    const at::Tensor& p = model_->params(g).flat();
    crc = memory::Crc32c(p.data_ptr(), p.nbytes(), crc);
  }
  return crc;
}

int64_t SwarmStage::optimizer_steps() const {
  return demo() ? demo_own_->steps() : optimizer_->steps();
}

std::vector<std::pair<std::string, at::Tensor>> SwarmStage::NamedParameters() const {
  return model_->NamedParameters();
}

std::vector<std::pair<std::string, at::Tensor>> SwarmStage::OptimizerState() const {
  if (!demo()) return optimizer_->StateDict();
  std::vector<std::pair<std::string, at::Tensor>> out = demo_own_->StateDict();
  if (demo_tied_ != nullptr) {
    for (auto& [name, t] : demo_tied_->StateDict()) {
      if (name != "demo.step") out.emplace_back(name, t);
    }
  }
  return out;
}

absl::Status SwarmStage::LoadDemoState(
    const std::vector<std::pair<std::string, at::Tensor>>& optimizer) {
  std::map<std::string, at::Tensor> given;
  for (const auto& [name, t] : optimizer) given[name == "step" ? "demo.step" : name] = t;
  int residuals = 0, expected = 0;
  std::vector<std::pair<std::string, at::Tensor>> own, tied;
  const std::pair<parallel::Demo*, std::vector<std::pair<std::string, at::Tensor>>*> parts[] = {
      {demo_own_.get(), &own}, {demo_tied_.get(), &tied}};
  for (const auto& [opt, out] : parts) {
    if (opt == nullptr) continue;
    for (const auto& [name, t] : opt->StateDict()) {
      if (name == "demo.step") continue;
      ++expected;
      auto it = given.find(name);
      if (it != given.end()) ++residuals;
      out->emplace_back(name, it != given.end() ? it->second : at::zeros_like(t));
    }
  }
  if (residuals != 0 && residuals != expected) {
    return absl::DataLossError(absl::StrCat("swarm stage ", stage_, ": DeMo state with ",
                                            residuals, " of ", expected, " residuals"));
  }
  auto step = given.find("demo.step");
  if (step == given.end()) {
    return absl::DataLossError(absl::StrCat("swarm stage ", stage_, ": DeMo state without a step"));
  }
  own.emplace_back("demo.step", step->second);
  tied.emplace_back("demo.step", step->second);
  // Checked whole before anything changes: the tied optimizer's state by a dry load into the
  // own one is not possible, so load it first and put it back if the own one refuses.
  std::vector<std::pair<std::string, at::Tensor>> tied_before;
  if (demo_tied_ != nullptr) {
    for (const auto& [name, t] : demo_tied_->StateDict()) tied_before.emplace_back(name, t.clone());
    SHOAL_RETURN_IF_ERROR(demo_tied_->LoadStateDict(tied));
  }
  if (absl::Status s = demo_own_->LoadStateDict(own); !s.ok()) {
    if (demo_tied_ != nullptr) (void)demo_tied_->LoadStateDict(tied_before);
    return s;
  }
  demo_before_.clear();
  return absl::OkStatus();
}

absl::Status SwarmStage::LoadState(
    const std::vector<std::pair<std::string, at::Tensor>>& params,
    const std::vector<std::pair<std::string, at::Tensor>>& optimizer) {
  if (demo()) {
    std::vector<std::pair<std::string, at::Tensor>> before = OptimizerState();
    for (auto& [name, t] : before) t = t.clone();
    SHOAL_RETURN_IF_ERROR(LoadDemoState(optimizer));
    if (absl::Status loaded = model_->LoadParameters(params); !loaded.ok()) {
      (void)LoadDemoState(before);
      return loaded;
    }
    for (Slot& s : slots_) s = Slot{};
    log_.clear();  // it led to the state just replaced
    return absl::OkStatus();
  }
  // The optimizer's check changes nothing on failure; parameters are loaded only after it.
  std::vector<std::pair<std::string, at::Tensor>> before = optimizer_->StateDict();
  for (auto& [name, t] : before) t = t.clone();
  SHOAL_RETURN_IF_ERROR(optimizer_->LoadStateDict(optimizer));
  if (absl::Status loaded = model_->LoadParameters(params); !loaded.ok()) {
    (void)optimizer_->LoadStateDict(before);
    return loaded;
  }
  for (Slot& s : slots_) s = Slot{};
  log_.clear();  // it led to the state just replaced
  return absl::OkStatus();
}

}  // namespace shoal::runtime
