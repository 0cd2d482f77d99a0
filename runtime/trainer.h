// The training loop of one worker: one process, a data-parallel rank, or a rank of a
// tensor x pipeline x data-parallel mesh (StepEngine::CreateForMesh).
//
// StepEngine: model + AdamW + schedule, one optimizer step over explicit micro-batches
// (zero grads, forward/backward each micro-batch with loss / grad_accum, global grad norm,
// clip, AdamW at the scheduled lr). It needs no data files, so tests drive it directly.
//
// Trainer: everything around it, built in a fixed order: thread pools, data, model, optimizer,
// resume, metrics. Run() loops over steps, logs every train.log_every steps, evaluates every
// train.eval_every steps on a fixed validation set, checkpoints every checkpoint.every steps
// and at the end, and stops early (with a checkpoint) when *stop_requested turns true.
// Blocking; not thread-safe.
#ifndef SHOAL_RUNTIME_TRAINER_H_
#define SHOAL_RUNTIME_TRAINER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "parallel/adamw.h"
#include "parallel/data_parallel.h"
#include "parallel/demo.h"
#include "parallel/mesh.h"
#include "parallel/pipeline_executor.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/gpt.h"
#include "runtime/metrics.h"
#include "runtime/sampler.h"
#include "runtime/token_file.h"

namespace shoal::runtime {

struct StepStats {
  double loss = 0;       // mean over the micro-batches
  double grad_norm = 0;  // global L2 norm before clipping
  double lr = 0;
  // What this rank's gradient or optimizer exchange put on the wire this step, in each
  // direction, modelled as the ring algorithms do it: an all-reduce of B bytes over W ranks sends
  // and receives 2(W-1)/W·B; DeMo's all-gather of a T-byte payload (W-1)·T. 0 for one process.
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

class MeshStage;
class ModelPager;

struct StepReport;

class StepEngine {
 public:
  // `backend`: the data-parallel group (not owned; null or size 1 for a single process).
  explicit StepEngine(const Config& config, comm::Backend* backend = nullptr);
  // Model parallelism: this rank's pipeline stage (blocks from parallel.stages, or an even
  // split; parallel.virtual_stages chunks of it under the interleaved schedule, chunk c being
  // model stage c * pp + stage) and tensor-parallel shard of the model, its micro-batches driven through the
  // parallel.schedule by a PipelineExecutor over mesh->pp(), gradients summed between the two
  // copies of the tied wte (first and last stage) and averaged over mesh->dp(). `throttle` >= 1
  // slows every forward and backward of this stage down by that factor (runtime/profiler.h).
  // Every rank of the mesh makes the same calls (Step, Evaluate, ModelWideState are collectives
  // over the world). Errors: a bad stage split or tp (named), group or executor set-up.
  // `blocks`: this stage's blocks [first, end) when a layout gives them (null: from the config).
  static absl::StatusOr<std::unique_ptr<StepEngine>> CreateForMesh(
      const Config& config, parallel::Mesh* mesh, double throttle = 1.0,
      const std::pair<int, int>* blocks = nullptr);
  ~StepEngine();

  // One optimizer step `step` (0-based) over micro-batches of (tokens, targets), each (B, T)
  // int64. With a data-parallel group: gradients synced (bucketed all-reduce overlapping backward,
  // or ZeRO-1), and the returned loss is the group mean. Errors from collectives come back as
  // statuses; a malformed batch throws c10::Error (the Trainer turns that into a status).
  absl::StatusOr<StepStats> Step(int64_t step,
                                 const std::vector<std::pair<at::Tensor, at::Tensor>>& micro);

  // Full optimizer state (a collective under ZeRO-1: every rank calls it).
  absl::StatusOr<NamedTensors> OptimizerState();

  // Mean loss of the model over `batches` (forward only), the same value on every rank
  // (a collective in mesh mode).
  absl::StatusOr<double> EvaluateLoss(const std::vector<std::pair<at::Tensor, at::Tensor>>& batches);

  // The whole model's parameters and optimizer state under single-process names, assembled on
  // world rank 0 (other ranks get empty lists). A collective over the world in mesh mode.
  absl::Status ModelWideState(NamedTensors* model, NamedTensors* optimizer);
  // Loads model-wide parameters and optimizer state (a checkpoint's), keeping this rank's part.
  absl::Status LoadModelWide(const NamedTensors& model, const NamedTensors& optimizer);

  // Model FLOPs per token of the whole model (not of this stage), for MFU.
  double FlopsPerToken() const;
  // Uneven shares of the batch (the coordinator's plan for replicas of uneven speed): the step's
  // micro-batches over all replicas. 0 (default): every replica runs as many as this one.
  void set_total_micro_batches(int total) { total_micro_batches_ = total; }

  // This rank's data-parallel replica and the number of replicas.
  int dp_rank() const;
  int dp_size() const;
  parallel::Mesh* mesh() { return mesh_; }
  // Blocks [first, end) of this rank's stage (its first chunk under an interleaved schedule).
  std::pair<int, int> stage_blocks() const { return stage_blocks_; }
  // Last step's pipeline timing (mesh mode; zeros otherwise).
  parallel::PipelineStepTiming pipeline_timing() const;

  Gpt& model() { return *model_; }
  // The AdamW optimizer (null under optim.name = "demo") or the DeMo one (null otherwise).
  parallel::AdamW* optimizer() { return optimizer_.get(); }
  parallel::Demo* demo() { return demo_.get(); }
  // Updates taken by whichever optimizer runs.
  int64_t optimizer_steps() const;
  // FNV-1a of this rank's parameter buffers (not in mesh mode): what DeMo's replicas compare.
  uint64_t ParameterHash();
  parallel::DataParallel* data_parallel() { return dp_.get(); }
  // The chunk manager of paged states, or null.
  const ModelPager* pager() const { return pager_.get(); }
  // Bytes of model state (paged parameters and gradients, offloaded moments) on the disk tier
  // and not in RAM now: what the coordinator is told this worker's disk holds.
  int64_t StateBytesOnDisk() const;
  // The model-wide state as streams (paged states, one process): the parameters read through the
  // pager, the moments through the optimizer's store, so a checkpoint never holds them in RAM.
  absl::Status StreamedState(std::vector<TensorSource>* model, std::vector<TensorSource>* optimizer);
  // Fills the plan fields of `report` from the pager's plan (no-op without one).
  void AddMemoryPlan(StepReport* report) const;
  // The activation plan's line for the log (empty without memory.activation_budget).
  const std::string& activation_plan() const { return activation_plan_; }

 private:
  StepEngine(const Config& config, parallel::Mesh* mesh);
  absl::Status DemoStep(int64_t step, int micro_batches, StepStats* stats);
  absl::StatusOr<NamedTensors> GatherDemoState();
  absl::Status LoadDemoState(const NamedTensors& optimizer);
  absl::StatusOr<StepStats> MeshStep(int64_t step,
                                     const std::vector<std::pair<at::Tensor, at::Tensor>>& micro);
  absl::Status ReduceMeshGradients();
  // This rank's model chunks: model_ and, under an interleaved schedule, the others.
  std::vector<Gpt*> chunks() const;
  std::vector<const Gpt*> const_chunks() const;
  int TotalMicroBatches(int mine) const;

  Config config_;
  comm::Backend* backend_;
  std::unique_ptr<Gpt> model_;
  std::unique_ptr<parallel::AdamW> optimizer_;
  std::unique_ptr<parallel::DataParallel> dp_;
  // optim.name = "demo": the DeMo optimizer and its exchange over `backend_` (null for one
  // process); no AdamW and no DataParallel then.
  std::unique_ptr<parallel::Demo> demo_;
  std::unique_ptr<parallel::DemoExchange> exchange_;
  // States paged to disk (memory.host_budget below the parameters and gradients): constructed
  // before the model, destroyed before it (its store's homes are the model's buffers).
  std::unique_ptr<ModelPager> pager_;
  bool optimizer_in_backward_ = false;  // the pager steps AdamW chunk by chunk inside backward
  std::string activation_plan_;
  // Mesh mode.
  parallel::Mesh* mesh_ = nullptr;
  std::pair<int, int> stage_blocks_{0, 0};
  std::vector<std::unique_ptr<Gpt>> more_chunks_;  // chunks 1 .. v-1 (interleaved); 0 is model_
  std::vector<std::pair<int, int>> ready_order_;    // (group over all chunks, entry)
  std::unique_ptr<MeshStage> stage_;
  std::unique_ptr<parallel::PipelineExecutor> executor_;
  // Found once at creation: the gradient views the global norm counts (each element of the model
  // once across the mesh), the tied-wte gradient views with the pipeline rank holding the other
  // copy, and whether this rank computes the loss.
  std::vector<at::Tensor> counted_grads_;
  std::vector<std::pair<at::Tensor, int>> tied_wte_;
  bool holds_head_ = false;
  int total_micro_batches_ = 0;
};

// What the Trainer reports after every step (to the coordinator link, through on_step).
struct StepReport {
  int64_t step = 0;            // steps completed
  double loss = 0;             // this step's loss (the data-parallel group's mean)
  double lr = 0;
  double tokens_per_s = 0;     // this rank's replica: its own tokens / step_seconds
  double step_seconds = 0;     // wall time of the step, throttle sleep included
  int64_t disk_bytes = 0;      // model state now on the disk tier (memory.disk_path), not in RAM
  // The chunk manager's plan (memory/cost_model.h), once it has one: 0s before or without one.
  double predicted_step_seconds = 0;
  int64_t predicted_peak_host_bytes = 0;
  int64_t host_budget_bytes = 0;       // the chunk stores' budgets together
  int64_t state_bytes = 0;             // the paged model states, RAM and disk together
};

struct TrainOptions {
  bool resume = false;                 // continue from the newest valid checkpoint
  int64_t stop_after = 0;              // >0: stop (with a checkpoint) after this many steps
  bool bench = false;                  // no eval, no checkpoints, no metrics file
  int64_t bench_warmup_steps = 3;      // bench: steps excluded from the timing
  bool log = true;                     // print log lines to stderr (rank 0 only)
  // Mesh mode: every rank logs where its pipeline time went at the end (compute, waiting).
  bool log_all_ranks_summary = true;
  const std::atomic<bool>* stop_requested = nullptr;  // e.g. set by SIGTERM
  comm::Backend* backend = nullptr;    // the job's group (not owned); null: one process
  // The job's rendezvous store (this generation's namespace); needed for model parallelism,
  // whose groups are built on it (parallel/mesh.h).
  std::shared_ptr<comm::Store> store;
  // A layout that places this rank (the coordinator's): overrides parallel.tp / pp / stages and
  // the batch plan (train.batch_size becomes its micro-batch size, train.grad_accum this
  // replica's micro-batch count; replicas may have uneven counts, and the step is still the mean
  // over all of the step's micro-batches). One with tp = pp = 1 runs as plain data parallelism.
  std::optional<parallel::MeshPlacement> placement;
  int nodes = 1;                       // hosts in the job, for MFU (each has the measured peak)
  int ranks_on_host = 1;               // ranks sharing this host's cores (thread plan)
  // A deliberate slow-down for heterogeneity tests (>= 1): after each step's compute the
  // trainer sleeps (throttle - 1) x that compute time, so this rank looks `throttle` times
  // slower (runtime/profiler.h, Throttle). Logged tokens/s and step times include the sleep.
  double throttle = 1.0;
  // Called on every rank after every step; must be cheap (copy the values and return).
  std::function<void(const StepReport&)> on_step;
};

struct TrainResult {
  int64_t first_step = 0;              // 0, or the resumed step
  int64_t last_step = 0;               // steps completed at the end
  std::vector<double> losses;          // per step run in this invocation
  double last_val_loss = -1;           // -1 if never evaluated
  double first_val_loss = -1;
  double tokens_per_s = 0;             // over the timed steps
  double step_time_ms = 0;
  double mfu = 0;
  double peak_gflops = 0;
  int omp_threads = 0;
  int blas_threads = 0;
  std::string checkpoint;              // last checkpoint written, if any
  bool stopped_early = false;
};

class Trainer {
 public:
  // Builds the whole worker. Errors: bad data (named file), bad checkpoint when resuming with
  // none valid is NOT an error (starts fresh, logging the skipped ones), thread setup failure.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const Config& config,
                                                          const TrainOptions& options);
  absl::StatusOr<TrainResult> Run();

  // Mean loss over the fixed validation set (a collective in mesh mode).
  absl::StatusOr<double> Evaluate();

  StepEngine& engine() { return *engine_; }

 private:
  Trainer(Config config, TrainOptions options) : config_(std::move(config)), options_(options) {}
  // Checks the layout's places across the job (stages cover the blocks in order, the ranks of a
  // stage agree) and takes its per-replica batch plan. A collective over the job's group.
  absl::Status FollowLayout(const parallel::MeshPlacement& placed);
  absl::Status Resume();
  absl::StatusOr<std::string> SaveCheckpoint(int64_t step);

  Config config_;
  TrainOptions options_;
  TokenDataset data_;
  std::unique_ptr<BatchSampler> train_sampler_;
  std::unique_ptr<BatchSampler> val_sampler_;
  std::unique_ptr<parallel::Mesh> mesh_;
  std::unique_ptr<StepEngine> engine_;
  std::unique_ptr<CheckpointStore> checkpoints_;
  std::optional<MetricsFile> metrics_;
  int64_t start_step_ = 0;
  double peak_gflops_ = 0;
  int omp_threads_ = 0, blas_threads_ = 0;
  int rank_ = 0, world_ = 1;
  // The layout's batch plan: the step's micro-batches over all replicas (0: even shares from the
  // config) and the global index of this replica's first.
  int total_micro_batches_ = 0;
  int micro_offset_ = 0;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_TRAINER_H_
