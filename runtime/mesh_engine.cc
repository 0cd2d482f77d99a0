// The step engine of a rank of a tensor x pipeline x data-parallel mesh (BuildMeshEngine in
// runtime/step_engine.h), and MeshStage, this rank's model stage as the pipeline executor drives
// it.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/gpt_arithmetic.h"
#include "common/status.h"
#include "parallel/adamw.h"
#include "parallel/data_parallel.h"
#include "parallel/mesh.h"
#include "parallel/pipeline_schedule.h"
#include "runtime/model_state.h"
#include "runtime/profiler.h"
#include "runtime/step_engine.h"

namespace shoal::runtime {
namespace {

// The tag of the tied-embedding gradient exchange on the pipeline group; the executor's tags
// stay below it (parallel/pipeline_executor.cc).
constexpr int kTiedEmbeddingTag = 0x7ffffff0;

// ---------------------------------------------------------------------------------------------
// MeshStage: this rank's model chunks as the pipeline executor drives them.

class MeshStage final : public parallel::StageCompute {
 public:
  // `chunks`: this rank's model chunks, chunk c at index c (not owned).
  MeshStage(std::vector<Gpt*> chunks, int64_t batch, int64_t seq, double throttle)
      : chunks_(std::move(chunks)), batch_(batch), seq_(seq), throttle_(throttle) {}

  // The micro-batches of the next RunStep / RunForward (kept by pointer; must outlive it).
  void Begin(const Batches* batches, float loss_scale) {
    batches_ = batches;
    loss_scale_ = loss_scale;
    loss_sum_ = 0;
  }
  double loss_sum() const { return loss_sum_; }

  at::Tensor Forward(int chunk, int micro_batch, int slot, const at::Tensor& input) override {
    Gpt& model = Chunk(chunk);
    const auto& [x, y] = Batch(micro_batch);
    MicroBatch mb{&y, x.size(0), x.size(1), slot};
    const WorkClock work = WorkClock::Start();
    at::Tensor out = model.StageForward(model.has_embedding() ? x : input, mb);
    if (model.has_head()) {
      loss_sum_ += out.item<double>();
      out = at::Tensor();
    }
    throttle_.After(work);
    return out;
  }

  at::Tensor Backward(int chunk, int micro_batch, int slot,
                      const at::Tensor& grad_output) override {
    Gpt& model = Chunk(chunk);
    Batch(micro_batch);
    const WorkClock work = WorkClock::Start();
    at::Tensor g = model.StageBackward(model.has_head() ? at::Tensor() : grad_output,
                                       loss_scale_, slot);
    throttle_.After(work);
    return g;
  }

  std::vector<int64_t> ActivationShape() const override {
    return {batch_, seq_, chunks_.front()->config().n_embd};
  }

 private:
  Gpt& Chunk(int chunk) const {
    TORCH_CHECK(chunk >= 0 && static_cast<size_t>(chunk) < chunks_.size(),
                "pipeline stage asked for chunk ", chunk, " of ", chunks_.size());
    return *chunks_[chunk];
  }
  const std::pair<at::Tensor, at::Tensor>& Batch(int micro_batch) const {
    TORCH_CHECK(batches_ != nullptr && micro_batch >= 0 &&
                    static_cast<size_t>(micro_batch) < batches_->size(),
                "pipeline stage asked for micro-batch ", micro_batch, " of ",
                batches_ == nullptr ? 0 : batches_->size());
    return (*batches_)[micro_batch];
  }

  std::vector<Gpt*> chunks_;
  int64_t batch_, seq_;
  Throttle throttle_;
  const Batches* batches_ = nullptr;
  float loss_scale_ = 1;
  double loss_sum_ = 0;
};

// ---------------------------------------------------------------------------------------------
// MeshEngine

class MeshEngine final : public StepEngine {
 public:
  MeshEngine(const Config& config, const parallel::BatchPlan& batch,
             std::unique_ptr<parallel::Mesh> mesh)
      : StepEngine(config, batch), mesh_(std::move(mesh)) {}

  // Blocks [first, end) of each of this rank's chunks: the layout's, or from the config.
  absl::Status Init(const parallel::Layout& layout, bool from_coordinator, double throttle) {
    const parallel::MeshShape& shape = mesh_->shape();
    const int n_layer = config_.model.n_layer, s = mesh_->coord().pp;
    // A coordinator's layout gives one chunk per rank; the config may give several.
    const int chunks = from_coordinator ? 1 : layout.virtual_stages;
    const int model_stages = shape.pp * chunks;
    std::vector<std::pair<int, int>> ranges;
    if (from_coordinator) {
      ranges.emplace_back(layout.first_block, layout.end_block);
    } else {
      SHOAL_ASSIGN_OR_RETURN(
          const std::vector<int> blocks,
          parallel::BlocksPerStage(config_.parallel.stages, n_layer, model_stages));
      for (int c = 0; c < chunks; ++c) ranges.push_back(parallel::StageRange(blocks, c * shape.pp + s));
    }
    stage_blocks_ = ranges.front();
    TensorParallel tp;
    tp.group = mesh_->tp();
    tp.timeout = absl::Seconds(config_.parallel.timeout_s);
    for (int c = 0; c < chunks; ++c) {
      const int j = c * shape.pp + s;
      const int first_piece = j == 0 ? 0 : ranges[c].first + 1;
      const int end_piece = j == model_stages - 1 ? n_layer + 2 : ranges[c].second + 1;
      SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Gpt> chunk,
                             Gpt::CreateStage(config_.model, config_.train.seed, first_piece,
                                              end_piece, /*pad_multiple=*/16, tp));
      SHOAL_RETURN_IF_ERROR(UseKernels(*chunk));
      if (c == 0) {
        model_ = std::move(chunk);
      } else {
        more_chunks_.push_back(std::move(chunk));
      }
    }
    // One optimizer and one data-parallel sync over every chunk's two flat buffers.
    std::vector<parallel::ParamGroup> groups;
    std::vector<memory::FlatBuffer*> params, grads;
    std::vector<std::pair<int, int>> ready;
    const std::vector<Gpt*> all = chunks_();
    for (size_t c = 0; c < all.size(); ++c) {
      Gpt& m = *all[c];
      groups.push_back({&m.params(Gpt::kDecay), &m.grads(Gpt::kDecay), true});
      groups.push_back({&m.params(Gpt::kNoDecay), &m.grads(Gpt::kNoDecay), false});
      for (int g = 0; g < 2; ++g) {
        params.push_back(&m.params(g));
        grads.push_back(&m.grads(g));
      }
      for (const auto& [g, entry] : m.BackwardReadyOrder()) {
        ready.emplace_back(static_cast<int>(2 * c) + g, entry);
      }
    }
    // What the step reads from the chunks, found once (the views stay valid: flat buffers never
    // move). The gradient norm counts every element of the model once: replicated parameters on
    // tensor-parallel rank 0 only, the head's copy of the tied wte not at all, one replica only.
    for (Gpt* chunk : all) {
      holds_head_ = holds_head_ || chunk->has_head();
      const bool wte_copy = chunk->has_head() && !chunk->has_embedding();
      const std::vector<ShardSpec> specs = chunk->ShardSpecs();
      const auto named = chunk->NamedGradients();
      for (size_t i = 0; i < named.size(); ++i) {
        const bool tied = named[i].first == "wte.weight";
        if (tied && shape.pp > 1 && chunk->has_embedding() != chunk->has_head()) {
          tied_wte_.push_back({named[i].second, chunk->has_embedding() ? shape.pp - 1 : 0});
        }
        if (mesh_->coord().dp != 0 || (specs[i].dim < 0 && chunk->tp_rank() != 0) ||
            (wte_copy && tied)) {
          continue;
        }
        counted_grads_.push_back(named[i].second);
      }
    }
    optimizer_ = std::make_unique<parallel::AdamW>(std::move(groups), AdamWOptionsOf(config_.optim));
    if (mesh_->dp() != nullptr) {
      parallel::DataParallelOptions dpo;
      dpo.bucket_bytes = static_cast<int64_t>(config_.parallel.bucket_mb * (1 << 20));
      dpo.collective = Collective();
      dp_ = std::make_unique<parallel::DataParallel>(mesh_->dp(), params, grads, ready, dpo);
      ready_order_ = std::move(ready);
    }
    SHOAL_RETURN_IF_ERROR(Throttle::CheckFactor(throttle, "throttle"));
    stage_ = std::make_unique<MeshStage>(all, batch_.micro_batch_size, config_.model.block_size,
                                         throttle);
    const parallel::ScheduleKind kind = chunks > 1 ? parallel::ScheduleKind::kInterleaved1F1B
                                        : config_.parallel.schedule == "gpipe"
                                            ? parallel::ScheduleKind::kGPipe
                                            : parallel::ScheduleKind::k1F1B;
    SHOAL_ASSIGN_OR_RETURN(
        parallel::PipelineSchedule schedule,
        parallel::MakeSchedule(kind, shape.pp, batch_.micro_batches, chunks));
    parallel::PipelineExecutorOptions xo;
    xo.transfer.timeout = absl::Seconds(config_.parallel.timeout_s);
    SHOAL_ASSIGN_OR_RETURN(executor_, parallel::PipelineExecutor::Create(
                                          mesh_->pp(), std::move(schedule), stage_.get(), xo));
    return absl::OkStatus();
  }

  absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) override {
    StepStats stats;
    stats.lr = LearningRate(step);
    for (Gpt* chunk : chunks_()) chunk->ZeroGrad();
    stage_->Begin(&micro, batch_.loss_scale());
    SHOAL_RETURN_IF_ERROR(executor_->RunStep([this] { return ReduceGradients(); }));
    // Global gradient norm and the loss in one world all-reduce: each gradient element counted
    // once (counted_grads_), the loss from the last stage of each replica.
    const double norm = parallel::GlobalL2Norm(counted_grads_);
    const double loss_part = holds_head_ && model_->tp_rank() == 0
                                 ? stage_->loss_sum() / batch_.step_micro_batches
                                 : 0.0;
    at::Tensor v = at::tensor({norm * norm, loss_part}, at::kDouble);
    SHOAL_RETURN_IF_ERROR(WorldSum(v));
    stats.grad_norm = std::sqrt(v[0].item<double>());
    stats.loss = v[1].item<double>();
    optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
    if (dp_) SHOAL_RETURN_IF_ERROR(dp_->FinishStep());
    // The pipeline's and tensor-parallel transfers are not counted.
    stats.bytes_sent = stats.bytes_received = -1;
    return stats;
  }

  absl::StatusOr<double> EvaluateLoss(const Batches& batches) override {
    stage_->Begin(&batches, 1.0f);
    SHOAL_RETURN_IF_ERROR(executor_->RunForward(static_cast<int>(batches.size())));
    const bool reports = holds_head_ && model_->tp_rank() == 0 && mesh_->coord().dp == 0;
    at::Tensor v = at::full({1}, reports ? stage_->loss_sum() / batches.size() : 0.0, at::kDouble);
    SHOAL_RETURN_IF_ERROR(WorldSum(v));
    return v.item<double>();
  }

  absl::Status SaveState(CheckpointState* state) override {
    const bool contributes = mesh_->coord().dp == 0;
    SHOAL_ASSIGN_OR_RETURN(state->model, GatherModelWide(mesh_->world(), contributes,
                                                         ShardedParameters(const_chunks()),
                                                         Collective()));
    SHOAL_ASSIGN_OR_RETURN(
        state->optimizer,
        GatherModelWide(mesh_->world(), contributes,
                        ShardedOptimizerState(const_chunks(), optimizer_->StateDict()),
                        Collective()));
    return absl::OkStatus();
  }

  absl::Status LoadState(const NamedTensors& model, const NamedTensors& optimizer) override {
    // Check the optimizer state before anything changes.
    SHOAL_ASSIGN_OR_RETURN(NamedTensors mine, SliceOptimizerState(const_chunks(), optimizer));
    for (Gpt* chunk : chunks_()) SHOAL_RETURN_IF_ERROR(chunk->LoadParameters(model));
    return optimizer_->LoadStateDict(mine);
  }

  int64_t optimizer_steps() const override { return optimizer_->steps(); }
  double FlopsPerToken() const override { return GptFlopsPerToken(ShapeOf(config_.model)); }
  parallel::PipelineStepTiming pipeline_timing() const override {
    return executor_->last_timing();
  }
  const parallel::AdamW* adamw() const override { return optimizer_.get(); }
  const parallel::Mesh* mesh() const override { return mesh_.get(); }
  std::pair<int, int> stage_blocks() const override { return stage_blocks_; }

 private:
  // This rank's model chunks: model_ and, under an interleaved schedule, the others.
  std::vector<Gpt*> chunks_() const {
    std::vector<Gpt*> out{model_.get()};
    for (const auto& c : more_chunks_) out.push_back(c.get());
    return out;
  }
  std::vector<const Gpt*> const_chunks() const {
    std::vector<const Gpt*> out;
    for (Gpt* c : chunks_()) out.push_back(c);
    return out;
  }

  absl::Status WorldSum(at::Tensor& v) {
    if (mesh_->world() == nullptr) return absl::OkStatus();
    return mesh_->world()->AllReduce(v, comm::ReduceOp::kSum, Collective())->Wait();
  }

  // After the rank's last backward (the executor's ReduceGrads action).
  absl::Status ReduceGradients() {
    // The tied embedding: the first model stage's wte (embedding) and the last one's copy (head)
    // each hold part of the gradient; both add the other's. a + b == b + a exactly, so the two
    // copies stay bit-identical.
    for (const auto& [grad, peer] : tied_wte_) {
      at::Tensor mine = grad.clone();
      at::Tensor theirs = at::empty_like(grad);
      std::unique_ptr<comm::Work> send = mesh_->pp()->Send(mine, peer, kTiedEmbeddingTag, Collective());
      std::unique_ptr<comm::Work> recv =
          mesh_->pp()->Recv(theirs, peer, kTiedEmbeddingTag, Collective());
      absl::Status r = recv->Wait();
      absl::Status w = send->Wait();
      SHOAL_RETURN_IF_ERROR(r);
      SHOAL_RETURN_IF_ERROR(w);
      grad.add_(theirs);
    }
    if (dp_) {
      dp_->BeginMicroBatch(true);
      for (const auto& [g, e] : ready_order_) dp_->OnParamReady(g, e);
      SHOAL_RETURN_IF_ERROR(dp_->FinishGradients());
    }
    return absl::OkStatus();
  }

  std::unique_ptr<parallel::Mesh> mesh_;
  std::pair<int, int> stage_blocks_{0, 0};
  std::vector<std::unique_ptr<Gpt>> more_chunks_;  // chunks 1 .. v-1 (interleaved); 0 is model_
  std::unique_ptr<parallel::AdamW> optimizer_;
  std::unique_ptr<parallel::DataParallel> dp_;
  std::vector<std::pair<int, int>> ready_order_;  // (group over all chunks, entry)
  std::unique_ptr<MeshStage> stage_;
  std::unique_ptr<parallel::PipelineExecutor> executor_;
  // Found once at creation: the gradient views the global norm counts (each element of the model
  // once across the mesh), the tied-wte gradient views with the pipeline rank holding the other
  // copy, and whether this rank computes the loss.
  std::vector<at::Tensor> counted_grads_;
  std::vector<std::pair<at::Tensor, int>> tied_wte_;
  bool holds_head_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<StepEngine>> BuildMeshEngine(
    const Config& config, const parallel::BatchPlan& batch, const parallel::Layout& layout,
    bool layout_from_coordinator, std::unique_ptr<parallel::Mesh> mesh, double throttle) {
  auto e = std::make_unique<MeshEngine>(config, batch, std::move(mesh));
  SHOAL_RETURN_IF_ERROR(e->Init(layout, layout_from_coordinator, throttle));
  return std::unique_ptr<StepEngine>(std::move(e));
}

}  // namespace shoal::runtime
