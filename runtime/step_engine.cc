#include "runtime/step_engine.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <functional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/gpt_arithmetic.h"
#include "common/logging.h"
#include "common/progress.h"
#include "common/status.h"
#include "memory/activation_offload.h"
#include "memory/model_pager.h"
#include "memory/state_plan.h"
#include "parallel/adamw.h"
#include "parallel/data_parallel.h"
#include "parallel/demo.h"
#include "parallel/mesh.h"
#include "runtime/device_probe.h"
#include "runtime/torch_status.h"
#include "runtime/lr_schedule.h"

namespace shoal::runtime {
namespace {


memory::StateBudget BudgetOf(const Config& config) {
  return {config.memory.host_budget.bytes, !config.memory.disk_path.empty()};
}

std::vector<parallel::ParamGroup> ParamGroupsOf(Gpt& m) {
  return {{&m.params(Gpt::kDecay), &m.grads(Gpt::kDecay), true},
          {&m.params(Gpt::kNoDecay), &m.grads(Gpt::kNoDecay), false}};
}

double LocalGradNorm(Gpt& m) {
  return parallel::GlobalL2Norm({m.grads(Gpt::kDecay).flat(), m.grads(Gpt::kNoDecay).flat()});
}

// The activation plan memory.activation_budget asks for (memory/state_plan.h): the pure choice
// from the model's per-block figures, with the measurements it needs taken here (the offload
// tier's bandwidth, timed on the tier itself, and the GEMM peak). Sets the model's block modes and
// returns the line for the log (empty without a budget).
absl::StatusOr<std::string> ApplyActivationPlan(const Config& config, int batch, int rank,
                                                Gpt& model) {
  const ModelConfig& m = config.model;
  if (!config.memory.activation_budget.set()) return std::string();
  const GptShape shape = ShapeOf(m);
  const double tokens = static_cast<double>(batch) * m.block_size;
  memory::ActivationBudget budget;
  budget.n_layer = m.n_layer;
  budget.budget_bytes = static_cast<double>(config.memory.activation_budget.bytes);
  budget.keep_bytes = tokens * GptBlockActivationBytesPerToken(shape);
  budget.output_bytes = tokens * GptBlockOutputBytesPerToken(shape);
  const std::string& mode = config.memory.activation_offload;
  const std::string dir = config.memory.disk_path + "/activations";

  memory::ActivationRates rates;
  std::unique_ptr<memory::ActivationOffloader> offloader;
  const int kept = memory::BlocksKept(budget, budget.budget_bytes);
  if (kept < m.n_layer && mode != "never" && !config.memory.disk_path.empty()) {
    memory::ActivationOffloadOptions o;
    o.directory = dir;
    o.worker = rank;
    o.slot_bytes = memory::ActivationOffloader::PackedBytes(
        BlockInnerActivationShapes(m, batch, m.block_size));
    rates.slot_bytes = static_cast<double>(o.slot_bytes);
    rates.staging_bytes = static_cast<double>(o.staging_buffers) * o.slot_bytes;
    const int kept_offloading = memory::BlocksKept(budget, budget.budget_bytes - rates.staging_bytes);
    for (int l = 0; l < m.n_layer - kept_offloading; ++l) o.blocks.push_back(l);
    absl::StatusOr<std::unique_ptr<memory::ActivationOffloader>> opened =
        memory::ActivationOffloader::Open(o);
    absl::StatusOr<double> measured =
        opened.ok() ? (*opened)->MeasureBandwidth() : absl::StatusOr<double>(opened.status());
    // "auto" falls back to recomputing on a disk that cannot take the slots; "always" is told.
    if (!measured.ok() && mode == "always") return measured.status();
    if (measured.ok()) {
      rates.disk_bytes_per_s = *measured;
      SHOAL_ASSIGN_OR_RETURN(const double gflops, PeakGflops());
      rates.gemm_flops_per_s = gflops * 1e9;
      rates.block_forward_flops = tokens * GptBlockFlopsPerToken(shape) / 3;
      offloader = *std::move(opened);
    } else {
      rates.disk_problem = std::string(measured.status().message());
    }
  }
  const memory::ActivationChoice choice = memory::ChooseActivations(budget, mode, rates);
  const int spilled = m.n_layer - choice.kept;
  std::vector<ActivationMode> modes(m.n_layer, ActivationMode::kKeep);
  for (int l = 0; l < spilled; ++l) {
    modes[l] = choice.offload ? ActivationMode::kOffload : ActivationMode::kRecompute;
  }
  if (!choice.offload) offloader.reset();
  const int staging_buffers = memory::ActivationOffloadOptions{}.staging_buffers;
  model.SetBlockActivationModes(modes, std::move(offloader));

  const std::string& text = config.memory.activation_budget.text;
  const std::string all_kept = FormatBytes(m.n_layer * budget.keep_bytes);
  const std::string disk = absl::StrFormat(
      "disk %s/s: %.1f ms per block against %.1f ms to recompute at %.0f GFLOP/s",
      FormatBytes(rates.disk_bytes_per_s), 1e3 * choice.offload_seconds,
      1e3 * choice.recompute_seconds, rates.gemm_flops_per_s / 1e9);
  std::string line;
  if (choice.offload) {
    line = absl::StrFormat(
        "activation plan (memory.activation_budget %s): %d of %d blocks keep their activations, "
        "%d offload them to %s (%s; memory.activation_offload %s); %s per micro-batch with %d "
        "staging buffers of %s (%s if all kept)",
        text, choice.kept, m.n_layer, spilled, dir, disk, mode, FormatBytes(choice.peak_bytes),
        staging_buffers, FormatBytes(rates.slot_bytes), all_kept);
  } else {
    const double extra = spilled * GptBlockFlopsPerToken(shape) / 3 / GptFlopsPerToken(shape);
    line = absl::StrFormat(
        "activation plan (memory.activation_budget %s): %d of %d blocks keep their activations, "
        "%d recompute them in backward; %s per micro-batch (%s if all kept), +%.1f%% FLOPs per "
        "step",
        text, choice.kept, m.n_layer, spilled, FormatBytes(choice.peak_bytes), all_kept,
        100 * extra);
    if (rates.disk_bytes_per_s > 0) line += absl::StrFormat(" (not offloaded to %s: %s)", dir, disk);
    if (!rates.disk_problem.empty()) line += absl::StrCat(" (not offloaded: ", rates.disk_problem, ")");
  }
  if (choice.peak_bytes > budget.budget_bytes) {
    line += absl::StrFormat(" (over the budget even so: every block keeps its output, %s)",
                            FormatBytes(m.n_layer * budget.output_bytes +
                                        (choice.offload ? rates.staging_bytes : 0)));
  }
  return line;
}

// The AdamW moment offload for parameters and gradients in RAM (memory/state_plan.h).
absl::StatusOr<parallel::MomentOffload> MomentOffloadOf(const Config& config, Gpt& model,
                                                        int worker) {
  int64_t resident = 0, elements = 0;
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
    resident += model.params(g).flat().nbytes() + model.grads(g).flat().nbytes();
    elements += model.params(g).numel();
  }
  SHOAL_ASSIGN_OR_RETURN(const memory::MomentOffloadPlan plan,
                         memory::PlanMomentOffload(BudgetOf(config), resident, elements));
  parallel::MomentOffload o;
  if (plan.host_budget_bytes == 0) return o;
  o.chunk_elements = plan.chunk_elements;
  o.host_budget_bytes = plan.host_budget_bytes;
  o.disk_directory = config.memory.disk_path;
  o.disk_budget_bytes = config.memory.disk_budget.bytes;
  o.worker = worker;
  return o;
}

// Bytes of a tiered store's chunks that are on disk and not in RAM now.
int64_t OnDisk(const memory::TieredChunkStore& s) {
  return static_cast<int64_t>(s.num_chunks()) * s.chunk_bytes() - s.stats().resident_bytes;
}

// An engine over one whole model with AdamW: one process (plain or paged) or a data-parallel
// replica. What the three share: building the model and the optimizer, and their state.
class AdamWEngine : public StepEngine {
 public:
  absl::Status SaveState(CheckpointState* state) override {
    SHOAL_ASSIGN_OR_RETURN(state->optimizer, OptimizerState());
    state->model = model_->NamedParameters();
    return absl::OkStatus();
  }
  absl::Status LoadState(const NamedTensors& model, const NamedTensors& optimizer) override {
    SHOAL_RETURN_IF_ERROR(model_->LoadParameters(model));
    return optimizer_->LoadStateDict(optimizer);
  }
  int64_t optimizer_steps() const override { return optimizer_->steps(); }
  int64_t StateBytesOnDisk() const override {
    return optimizer_->moment_store() != nullptr ? OnDisk(*optimizer_->moment_store()) : 0;
  }
  const parallel::AdamW* adamw() const override { return optimizer_.get(); }

 protected:
  using StepEngine::StepEngine;
  virtual absl::StatusOr<NamedTensors> OptimizerState() { return optimizer_->StateDict(); }
  // The model (its buffers padded so `world` ranks own equal, cache-line-aligned ZeRO-1 shards),
  // its activation plan, and AdamW over its two groups.
  absl::Status Build(int world, int rank, memory::StatePager* pager, parallel::Shard shard,
                     std::function<absl::StatusOr<parallel::MomentOffload>()> offload) {
    SHOAL_RETURN_IF_ERROR(CatchTorch("building the model", [&] {
      model_ = std::make_unique<Gpt>(config_.model, config_.train.seed,
                                     16 * static_cast<int64_t>(world), pager);
    }));
    SHOAL_RETURN_IF_ERROR(UseKernels(*model_));
    SHOAL_RETURN_IF_ERROR(PlanActivations(rank));
    SHOAL_ASSIGN_OR_RETURN(parallel::MomentOffload moments, offload());
    return CatchTorch("building the optimizer", [&] {
      optimizer_ = std::make_unique<parallel::AdamW>(
          ParamGroupsOf(*model_), AdamWOptionsOf(config_.optim), shard, std::move(moments));
    });
  }
  std::unique_ptr<parallel::AdamW> optimizer_;
};

// ---------------------------------------------------------------------------------------------
// One process.

class SingleProcessEngine final : public AdamWEngine {
 public:
  SingleProcessEngine(const Config& config, const parallel::BatchPlan& batch)
      : AdamWEngine(config, batch) {}
  absl::Status Init() {
    return Build(1, 0, nullptr, {}, [&] { return MomentOffloadOf(config_, *model_, 0); });
  }

  absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) override {
    StepStats stats;
    stats.lr = LearningRate(step);
    model_->ZeroGrad();
    const float scale = batch_.loss_scale();
    for (const auto& [x, y] : micro) stats.loss += model_->ForwardBackward(x, y, scale);
    stats.loss /= batch_.step_micro_batches;
    stats.grad_norm = LocalGradNorm(*model_);
    optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
    return stats;
  }
};

// ---------------------------------------------------------------------------------------------
// One process, states paged (memory/model_pager.h).

class PagedEngine final : public AdamWEngine {
 public:
  PagedEngine(const Config& config, const parallel::BatchPlan& batch)
      : AdamWEngine(config, batch) {}
  absl::Status Init() {
    memory::ModelPagerOptions o;
    o.budget_bytes = memory::PagedStateBudget(BudgetOf(config_),
                                              GptNoDecayParameters(ShapeOf(config_.model)));
    o.disk_directory = config_.memory.disk_path;
    o.disk_budget_bytes = config_.memory.disk_budget.bytes;
    pager_ = std::make_unique<memory::ModelPager>(o);
    // The moments follow the pager's chunks and take its share of the budget.
    SHOAL_RETURN_IF_ERROR(Build(1, 0, pager_.get(), {}, [&] {
      parallel::MomentOffload m;
      m.chunk_elements = pager_->chunk_elements();
      m.host_budget_bytes = pager_->moment_budget_bytes();
      m.disk_directory = config_.memory.disk_path;
      m.disk_budget_bytes = config_.memory.disk_budget.bytes;
      m.residency = pager_.get();
      return absl::StatusOr<parallel::MomentOffload>(m);
    }));
    pager_->SetMomentStore(optimizer_->moment_store());
    if (config_.optim.grad_clip <= 0) {
      // No clipping, so a chunk's update needs only its own gradients: step each decay chunk as
      // the last micro-batch's backward finalises it (moment chunk c is parameter chunk c: the
      // decay group comes first and the moments use the pager's chunks).
      parallel::AdamW* opt = optimizer_.get();
      pager_->SetOnGradientsFinal([opt](int chunk) { opt->StepChunk(chunk); });
      in_backward_ = true;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) override {
    StepStats stats;
    stats.lr = LearningRate(step);
    pager_->BeginStep();
    model_->ZeroGrad();
    // The optimizer inside backward: its step begins before the last micro-batch's backward
    // steps the chunks it finishes; FinishStep below does the rest.
    if (in_backward_) optimizer_->BeginStep(stats.lr, /*grad_scale=*/1.0);
    const float scale = batch_.loss_scale();
    for (size_t m = 0; m < micro.size(); ++m) {
      pager_->BeginMicroBatch(m + 1 == micro.size());
      stats.loss += model_->ForwardBackward(micro[m].first, micro[m].second, scale);
    }
    stats.loss /= batch_.step_micro_batches;
    // The decay gradients' block sums were taken as backward finished each chunk.
    stats.grad_norm = std::sqrt(parallel::GlobalSumSquares(
        {model_->grads(Gpt::kNoDecay).flat()}, pager_->DecayGradSumSquares()));
    if (in_backward_) {
      optimizer_->FinishStep();
    } else {
      optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
    }
    return stats;
  }

  // Paged states are never all in RAM: stream them from the chunk stores into the files, the
  // parameters read through the pager, the moments through the optimizer's store.
  absl::Status SaveState(CheckpointState* state) override {
    for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
      const memory::FlatBuffer& params = model_->params(g);
      for (const memory::FlatBuffer::Entry& e : params.entries()) {
        // Offsets in bytes within the tensor; whole floats, as the writer asks for.
        const int64_t base = e.offset;
        std::function<absl::Status(int64_t, int64_t, char*)> read;
        if (g == Gpt::kDecay) {
          memory::ModelPager* pager = pager_.get();
          read = [pager, base](int64_t offset, int64_t bytes, char* out) {
            return pager->ReadParams(base + offset / 4, bytes / 4, reinterpret_cast<float*>(out));
          };
        } else {
          const float* flat = params.flat().data_ptr<float>();
          read = [flat, base](int64_t offset, int64_t bytes, char* out) {
            std::memcpy(out, flat + base + offset / 4, bytes);
            return absl::OkStatus();
          };
        }
        state->model_stream.push_back({e.name, at::kFloat, e.shape, std::move(read)});
        parallel::AdamW* opt = optimizer_.get();
        for (bool second : {false, true}) {
          state->optimizer_stream.push_back(
              {parallel::MomentName(second, e.name), at::kFloat, e.shape,
               [opt, g, second, base](int64_t offset, int64_t bytes, char* out) {
                 return opt->ReadMoments(g, second, base + offset / 4, bytes / 4,
                                         reinterpret_cast<float*>(out));
               }});
        }
      }
    }
    const int64_t steps = optimizer_->steps();
    state->optimizer_stream.push_back(
        {"step", at::kLong, {}, [steps](int64_t, int64_t bytes, char* out) {
           std::memcpy(out, &steps, bytes);
           return absl::OkStatus();
         }});
    return absl::OkStatus();
  }

  uint64_t ParameterHash() override {
    // The paged buffers are never all resident: hash the parameters read through the pager.
    std::vector<at::Tensor> values;
    for (auto& [name, v] : model_->NamedParameters()) values.push_back(std::move(v));
    return parallel::HashTensors(values);
  }
  int64_t StateBytesOnDisk() const override {
    return OnDisk(pager_->store()) + AdamWEngine::StateBytesOnDisk();
  }
  std::optional<MemoryPlanFigures> MemoryPlan() const override {
    if (!pager_->plan().has_value()) return std::nullopt;
    MemoryPlanFigures f;
    f.predicted_step_seconds = pager_->plan()->step_seconds;
    f.predicted_peak_host_bytes = pager_->plan()->peak_bytes;
    f.host_budget_bytes = pager_->warmup_profile().chunk_budget_bytes;
    const memory::TieredChunkStore& m = *optimizer_->moment_store();
    f.state_bytes = static_cast<int64_t>(pager_->store().num_chunks()) *
                        pager_->store().chunk_bytes() +
                    static_cast<int64_t>(m.num_chunks()) * m.chunk_bytes();
    return f;
  }
  const memory::ModelPager* pager() const override { return pager_.get(); }

 private:
  // Constructed before the model (which lays its buffers out through it) and, as a member of
  // this class, destroyed before it and the optimizer; it holds the buffers' storage, so the
  // homes of its store outlive it either way.
  std::unique_ptr<memory::ModelPager> pager_;
  bool in_backward_ = false;  // AdamW steps chunk by chunk inside backward
};

// ---------------------------------------------------------------------------------------------
// A data-parallel replica.

class DataParallelEngine final : public AdamWEngine {
 public:
  DataParallelEngine(const Config& config, const parallel::BatchPlan& batch, comm::Backend* group)
      : AdamWEngine(config, batch), group_(group) {}

  absl::Status Init() {
    const int world = group_->size(), rank = group_->rank();
    const bool zero1 = config_.parallel.zero == 1;
    SHOAL_RETURN_IF_ERROR(Build(world, rank, nullptr,
                                zero1 ? parallel::Shard{rank, world} : parallel::Shard{},
                                [&] { return MomentOffloadOf(config_, *model_, rank); }));
    parallel::DataParallelOptions dpo;
    dpo.bucket_bytes = static_cast<int64_t>(config_.parallel.bucket_mb * (1 << 20));
    dpo.zero1 = zero1;
    dpo.collective = Collective();
    return CatchTorch("building the data-parallel sync", [&] {
      dp_ = std::make_unique<parallel::DataParallel>(
          group_, std::vector<memory::FlatBuffer*>{&model_->params(0), &model_->params(1)},
          std::vector<memory::FlatBuffer*>{&model_->grads(0), &model_->grads(1)},
          model_->BackwardReadyOrder(), dpo);
    });
  }

  absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) override {
    StepStats stats;
    stats.lr = LearningRate(step);
    model_->ZeroGrad();
    // Parameters report as backward finishes them, so buckets launch early.
    const std::function<void(int)> on_piece_done = [this](int piece) {
      for (const auto& [g, e] : model_->PieceParams(piece)) dp_->OnParamReady(g, e);
    };
    const float scale = batch_.loss_scale();
    for (size_t m = 0; m < micro.size(); ++m) {
      dp_->BeginMicroBatch(m + 1 == micro.size());
      stats.loss += model_->ForwardBackward(micro[m].first, micro[m].second, scale, on_piece_done);
    }
    stats.loss *= static_cast<double>(batch_.replicas) / batch_.step_micro_batches;
    SHOAL_RETURN_IF_ERROR(dp_->FinishGradients());
    SHOAL_ASSIGN_OR_RETURN(stats.grad_norm, dp_->GradNorm());
    optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
    SHOAL_RETURN_IF_ERROR(dp_->FinishStep());
    // The group's mean of each replica's replicas / M share is the mean over all M.
    SHOAL_ASSIGN_OR_RETURN(stats.loss, dp_->Mean(stats.loss));
    // The gradient buffers (padding included) go through a ring all-reduce.
    const int w = batch_.replicas;
    int64_t bytes = 0;
    for (int g : {Gpt::kDecay, Gpt::kNoDecay}) bytes += model_->grads(g).flat().nbytes();
    stats.bytes_sent = stats.bytes_received = 2 * (w - 1) * bytes / w;
    return stats;
  }

 protected:
  absl::StatusOr<NamedTensors> OptimizerState() override {
    // Under ZeRO-1 every rank takes part in gathering the sharded state.
    if (optimizer_->shard().count > 1) return optimizer_->GatherStateDict(group_);
    return optimizer_->StateDict();
  }

 private:
  comm::Backend* group_;
  std::unique_ptr<parallel::DataParallel> dp_;
};

// ---------------------------------------------------------------------------------------------
// DeMo.

constexpr char kDemoDeltaPrefix[] = "demo.delta.";

class DemoEngine final : public StepEngine {
 public:
  DemoEngine(const Config& config, const parallel::BatchPlan& batch, comm::Backend* group)
      : StepEngine(config, batch), group_(group) {}

  absl::Status Init() {
    const int world = group_ != nullptr ? group_->size() : 1;
    const int rank = group_ != nullptr ? group_->rank() : 0;
    SHOAL_RETURN_IF_ERROR(CatchTorch("building the model", [&] {
      model_ = std::make_unique<Gpt>(config_.model, config_.train.seed,
                                     16 * static_cast<int64_t>(world));
    }));
    SHOAL_RETURN_IF_ERROR(UseKernels(*model_));
    SHOAL_RETURN_IF_ERROR(PlanActivations(rank));
    // Every replica keeps its own residual and exchanges top-k DCT coefficients of it; there is
    // no gradient all-reduce and no AdamW state.
    SHOAL_ASSIGN_OR_RETURN(const parallel::DemoOptions o, DemoOptionsOf(config_.optim));
    SHOAL_ASSIGN_OR_RETURN(demo_, parallel::Demo::Create(ParamGroupsOf(*model_), o));
    if (world > 1) exchange_ = parallel::MakeBackendExchange(group_, Collective());
    return absl::OkStatus();
  }

  absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) override {
    StepStats stats;
    stats.lr = LearningRate(step);
    model_->ZeroGrad();
    // Each replica's own mean gradient over its micro-batches: DeMo never averages gradients.
    const float scale = 1.0f / static_cast<float>(micro.size());
    for (const auto& [x, y] : micro) stats.loss += model_->ForwardBackward(x, y, scale);
    // The local, unsynchronised gradient is clipped, as the reference does.
    stats.grad_norm = LocalGradNorm(*model_);
    const double clip = parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip);
    if (exchange_ == nullptr) {
      stats.loss /= static_cast<double>(micro.size());
      const at::Tensor payload = demo_->Compress(stats.lr, clip);
      SHOAL_RETURN_IF_ERROR(demo_->Apply({payload}, stats.lr));
      return stats;
    }
    SHOAL_RETURN_IF_ERROR(demo_->Step(stats.lr, clip, exchange_.get()));
    // A ring all-gather: every rank sends and receives everybody else's payload once.
    stats.bytes_sent = stats.bytes_received =
        demo_->last_traffic().received - demo_->last_traffic().sent;
    // The logged loss is the mean over every replica's micro-batches (shares may be uneven).
    at::Tensor loss =
        at::tensor({stats.loss, static_cast<double>(micro.size())}, at::kDouble);
    SHOAL_RETURN_IF_ERROR(group_->AllReduce(loss, comm::ReduceOp::kSum, Collective())->Wait());
    stats.loss = loss[0].item<double>() / loss[1].item<double>();
    const int every = config_.optim.demo_drift_check;
    if (every > 0 && (step + 1) % every == 0) {
      SHOAL_RETURN_IF_ERROR(
          parallel::CheckReplicasAgree(group_, ParameterHash(), step + 1, Collective()));
    }
    return stats;
  }

  absl::Status SaveState(CheckpointState* state) override {
    // Every replica's residual differs and is worth keeping: the checkpoint holds all of them as
    // "demo.r<replica>.delta.<param>", so a resume with the same replicas continues exactly.
    const int w = group_ != nullptr ? group_->size() : 1;
    for (const auto& [name, t] : demo_->StateDict()) {
      if (!absl::StartsWith(name, kDemoDeltaPrefix)) {
        state->optimizer.emplace_back(name, t.clone());
        continue;
      }
      const std::string param = name.substr(sizeof(kDemoDeltaPrefix) - 1);
      at::Tensor all = t.contiguous().view({1, -1});
      if (w > 1) {
        all = at::empty({w, t.numel()}, t.options());
        SHOAL_RETURN_IF_ERROR(group_->AllGather(all, t.contiguous().view(-1), Collective())->Wait());
      }
      for (int r = 0; r < w; ++r) {
        state->optimizer.emplace_back(absl::StrCat("demo.r", r, ".delta.", param),
                                      all[r].view(t.sizes()));
      }
    }
    state->model = model_->NamedParameters();
    return absl::OkStatus();
  }

  absl::Status LoadState(const NamedTensors& model, const NamedTensors& optimizer) override {
    const int replica = group_ != nullptr ? group_->rank() : 0;
    const std::string own = absl::StrCat("demo.r", replica, ".delta.");
    NamedTensors mine, first;
    for (const auto& [name, t] : optimizer) {
      if (name == "demo.step") {
        mine.emplace_back(name, t);
        first.emplace_back(name, t);
      } else if (absl::StartsWith(name, own)) {
        mine.emplace_back(kDemoDeltaPrefix + name.substr(own.size()), t);
      } else if (absl::StartsWith(name, "demo.r0.delta.")) {
        first.emplace_back(kDemoDeltaPrefix + name.substr(sizeof("demo.r0.delta.") - 1),
                           at::zeros_like(t));
      }
    }
    if (mine.size() <= 1 && first.size() > 1) {
      // A replica the checkpoint did not have (the run resumed on more ranks) starts from a zero
      // residual, as a worker joining a DeMo run does; it needs only the parameters.
      SHOAL_LOG(Warning) << "rank " << replica << ": the checkpoint holds no DeMo residual for "
                         << "this replica; starting it from zero";
      mine = std::move(first);
    }
    // The optimizer state is checked before the parameters change.
    SHOAL_RETURN_IF_ERROR(demo_->LoadStateDict(mine));
    return model_->LoadParameters(model);
  }

  int64_t optimizer_steps() const override { return demo_->steps(); }
  const parallel::Demo* demo() const override { return demo_.get(); }

 private:
  comm::Backend* group_;  // null: one process
  std::unique_ptr<parallel::Demo> demo_;
  std::unique_ptr<parallel::DemoExchange> exchange_;  // null for one process
};

template <typename Engine, typename... Args>
absl::StatusOr<std::unique_ptr<StepEngine>> Make(Args&&... args) {
  auto e = std::make_unique<Engine>(std::forward<Args>(args)...);
  SHOAL_RETURN_IF_ERROR(e->Init());
  return std::unique_ptr<StepEngine>(std::move(e));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// StepEngine

absl::StatusOr<parallel::DemoOptions> DemoOptionsOf(const OptimConfig& c) {
  parallel::DemoOptions o;
  o.codec.chunk = c.demo_chunk;
  o.codec.topk = c.demo_topk;
  SHOAL_ASSIGN_OR_RETURN(o.codec.wire_dtype, parallel::DemoWireDtype(c.demo_wire));
  o.decay = c.demo_decay;
  o.weight_decay = c.demo_weight_decay;
  return o;
}

parallel::AdamWOptions AdamWOptionsOf(const OptimConfig& o) {
  parallel::AdamWOptions opt;
  opt.beta1 = o.beta1;
  opt.beta2 = o.beta2;
  opt.eps = o.eps;
  opt.weight_decay = o.weight_decay;
  return opt;
}

StepEngine::~StepEngine() = default;

double StepEngine::LearningRate(int64_t step) const {
  return LearningRateAt(step, config_.optim, config_.train.steps);
}

comm::CollectiveOptions StepEngine::Collective() const {
  return comm::CollectiveOptions{absl::Seconds(config_.parallel.timeout_s)};
}

double StepEngine::FlopsPerToken() const { return model_->FlopsPerToken(); }

absl::Status StepEngine::PlanActivations(int rank) {
  absl::StatusOr<std::string> line = std::string();
  SHOAL_RETURN_IF_ERROR(CatchTorch("planning activations", [&] {
    line = ApplyActivationPlan(config_, batch_.micro_batch_size, rank, *model_);
  }));
  SHOAL_ASSIGN_OR_RETURN(activation_plan_, std::move(line));
  return absl::OkStatus();
}

absl::Status StepEngine::UseKernels(Gpt& model) const {
  SHOAL_ASSIGN_OR_RETURN(const Compute compute,
                         ParseCompute(config_.train.kernels, config_.train.dtype));
  model.SetKernels(compute.kernels);
  return CatchTorch("setting the compute type", [&] { model.SetPrecision(compute.precision); });
}

absl::StatusOr<double> StepEngine::EvaluateLoss(const Batches& batches) {
  double total = 0;
  for (const auto& [x, y] : batches) total += model_->Loss(x, y);
  return total / static_cast<double>(batches.size());
}

uint64_t StepEngine::ParameterHash() {
  return parallel::HashTensors(
      {model_->params(Gpt::kDecay).flat(), model_->params(Gpt::kNoDecay).flat()});
}

absl::StatusOr<std::unique_ptr<StepEngine>> BuildSingleProcessEngine(
    const Config& config, const parallel::BatchPlan& batch) {
  return Make<SingleProcessEngine>(config, batch);
}

absl::StatusOr<std::unique_ptr<StepEngine>> BuildPagedEngine(const Config& config,
                                                             const parallel::BatchPlan& batch) {
  return Make<PagedEngine>(config, batch);
}

absl::StatusOr<std::unique_ptr<StepEngine>> BuildDataParallelEngine(
    const Config& config, const parallel::BatchPlan& batch, comm::Backend* group) {
  return Make<DataParallelEngine>(config, batch, group);
}

absl::StatusOr<std::unique_ptr<StepEngine>> BuildDemoEngine(const Config& config,
                                                            const parallel::BatchPlan& batch,
                                                            comm::Backend* group) {
  return Make<DemoEngine>(config, batch, group);
}

EngineContext SingleProcessContext(const Config& config) {
  EngineContext c;
  c.batch = parallel::BatchPlan::Even(config.train.batch_size, config.train.grad_accum, 0, 1);
  c.layout.micro_batch_size = config.train.batch_size;
  c.layout.micro_batches = config.train.grad_accum;
  c.layout.end_block = config.model.n_layer;
  return c;
}

absl::StatusOr<std::unique_ptr<StepEngine>> BuildStepEngine(const Config& config,
                                                            const EngineContext& context) {
  const parallel::Layout& layout = context.layout;
  const int world = context.world != nullptr ? context.world->size() : 1;
  const bool demo = config.optim.name == "demo";
  if (layout.model_parallel()) {
    if (demo) {
      // ValidateConfig refuses tp/pp > 1 with DeMo; a coordinator's layout can still ask for it.
      return absl::FailedPreconditionError(absl::StrCat(
          "optim.name = \"demo\" runs over data parallelism only, but the layout is tp = ",
          layout.shape.tp, ", pp = ", layout.shape.pp,
          " (give the coordinator parallel.tp = 1 and parallel.pp = 1, or use AdamW)"));
    }
    SHOAL_ASSIGN_OR_RETURN(
        std::unique_ptr<parallel::Mesh> mesh,
        parallel::Mesh::Create(context.world, layout.shape, context.store,
                               absl::Seconds(config.parallel.timeout_s), &layout.coord));
    return BuildMeshEngine(config, context.batch, layout, context.layout_from_coordinator,
                           std::move(mesh), context.throttle);
  }
  const GptShape shape = ShapeOf(config.model);
  const bool paged = memory::PlaceStates(BudgetOf(config), GptDecayParameters(shape),
                                         GptNoDecayParameters(shape)) ==
                     memory::StatePlacement::kPaged;
  if (paged && (world > 1 || demo)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "memory.host_budget = ", config.memory.host_budget.text, " (",
        config.memory.host_budget.bytes, " bytes) cannot hold the parameters and gradients (",
        8 * GptParameters(shape), " bytes): paging them to memory.disk_path needs one process "
        "with AdamW for now (", world, " ranks, optim ", config.optim.name, ")"));
  }
  if (demo) return BuildDemoEngine(config, context.batch, world > 1 ? context.world : nullptr);
  if (world > 1) return BuildDataParallelEngine(config, context.batch, context.world);
  if (paged) return BuildPagedEngine(config, context.batch);
  return BuildSingleProcessEngine(config, context.batch);
}

}  // namespace shoal::runtime
