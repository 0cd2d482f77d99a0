#include "runtime/trainer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "runtime/device_probe.h"
#include "runtime/torch_status.h"
#include "runtime/profiler.h"

namespace shoal::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}


// `count` micro-batches of (batch, seq) int64 tokens and targets, filled in place each step.
Batches MakeBatches(int count, int batch, int seq) {
  Batches out(count);
  for (auto& [x, y] : out) {
    x = at::empty({batch, seq}, at::kLong);
    y = at::empty({batch, seq}, at::kLong);
  }
  return out;
}

// The sampler's view of a batch plan: per replica (even shares from the config), or the step's
// M micro-batches numbered globally as one replica runs them (a coordinator's layout), so the
// windows are those of one process running all M.
BatchSpec SamplerSpec(const parallel::BatchPlan& b, int block_size) {
  BatchSpec spec;
  spec.batch_size = b.micro_batch_size;
  spec.block_size = block_size;
  spec.grad_accum = b.numbered_globally() ? b.step_micro_batches : b.micro_batches;
  spec.dp_rank = b.numbered_globally() ? 0 : b.replica;
  spec.dp_size = b.numbered_globally() ? 1 : b.replicas;
  return spec;
}

// This rank's layout from the config: (tp, pp, dp) over the world with the default numbering,
// its stage's blocks from parallel.stages or an even split.
absl::StatusOr<parallel::Layout> LayoutFromConfig(const Config& c, int rank, int world) {
  parallel::Layout l;
  SHOAL_ASSIGN_OR_RETURN(l.shape, parallel::ShapeForWorld(world, c.parallel.tp, c.parallel.pp));
  l.coord = parallel::CoordOf(l.shape, rank);
  l.virtual_stages = std::max(1, c.parallel.virtual_stages);
  SHOAL_ASSIGN_OR_RETURN(const std::vector<int> blocks,
                         parallel::BlocksPerStage(c.parallel.stages, c.model.n_layer,
                                                  l.shape.pp * l.virtual_stages));
  std::tie(l.first_block, l.end_block) = parallel::StageRange(blocks, l.coord.pp);
  l.micro_batch_size = c.train.batch_size;
  l.micro_batches = c.train.grad_accum;
  return l;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const Config& config,
                                                          const TrainOptions& options) {
  SHOAL_RETURN_IF_ERROR(ValidateConfig(config));
  SHOAL_RETURN_IF_ERROR(Throttle::CheckFactor(options.throttle, "--throttle"));
  std::unique_ptr<Trainer> t(new Trainer(config, options));
  const Config& c = t->config_;
  if (options.backend != nullptr) {
    t->rank_ = options.backend->rank();
    t->world_ = options.backend->size();
  }
  // Only rank 0 talks: log lines, metrics file.
  t->options_.log = options.log && t->rank_ == 0;

  // 1. Thread pools: set by shoal, not left to chance (see device_probe.h).
  const ThreadPlan threads = ChooseThreadPlan(c.model, c.train.omp_threads, c.train.blas_threads,
                                              options.ranks_on_host);
  SHOAL_RETURN_IF_ERROR(ApplyThreadPlan(threads));
  t->omp_threads_ = threads.omp_threads;
  t->blas_threads_ = threads.blas_threads;

  // 2. The layout and its batch plan: the data's order depends on the replica.
  EngineContext context;
  SHOAL_RETURN_IF_ERROR(t->TakeLayout(&context));
  t->batch_ = context.batch;

  // 3. Data: token files, validated against the model's vocabulary and context.
  SHOAL_ASSIGN_OR_RETURN(t->data_, OpenTokenDataset(c.data.dir, c.model.vocab_size,
                                                    c.model.block_size, c.data.verify_checksums));
  const BatchSpec spec = SamplerSpec(t->batch_, c.model.block_size);
  t->train_sampler_ = std::make_unique<BatchSampler>(*t->data_.train, c.train.seed, spec);
  t->val_sampler_ = std::make_unique<BatchSampler>(*t->data_.val, c.train.seed, spec);

  // 4. The step engine: model, optimizer and how they sync (runtime/step_engine.h).
  SHOAL_ASSIGN_OR_RETURN(t->engine_, BuildStepEngine(c, context));

  // 5. Metrics: MFU denominator and the JSONL file. Rank 0 measures (or reads the cache) while
  // the others wait in the broadcast, so ranks sharing a host do not measure at once and see
  // half the machine each.
  if (t->rank_ == 0) {
    // MFU against the peak of the type the matmuls run in (train.dtype).
    SHOAL_ASSIGN_OR_RETURN(const Compute compute, ParseCompute(c.train.kernels, c.train.dtype));
    SHOAL_ASSIGN_OR_RETURN(t->peak_gflops_,
                           PeakGflops(false, compute.precision == Precision::kBf16
                                                 ? GemmType::kBFloat16
                                                 : GemmType::kFloat32));
  }
  if (t->world_ > 1) {
    at::Tensor peak = at::full({1}, t->peak_gflops_, at::kDouble);
    SHOAL_RETURN_IF_ERROR(options.backend->Broadcast(peak, 0, t->Collective())->Wait());
    t->peak_gflops_ = peak.item<double>();
  }
  if (!options.bench && t->rank_ == 0) {
    SHOAL_RETURN_IF_ERROR(MakeDirs(c.train.out_dir));
    SHOAL_ASSIGN_OR_RETURN(MetricsFile m, MetricsFile::Open(c.train.out_dir + "/metrics.jsonl"));
    t->metrics_.emplace(std::move(m));
  }
  RunReportOptions ro;
  ro.log = t->options_.log;
  ro.rank_lines = options.log;
  ro.log_all_ranks_summary = options.log_all_ranks_summary;
  ro.bench = options.bench;
  ro.bench_warmup_steps = options.bench_warmup_steps;
  ro.rank = t->rank_;
  ro.world = t->world_;
  ro.nodes = options.nodes;
  ro.on_step = options.on_step;
  t->report_ = std::make_unique<RunReport>(c, *t->engine_, t->metrics_ ? &*t->metrics_ : nullptr,
                                           std::move(ro));
  t->report_->Describe(threads, options.throttle, options.layout.has_value(),
                       options.backend != nullptr ? options.backend->name() : "", t->data_);

  // 6. Checkpoints and resume.
  t->checkpoints_ = std::make_unique<CheckpointStore>(ResolvedCheckpointDir(c), c.checkpoint.keep);
  if (options.resume) SHOAL_RETURN_IF_ERROR(t->Resume());
  return t;
}

absl::Status Trainer::TakeLayout(EngineContext* context) {
  const Config& c = config_;
  context->world = options_.backend;
  context->store = options_.store;
  context->throttle = options_.throttle;
  if (options_.layout.has_value()) {
    // The coordinator's: every rank checks every rank's place and takes its batch plan.
    context->layout = *options_.layout;
    context->layout_from_coordinator = true;
    SHOAL_RETURN_IF_ERROR(context->layout.Validate(world_, c.model.n_layer));
    SHOAL_ASSIGN_OR_RETURN(context->batch,
                           parallel::AgreeOnLayout(options_.backend, context->layout,
                                                   c.model.n_layer, Collective().timeout));
    return absl::OkStatus();
  }
  SHOAL_ASSIGN_OR_RETURN(context->layout, LayoutFromConfig(c, rank_, world_));
  SHOAL_RETURN_IF_ERROR(context->layout.Validate(world_, c.model.n_layer));
  const parallel::Layout& l = context->layout;
  context->batch =
      parallel::BatchPlan::Even(l.micro_batch_size, l.micro_batches, l.coord.dp, l.shape.dp);
  return absl::OkStatus();
}

comm::CollectiveOptions Trainer::Collective() const {
  return comm::CollectiveOptions{absl::Seconds(config_.parallel.timeout_s)};
}

absl::Status Trainer::Resume() {
  std::vector<std::string> skipped;
  SHOAL_ASSIGN_OR_RETURN(std::optional<CheckpointState> state, checkpoints_->LoadLatest(&skipped));
  if (rank_ == 0) {
    for (const std::string& s : skipped) SHOAL_LOG(Warning) << "skipping checkpoint " << s;
  }
  if (world_ > 1) {
    // Every rank must have picked the same checkpoint (or none).
    const double mine = state ? static_cast<double>(state->step) : -1.0;
    at::Tensor lo = at::full({1}, mine, at::kDouble);
    at::Tensor hi = lo.clone();
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(lo, comm::ReduceOp::kMin, Collective())->Wait());
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(hi, comm::ReduceOp::kMax, Collective())->Wait());
    if (lo.item<double>() != hi.item<double>()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "ranks found different checkpoints to resume from (steps ", lo.item<double>(), " to ",
          hi.item<double>(), "; -1 = none) under ", checkpoints_->root()));
    }
  }
  if (!state) {
    if (options_.log) {
      SHOAL_LOG(Warning) << "--resume: no valid checkpoint under " << checkpoints_->root()
                         << "; starting from step 0";
    }
    return absl::OkStatus();
  }
  // The checkpoint must be of the same model and optimizer, within train.steps.
  SHOAL_RETURN_IF_ERROR(CheckResumable(*state, config_, checkpoints_->root()));
  SHOAL_RETURN_IF_ERROR(engine_->LoadState(state->model, state->optimizer));
  if (engine_->optimizer_steps() != state->step) {
    return absl::DataLossError(absl::StrCat("checkpoint step ", state->step,
                                            " disagrees with its optimizer step count ",
                                            engine_->optimizer_steps()));
  }
  start_step_ = state->step;
  report_->Resumed(checkpoints_->root(), start_step_);
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::SaveCheckpoint(int64_t step) {
  // Under ZeRO-1 every rank takes part in gathering the optimizer state; in mesh mode every
  // rank takes part in assembling the model-wide tensors on rank 0.
  CheckpointState state;
  SHOAL_RETURN_IF_ERROR(engine_->SaveState(&state));
  std::string path;
  if (rank_ == 0) {
    state.step = step;
    state.config_toml = config_.ToToml();
    // The sampler is counter-based: (seed, step) is the whole RNG state of the run.
    state.rng = {{"seed", config_.train.seed},
                 {"sampler", "splitmix64(seed, global sample index)"}};
    state.data = {{"next_step", step},
                  {"dir", config_.data.dir},
                  {"train_tokens", data_.train->size()},
                  {"val_tokens", data_.val->size()},
                  {"dp_size", batch_.replicas}};
    SHOAL_ASSIGN_OR_RETURN(path, checkpoints_->Save(state));
  }
  if (world_ > 1) {
    // Nobody runs ahead (or exits) before the checkpoint is on disk.
    SHOAL_RETURN_IF_ERROR(options_.backend->Barrier(Collective())->Wait());
  }
  return path;
}

absl::StatusOr<double> Trainer::Evaluate() {
  const int n = config_.train.eval_batches;
  Batches batches = MakeBatches(n, batch_.micro_batch_size, config_.model.block_size);
  for (int i = 0; i < n; ++i) {
    val_sampler_->ValBatch(i, n, batches[i].first.data_ptr<int64_t>(),
                           batches[i].second.data_ptr<int64_t>());
  }
  return engine_->EvaluateLoss(batches);
}

absl::StatusOr<bool> Trainer::StopAgreed() {
  const bool local = options_.stop_requested != nullptr && options_.stop_requested->load();
  if (world_ == 1) return local;
  at::Tensor flag = at::full({1}, local ? 1.0 : 0.0, at::kDouble);
  SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(flag, comm::ReduceOp::kMax, Collective())->Wait());
  return flag.item<double>() > 0;
}

absl::StatusOr<StepStats> Trainer::TrainStep(int64_t step, Batches& micro, double* seconds) {
  const Clock::time_point t0 = Clock::now();
  const WorkClock work = WorkClock::Start();
  for (int m = 0; m < batch_.micro_batches; ++m) {
    // This replica's m-th micro-batch: global index first + m under a coordinator's layout.
    const int index = batch_.numbered_globally() ? batch_.first_micro_batch + m : m;
    train_sampler_->TrainBatch(step, index, micro[m].first.data_ptr<int64_t>(),
                               micro[m].second.data_ptr<int64_t>());
  }
  absl::StatusOr<StepStats> stats = absl::InternalError("no step");
  SHOAL_RETURN_IF_ERROR(CatchTorch("training step", [&] { stats = engine_->Step(step, micro); }));
  SHOAL_RETURN_IF_ERROR(stats.status());
  // A deliberately slow rank sleeps after its compute; a mesh stage throttles each forward and
  // backward itself (a slow device delays its neighbours through the pipeline).
  const double compute_s = Seconds(t0, Clock::now());
  const Throttle throttle(engine_->mesh() != nullptr ? 1.0 : options_.throttle);
  *seconds = compute_s + throttle.After(work);
  if (!std::isfinite(stats->loss)) {
    return absl::AbortedError(absl::StrCat("loss is ", stats->loss, " at step ", step,
                                           "; lower optim.lr or check the data"));
  }
  return stats;
}

absl::Status Trainer::EvaluateAndLog(int64_t step, TrainResult* result) {
  absl::StatusOr<double> val = 0.0;
  SHOAL_RETURN_IF_ERROR(CatchTorch("validation", [&] { val = Evaluate(); }));
  SHOAL_RETURN_IF_ERROR(val.status());
  if (result->first_val_loss < 0) result->first_val_loss = *val;
  result->last_val_loss = *val;
  report_->Validation(step, *val);
  return absl::OkStatus();
}

absl::Status Trainer::Checkpoint(int64_t step, TrainResult* result) {
  SHOAL_ASSIGN_OR_RETURN(result->checkpoint, SaveCheckpoint(step));
  report_->Checkpointed(result->checkpoint);
  return absl::OkStatus();
}

absl::StatusOr<TrainResult> Trainer::Run() {
  const TrainConfig& c = config_.train;
  TrainResult result;
  result.first_step = start_step_;
  result.peak_gflops = peak_gflops_;
  result.omp_threads = omp_threads_;
  result.blas_threads = blas_threads_;
  const int64_t end = options_.stop_after > 0 ? std::min(c.steps, start_step_ + options_.stop_after)
                                              : c.steps;
  Batches micro = MakeBatches(batch_.micro_batches, batch_.micro_batch_size,
                              config_.model.block_size);
  if (!options_.bench && start_step_ == 0) SHOAL_RETURN_IF_ERROR(EvaluateAndLog(0, &result));
  report_->Start(start_step_, peak_gflops_);
  int64_t step = start_step_;
  for (; step < end; ++step) {
    SHOAL_ASSIGN_OR_RETURN(const bool stop, StopAgreed());
    if (stop) {
      result.stopped_early = true;
      report_->StopRequested(step);
      break;
    }
    double seconds = 0;
    SHOAL_ASSIGN_OR_RETURN(const StepStats stats, TrainStep(step, micro, &seconds));
    result.losses.push_back(stats.loss);
    const int64_t done = step + 1;
    report_->Step(done, end, stats, seconds);
    if (options_.bench) continue;
    if (c.eval_every > 0 && done % c.eval_every == 0 && done != c.steps) {
      SHOAL_RETURN_IF_ERROR(EvaluateAndLog(done, &result));
    }
    const int every = config_.checkpoint.every;
    if (every > 0 && done % every == 0 && done != end) SHOAL_RETURN_IF_ERROR(Checkpoint(done, &result));
  }
  result.last_step = step;
  const RunTiming timing = report_->Finish(step);
  result.tokens_per_s = timing.tokens_per_s;
  result.step_time_ms = timing.step_time_ms;
  result.mfu = timing.mfu;
  if (!options_.bench) {
    if (step == c.steps) SHOAL_RETURN_IF_ERROR(EvaluateAndLog(step, &result));
    if (step > start_step_ || result.checkpoint.empty()) SHOAL_RETURN_IF_ERROR(Checkpoint(step, &result));
  }
  return result;
}

}  // namespace shoal::runtime
