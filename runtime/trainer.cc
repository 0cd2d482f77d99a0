#include "runtime/trainer.h"

#include <ATen/ATen.h>
#include <sys/resource.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "runtime/device_probe.h"
#include "runtime/lr_schedule.h"
#include "runtime/profiler.h"

namespace shoal::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Runs `fn`, turning a LibTorch exception into a status at the edge of runtime/.
template <typename Fn>
absl::Status CatchTorch(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// StepEngine

StepEngine::StepEngine(const Config& config, comm::Backend* backend)
    : config_(config), backend_(backend) {
  const int world = backend != nullptr ? backend->size() : 1;
  const int rank = backend != nullptr ? backend->rank() : 0;
  // Buffers padded so N ranks own equal, cache-line-aligned shards (ZeRO-1).
  model_ = std::make_unique<Gpt>(config.model, config.train.seed, 16 * static_cast<int64_t>(world));
  parallel::AdamWOptions opt;
  opt.beta1 = config.optim.beta1;
  opt.beta2 = config.optim.beta2;
  opt.eps = config.optim.eps;
  opt.weight_decay = config.optim.weight_decay;
  const bool zero1 = config.parallel.zero == 1 && world > 1;
  optimizer_ = std::make_unique<parallel::AdamW>(
      std::vector<parallel::ParamGroup>{
          {&model_->params(Gpt::kDecay), &model_->grads(Gpt::kDecay), true},
          {&model_->params(Gpt::kNoDecay), &model_->grads(Gpt::kNoDecay), false}},
      opt, zero1 ? parallel::Shard{rank, world} : parallel::Shard{});
  if (world > 1) {
    parallel::DataParallelOptions dpo;
    dpo.bucket_bytes = static_cast<int64_t>(config.parallel.bucket_mb * (1 << 20));
    dpo.zero1 = zero1;
    dpo.collective.timeout = absl::Seconds(config.parallel.timeout_s);
    dp_ = std::make_unique<parallel::DataParallel>(
        backend, std::vector<memory::FlatBuffer*>{&model_->params(0), &model_->params(1)},
        std::vector<memory::FlatBuffer*>{&model_->grads(0), &model_->grads(1)},
        model_->BackwardReadyOrder(), dpo);
  }
}

absl::StatusOr<StepStats> StepEngine::Step(
    int64_t step, const std::vector<std::pair<at::Tensor, at::Tensor>>& micro) {
  StepStats stats;
  stats.lr = LearningRateAt(step, config_.optim, config_.train.steps);
  model_->ZeroGrad();
  const float loss_scale = 1.0f / static_cast<float>(micro.size());
  // Data parallel: parameters report as backward finishes them, so buckets launch early.
  std::function<void(int)> on_piece_done;
  if (dp_) {
    on_piece_done = [this](int piece) {
      for (const auto& [g, e] : model_->PieceParams(piece)) dp_->OnParamReady(g, e);
    };
  }
  for (size_t m = 0; m < micro.size(); ++m) {
    if (dp_) dp_->BeginMicroBatch(m + 1 == micro.size());
    stats.loss += model_->ForwardBackward(micro[m].first, micro[m].second, loss_scale, on_piece_done);
  }
  stats.loss /= static_cast<double>(micro.size());
  if (dp_) {
    SHOAL_RETURN_IF_ERROR(dp_->FinishGradients());
    SHOAL_ASSIGN_OR_RETURN(stats.grad_norm, dp_->GradNorm());
  } else {
    stats.grad_norm = parallel::GlobalL2Norm(
        {model_->grads(Gpt::kDecay).flat(), model_->grads(Gpt::kNoDecay).flat()});
  }
  optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
  if (dp_) {
    SHOAL_RETURN_IF_ERROR(dp_->FinishStep());
    SHOAL_ASSIGN_OR_RETURN(stats.loss, dp_->Mean(stats.loss));
  }
  return stats;
}

absl::StatusOr<NamedTensors> StepEngine::OptimizerState() {
  if (optimizer_->shard().count > 1) return optimizer_->GatherStateDict(backend_);
  return optimizer_->StateDict();
}

// ---------------------------------------------------------------------------------------------
// Trainer

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
  const ThreadPlan plan = ChooseThreadPlan(c.model, c.train.omp_threads, c.train.blas_threads);
  SHOAL_RETURN_IF_ERROR(ApplyThreadPlan(plan));
  t->omp_threads_ = plan.omp_threads;
  t->blas_threads_ = plan.blas_threads;
  if (options.log) {
    SHOAL_LOG(Info) << "threads: OpenMP " << plan.omp_threads << ", BLAS " << plan.blas_threads
                    << " (" << plan.reason << "); BLAS: " << DescribeBlas();
  }

  if (options.throttle > 1.0) {
    SHOAL_LOG(Info) << "throttle: rank " << t->rank_ << " sleeps " << options.throttle - 1.0
                    << " x its compute time after every step (a deliberately slow device)";
  }

  // 2. Data: token files, validated against the model's vocabulary and context.
  SHOAL_ASSIGN_OR_RETURN(t->data_, OpenTokenDataset(c.data.dir, c.model.vocab_size,
                                                    c.model.block_size, c.data.verify_checksums));
  BatchSpec spec;
  spec.batch_size = c.train.batch_size;
  spec.block_size = c.model.block_size;
  spec.grad_accum = c.train.grad_accum;
  spec.dp_rank = t->rank_;
  spec.dp_size = t->world_;
  t->train_sampler_ = std::make_unique<BatchSampler>(*t->data_.train, c.train.seed, spec);
  t->val_sampler_ = std::make_unique<BatchSampler>(*t->data_.val, c.train.seed, spec);

  // 3-4. Model and optimizer.
  t->engine_ = std::make_unique<StepEngine>(c, options.backend);
  if (t->options_.log) {
    SHOAL_LOG(Info) << "model: GPT " << c.model.n_layer << " layers, " << c.model.n_head
                    << " heads, width " << c.model.n_embd << ", context " << c.model.block_size
                    << ", vocab " << c.model.vocab_size << ": "
                    << t->engine_->model().NumParameters() << " parameters";
    SHOAL_LOG(Info) << "data: " << c.data.dir << ": " << t->data_.train->size() << " train / "
                    << t->data_.val->size() << " val tokens";
    if (t->world_ > 1) {
      SHOAL_LOG(Info) << "data parallel: " << t->world_ << " ranks over "
                      << options.backend->name() << ", "
                      << (c.parallel.zero == 1 ? "ZeRO-1 (sharded optimizer state)"
                                               : "bucketed all-reduce")
                      << ", global batch " << t->world_ * c.train.batch_size * c.train.grad_accum
                      << " sequences";
    }
  }

  // 5. Checkpoints and resume.
  t->checkpoints_ = std::make_unique<CheckpointStore>(ResolvedCheckpointDir(c), c.checkpoint.keep);
  if (options.resume) SHOAL_RETURN_IF_ERROR(t->Resume());

  // 6. Metrics: MFU denominator and the JSONL file.
  // Rank 0 measures (or reads the cache) while the others wait in the broadcast, so ranks
  // sharing a host do not measure at once and see half the machine each.
  if (t->rank_ == 0) {
    SHOAL_ASSIGN_OR_RETURN(t->peak_gflops_, PeakGflops());
  }
  if (t->world_ > 1) {
    at::Tensor peak = at::full({1}, t->peak_gflops_, at::kDouble);
    SHOAL_RETURN_IF_ERROR(
        options.backend->Broadcast(peak, 0, {absl::Seconds(c.parallel.timeout_s)})->Wait());
    t->peak_gflops_ = peak.item<double>();
  }
  if (!options.bench && t->rank_ == 0) {
    SHOAL_RETURN_IF_ERROR(MakeDirs(c.train.out_dir));
    SHOAL_ASSIGN_OR_RETURN(MetricsFile m, MetricsFile::Open(c.train.out_dir + "/metrics.jsonl"));
    t->metrics_.emplace(std::move(m));
  }
  return t;
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
    const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(lo, comm::ReduceOp::kMin, co)->Wait());
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(hi, comm::ReduceOp::kMax, co)->Wait());
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
  // The checkpoint must be of the same model: compare its [model] section with ours.
  SHOAL_ASSIGN_OR_RETURN(Config saved, ParseConfig(state->config_toml, "checkpoint manifest"));
  const ModelConfig& a = saved.model;
  const ModelConfig& b = config_.model;
  if (a.n_layer != b.n_layer || a.n_head != b.n_head || a.n_embd != b.n_embd ||
      a.block_size != b.block_size || a.vocab_size != b.vocab_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint step ", state->step, " under ", checkpoints_->root(),
        " is of another model ([model] differs from ", config_.source, ")"));
  }
  if (state->step > config_.train.steps) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint is at step ", state->step,
                                                      " but train.steps is ",
                                                      config_.train.steps));
  }
  SHOAL_RETURN_IF_ERROR(engine_->model().LoadParameters(state->model));
  SHOAL_RETURN_IF_ERROR(engine_->optimizer().LoadStateDict(state->optimizer));
  if (engine_->optimizer().steps() != state->step) {
    return absl::DataLossError(absl::StrCat("checkpoint step ", state->step,
                                            " disagrees with its optimizer step count ",
                                            engine_->optimizer().steps()));
  }
  start_step_ = state->step;
  if (options_.log) SHOAL_LOG(Info) << "resumed from " << checkpoints_->root() << " at step " << start_step_;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::SaveCheckpoint(int64_t step) {
  // Under ZeRO-1 every rank takes part in gathering the optimizer state.
  SHOAL_ASSIGN_OR_RETURN(NamedTensors optimizer_state, engine_->OptimizerState());
  std::string path;
  if (rank_ == 0) {
    CheckpointState state;
    state.step = step;
    state.config_toml = config_.ToToml();
    // The sampler is counter-based: (seed, step) is the whole RNG state of the run.
    state.rng = {{"seed", config_.train.seed},
                 {"sampler", "splitmix64(seed, global sample index)"}};
    state.data = {{"next_step", step},
                  {"dir", config_.data.dir},
                  {"train_tokens", data_.train->size()},
                  {"val_tokens", data_.val->size()},
                  {"dp_size", world_}};
    state.model = engine_->model().NamedParameters();
    state.optimizer = std::move(optimizer_state);
    SHOAL_ASSIGN_OR_RETURN(path, checkpoints_->Save(state));
  }
  if (world_ > 1) {
    // Nobody runs ahead (or exits) before the checkpoint is on disk.
    SHOAL_RETURN_IF_ERROR(
        options_.backend->Barrier({absl::Seconds(config_.parallel.timeout_s)})->Wait());
  }
  return path;
}

double Trainer::Evaluate() {
  const int b = config_.train.batch_size, t = config_.model.block_size;
  at::Tensor x = at::empty({b, t}, at::kLong), y = at::empty({b, t}, at::kLong);
  double total = 0;
  for (int i = 0; i < config_.train.eval_batches; ++i) {
    val_sampler_->ValBatch(i, config_.train.eval_batches, x.data_ptr<int64_t>(),
                           y.data_ptr<int64_t>());
    total += engine_->model().Loss(x, y);
  }
  return total / config_.train.eval_batches;
}

absl::StatusOr<TrainResult> Trainer::Run() {
  const Config& c = config_;
  TrainResult result;
  result.first_step = start_step_;
  result.peak_gflops = peak_gflops_;
  result.omp_threads = omp_threads_;
  result.blas_threads = blas_threads_;
  const int64_t end_step =
      options_.stop_after > 0 ? std::min(c.train.steps, start_step_ + options_.stop_after)
                              : c.train.steps;
  const double flops_per_token = engine_->model().FlopsPerToken();
  const int64_t rank_tokens_per_step =
      static_cast<int64_t>(c.train.batch_size) * c.train.grad_accum * c.model.block_size;
  const int64_t tokens_per_step = rank_tokens_per_step * world_;
  const Throttle throttle(options_.throttle);
  // Every rank must stop at the same step, so a stop request is agreed on collectively.
  auto stop_agreed = [&]() -> absl::StatusOr<bool> {
    const bool local = options_.stop_requested != nullptr && options_.stop_requested->load();
    if (world_ == 1) return local;
    at::Tensor flag = at::full({1}, local ? 1.0 : 0.0, at::kDouble);
    SHOAL_RETURN_IF_ERROR(options_.backend
                              ->AllReduce(flag, comm::ReduceOp::kMax,
                                          {absl::Seconds(c.parallel.timeout_s)})
                              ->Wait());
    return flag.item<double>() > 0;
  };

  // Micro-batch buffers, filled in place each step.
  std::vector<std::pair<at::Tensor, at::Tensor>> micro(c.train.grad_accum);
  for (auto& [x, y] : micro) {
    x = at::empty({c.train.batch_size, c.model.block_size}, at::kLong);
    y = at::empty({c.train.batch_size, c.model.block_size}, at::kLong);
  }

  auto eval = [&](int64_t step) -> absl::Status {
    double val = 0;
    SHOAL_RETURN_IF_ERROR(CatchTorch("validation", [&] { val = Evaluate(); }));
    if (result.first_val_loss < 0) result.first_val_loss = val;
    result.last_val_loss = val;
    if (options_.log) SHOAL_LOG(Info) << "step " << step << " | val loss " << val;
    if (metrics_) metrics_->Write({{"kind", "val"}, {"step", step}, {"val_loss", val}});
    return absl::OkStatus();
  };
  if (!options_.bench && start_step_ == 0) SHOAL_RETURN_IF_ERROR(eval(0));

  const Clock::time_point run_start = Clock::now();
  Clock::time_point interval_start = run_start;
  double interval_compute_s = 0, interval_loss = 0, timed_s = 0;
  int64_t interval_steps = 0, timed_steps = 0;
  StepStats stats;
  int64_t step = start_step_;
  for (; step < end_step; ++step) {
    SHOAL_ASSIGN_OR_RETURN(const bool stop, stop_agreed());
    if (stop) {
      result.stopped_early = true;
      if (options_.log) SHOAL_LOG(Warning) << "stop requested: checkpointing at step " << step << " and exiting";
      break;
    }
    const Clock::time_point t0 = Clock::now();
    for (int m = 0; m < c.train.grad_accum; ++m) {
      train_sampler_->TrainBatch(step, m, micro[m].first.data_ptr<int64_t>(),
                                 micro[m].second.data_ptr<int64_t>());
    }
    absl::Status step_status;
    SHOAL_RETURN_IF_ERROR(CatchTorch("training step", [&] {
      auto r = engine_->Step(step, micro);
      if (r.ok()) stats = *r;
      else step_status = r.status();
    }));
    SHOAL_RETURN_IF_ERROR(step_status);
    const double compute_s = Seconds(t0, Clock::now());
    const double dt = compute_s + throttle.After(compute_s);
    if (!std::isfinite(stats.loss)) {
      return absl::AbortedError(absl::StrCat("loss is ", stats.loss, " at step ", step,
                                             "; lower optim.lr or check the data"));
    }
    result.losses.push_back(stats.loss);
    interval_compute_s += dt;
    interval_loss += stats.loss;
    ++interval_steps;
    if (step - start_step_ >= options_.bench_warmup_steps || !options_.bench) {
      timed_s += dt;
      ++timed_steps;
    }
    const int64_t done = step + 1;
    if (options_.on_step) {
      options_.on_step({done, stats.loss, stats.lr,
                        dt > 0 ? static_cast<double>(rank_tokens_per_step) / dt : 0.0, dt});
    }
    if (done % c.train.log_every == 0 || done == end_step) {
      TrainLogRecord r;
      r.step = done;
      r.total_steps = c.train.steps;
      r.loss = interval_loss / interval_steps;
      r.lr = stats.lr;
      r.grad_norm = stats.grad_norm;
      r.tokens_per_s = tokens_per_step * interval_steps / interval_compute_s;
      r.mfu = r.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9 * options_.nodes);
      r.elapsed_s = Seconds(run_start, Clock::now());
      r.eta_s = Seconds(interval_start, Clock::now()) / interval_steps * (c.train.steps - done);
      if (options_.log) SHOAL_LOG(Info) << FormatTrainLine(r);
      if (metrics_) {
        metrics_->Write({{"kind", "train"},     {"step", done},
                         {"loss", r.loss},      {"lr", r.lr},
                         {"grad_norm", r.grad_norm}, {"tokens_per_s", r.tokens_per_s},
                         {"mfu", r.mfu},        {"elapsed_s", r.elapsed_s},
                         {"eta_s", r.eta_s},    {"step_loss", stats.loss}});
      }
      interval_start = Clock::now();
      interval_compute_s = interval_loss = 0;
      interval_steps = 0;
    }
    if (options_.bench) continue;
    if (c.train.eval_every > 0 && done % c.train.eval_every == 0 && done != c.train.steps) {
      SHOAL_RETURN_IF_ERROR(eval(done));
    }
    if (c.checkpoint.every > 0 && done % c.checkpoint.every == 0 && done != end_step) {
      SHOAL_ASSIGN_OR_RETURN(result.checkpoint, SaveCheckpoint(done));
      if (options_.log) SHOAL_LOG(Info) << "checkpoint: " << result.checkpoint;
    }
  }
  result.last_step = step;
  if (timed_steps > 0) {
    result.step_time_ms = 1e3 * timed_s / timed_steps;
    result.tokens_per_s = tokens_per_step * timed_steps / timed_s;
    result.mfu = result.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9 * options_.nodes);
  }
  if (!options_.bench) {
    if (step == c.train.steps) SHOAL_RETURN_IF_ERROR(eval(step));
    if (step > start_step_ || result.checkpoint.empty()) {
      SHOAL_ASSIGN_OR_RETURN(result.checkpoint, SaveCheckpoint(step));
      if (options_.log) SHOAL_LOG(Info) << "checkpoint: " << result.checkpoint;
    }
  }
  return result;
}

}  // namespace shoal::runtime
