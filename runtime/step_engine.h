// StepEngine: one optimizer step of one worker over explicit micro-batches, whatever runs it,
// behind one interface. Each way of running a step is its own engine, made by its own builder:
//
//   BuildSingleProcessEngine  one process, AdamW (its moments partly on disk under a host budget)
//   BuildPagedEngine          one process, AdamW, the model states paged to a disk tier
//   BuildDataParallelEngine   a data-parallel replica: AdamW + bucketed all-reduce or ZeRO-1
//   BuildDemoEngine           DeMo (decoupled momentum), one process or replicas
//   BuildMeshEngine           a rank of a tensor x pipeline x data-parallel mesh
//
// and BuildStepEngine picks one for a config and a layout. A new way of running a step (a swarm
// stage, a GPU worker) is a new engine and a new builder; the others do not change.
//
// Every engine zeroes the gradients, runs forward and backward over its micro-batches with the
// loss scaled so that the step is the mean over the step's M micro-batches across all replicas
// (BatchPlan::loss_scale), takes the global gradient norm, clips, and updates at the scheduled
// learning rate (runtime/lr_schedule.h). An engine needs no data files: tests drive it directly.
// Blocking; not thread-safe. In multi-rank engines every rank makes the same calls (Step,
// EvaluateLoss, SaveState and LoadState are collectives over the job's group).
#ifndef SHOAL_RUNTIME_STEP_ENGINE_H_
#define SHOAL_RUNTIME_STEP_ENGINE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/demo.h"
#include "parallel/layout.h"
#include "parallel/pipeline_executor.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/gpt.h"

namespace shoal::memory {
class ModelPager;
class TieredChunkStore;
}  // namespace shoal::memory
namespace shoal::parallel {
class AdamW;
struct AdamWOptions;
class Demo;
class Mesh;
}  // namespace shoal::parallel

namespace shoal::runtime {

// Micro-batches of (tokens, targets), each (B, T) int64.
using Batches = std::vector<std::pair<at::Tensor, at::Tensor>>;

struct StepStats {
  double loss = 0;       // mean over the step's micro-batches (all replicas')
  double grad_norm = 0;  // global L2 norm before clipping
  double lr = 0;
  // What this rank's gradient or optimizer exchange put on the wire this step, in each
  // direction, modelled as the ring algorithms do it: an all-reduce of B bytes over W ranks sends
  // and receives 2(W-1)/W·B; DeMo's all-gather of a T-byte payload (W-1)·T. 0 for one process;
  // -1 where the engine does not count its traffic (a mesh's pipeline and tensor-parallel
  // transfers).
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

// The chunk manager's plan (memory/cost_model.h), for the coordinator.
struct MemoryPlanFigures {
  double predicted_step_seconds = 0;
  int64_t predicted_peak_host_bytes = 0;
  int64_t host_budget_bytes = 0;  // the chunk stores' budgets together
  int64_t state_bytes = 0;        // the paged model states, RAM and disk together
};

class StepEngine {
 public:
  virtual ~StepEngine();

  // One optimizer step `step` (0-based) over this replica's micro-batches. Errors from
  // collectives come back as statuses; a malformed batch throws c10::Error (the Trainer turns
  // that into a status).
  virtual absl::StatusOr<StepStats> Step(int64_t step, const Batches& micro) = 0;
  // Mean loss of the model over `batches` (forward only), the same value on every rank.
  virtual absl::StatusOr<double> EvaluateLoss(const Batches& batches);
  // The whole model's parameters and optimizer state under single-process names into `state`
  // (as tensors, or as streams when they are never all in RAM), on world rank 0; other ranks get
  // nothing.
  virtual absl::Status SaveState(CheckpointState* state) = 0;
  // Loads model-wide parameters and optimizer state (a checkpoint's), keeping this rank's part.
  // The optimizer state is checked before anything changes.
  virtual absl::Status LoadState(const NamedTensors& model, const NamedTensors& optimizer) = 0;
  // Updates taken by the optimizer.
  virtual int64_t optimizer_steps() const = 0;

  // Model FLOPs per token of the whole model (not of this rank's part), for MFU.
  virtual double FlopsPerToken() const;
  // FNV-1a of this rank's parameters: what replicas compare.
  virtual uint64_t ParameterHash();
  // Bytes of model state on the disk tier and not in RAM now (0 without one).
  virtual int64_t StateBytesOnDisk() const { return 0; }
  // The chunk manager's plan, once it has one.
  virtual std::optional<MemoryPlanFigures> MemoryPlan() const { return std::nullopt; }
  // Last step's pipeline timing (zeros outside mesh mode).
  virtual parallel::PipelineStepTiming pipeline_timing() const { return {}; }

  // What the run report describes (null where the engine has none).
  virtual const parallel::AdamW* adamw() const { return nullptr; }
  virtual const parallel::Demo* demo() const { return nullptr; }
  virtual const memory::ModelPager* pager() const { return nullptr; }
  virtual const parallel::Mesh* mesh() const { return nullptr; }
  // Blocks [first, end) of this rank's stage (its first chunk under an interleaved schedule).
  virtual std::pair<int, int> stage_blocks() const { return {0, config_.model.n_layer}; }

  Gpt& model() { return *model_; }
  const Config& config() const { return config_; }
  const parallel::BatchPlan& batch() const { return batch_; }
  // The activation plan's line for the log (empty without memory.activation_budget).
  const std::string& activation_plan() const { return activation_plan_; }

 protected:
  StepEngine(const Config& config, const parallel::BatchPlan& batch)
      : config_(config), batch_(batch) {}
  // The learning rate of step `step`.
  double LearningRate(int64_t step) const;
  comm::CollectiveOptions Collective() const;
  // Applies memory.activation_budget's plan to model_ (keep, recompute or offload per block) and
  // keeps its line for the log. `rank` names the offload tier's file.
  absl::Status PlanActivations(int rank);
  // Sets `model`'s operations and compute type to train.kernels' and train.dtype's
  // (runtime/piece_ops.h).
  absl::Status UseKernels(Gpt& model) const;

  const Config config_;
  const parallel::BatchPlan batch_;
  std::unique_ptr<Gpt> model_;
  std::string activation_plan_;
};

// Builders, one per way of running a step. `config` validated; `batch` this replica's plan.
// Errors name what cannot be built (a budget too small, a bad stage split).
//
// One process: AdamW; with memory.host_budget and memory.disk_path the AdamW moments that do not
// fit stay on a disk tier (memory/state_plan.h).
absl::StatusOr<std::unique_ptr<StepEngine>> BuildSingleProcessEngine(
    const Config& config, const parallel::BatchPlan& batch);
// One process whose parameters and gradients do not fit memory.host_budget: the decay group is
// paged through a memory::ModelPager; AdamW steps chunk by chunk (inside backward without
// clipping).
absl::StatusOr<std::unique_ptr<StepEngine>> BuildPagedEngine(const Config& config,
                                                             const parallel::BatchPlan& batch);
// A replica of `group` (not owned; size > 1): gradients averaged by bucketed all-reduce that
// overlaps backward, or reduce-scattered under ZeRO-1 (parallel.zero = 1).
absl::StatusOr<std::unique_ptr<StepEngine>> BuildDataParallelEngine(
    const Config& config, const parallel::BatchPlan& batch, comm::Backend* group);
// DeMo (optim.name = "demo"): each replica of `group` (null: one process) keeps its own momentum
// and exchanges its top-k DCT components; no gradient all-reduce, no AdamW.
absl::StatusOr<std::unique_ptr<StepEngine>> BuildDemoEngine(const Config& config,
                                                            const parallel::BatchPlan& batch,
                                                            comm::Backend* group);
// Model parallelism: this rank's pipeline stage (the layout's blocks; from the config,
// parallel.virtual_stages chunks of it under the interleaved schedule, chunk c being model stage
// c * pp + stage) and tensor-parallel shard, driven through parallel.schedule by a pipeline
// executor over mesh->pp(), the tied wte's gradients summed between the first and the last stage
// and averaged over mesh->dp(). `throttle` >= 1 slows every forward and backward of this stage
// by that factor (runtime/profiler.h). `mesh` is owned by the engine.
absl::StatusOr<std::unique_ptr<StepEngine>> BuildMeshEngine(
    const Config& config, const parallel::BatchPlan& batch, const parallel::Layout& layout,
    bool layout_from_coordinator, std::unique_ptr<parallel::Mesh> mesh, double throttle);

// For the builders and the swarm's stages: AdamW's options from [optim].
parallel::AdamWOptions AdamWOptionsOf(const OptimConfig& optim);
// DeMo's options from the config's optim.demo_* keys; kInvalidArgument for an unknown wire dtype.
absl::StatusOr<parallel::DemoOptions> DemoOptionsOf(const OptimConfig& optim);

// Where a step engine runs: the job's group and the layout it follows.
struct EngineContext {
  comm::Backend* world = nullptr;        // the job's group (not owned); null: one process
  std::shared_ptr<comm::Store> store;    // its rendezvous store (the mesh's groups need it)
  parallel::Layout layout;               // this rank's place (validated)
  bool layout_from_coordinator = false;  // the coordinator's, not the config's
  parallel::BatchPlan batch;             // this replica's share of the batch
  double throttle = 1.0;                 // mesh mode: see BuildMeshEngine
};

// The engine for `config` in `context`: a mesh when the layout has tp or pp > 1, DeMo under
// optim.name = "demo", data parallelism over several ranks, else one process, paged when the
// states do not fit memory.host_budget (memory/state_plan.h). kFailedPrecondition for what no
// engine runs (DeMo with model parallelism, paging with several ranks or DeMo).
absl::StatusOr<std::unique_ptr<StepEngine>> BuildStepEngine(const Config& config,
                                                            const EngineContext& context);
// The context of one process: the config's batch, no group.
EngineContext SingleProcessContext(const Config& config);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_STEP_ENGINE_H_
