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

StepEngine::StepEngine(const Config& config) : config_(config) {
  model_ = std::make_unique<Gpt>(config.model, config.train.seed);
  parallel::AdamWOptions opt;
  opt.beta1 = config.optim.beta1;
  opt.beta2 = config.optim.beta2;
  opt.eps = config.optim.eps;
  opt.weight_decay = config.optim.weight_decay;
  optimizer_ = std::make_unique<parallel::AdamW>(
      std::vector<parallel::ParamGroup>{
          {&model_->params(Gpt::kDecay), &model_->grads(Gpt::kDecay), true},
          {&model_->params(Gpt::kNoDecay), &model_->grads(Gpt::kNoDecay), false}},
      opt);
}

StepStats StepEngine::Step(int64_t step,
                           const std::vector<std::pair<at::Tensor, at::Tensor>>& micro) {
  StepStats stats;
  stats.lr = LearningRateAt(step, config_.optim, config_.train.steps);
  model_->ZeroGrad();
  const float loss_scale = 1.0f / static_cast<float>(micro.size());
  for (const auto& [x, y] : micro) stats.loss += model_->ForwardBackward(x, y, loss_scale);
  stats.loss /= static_cast<double>(micro.size());
  stats.grad_norm = parallel::GlobalL2Norm(
      {model_->grads(Gpt::kDecay).flat(), model_->grads(Gpt::kNoDecay).flat()});
  optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
  return stats;
}

// ---------------------------------------------------------------------------------------------
// Trainer

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const Config& config,
                                                          const TrainOptions& options) {
  SHOAL_RETURN_IF_ERROR(ValidateConfig(config));
  std::unique_ptr<Trainer> t(new Trainer(config, options));
  const Config& c = t->config_;

  // 1. Thread pools: set by shoal, not left to chance (see device_probe.h).
  const ThreadPlan plan = ChooseThreadPlan(c.model, c.train.omp_threads, c.train.blas_threads);
  SHOAL_RETURN_IF_ERROR(ApplyThreadPlan(plan));
  t->omp_threads_ = plan.omp_threads;
  t->blas_threads_ = plan.blas_threads;
  if (options.log) {
    SHOAL_LOG(Info) << "threads: OpenMP " << plan.omp_threads << ", BLAS " << plan.blas_threads
                    << " (" << plan.reason << "); BLAS: " << DescribeBlas();
  }

  // 2. Data: token files, validated against the model's vocabulary and context.
  SHOAL_ASSIGN_OR_RETURN(t->data_, OpenTokenDataset(c.data.dir, c.model.vocab_size,
                                                    c.model.block_size, c.data.verify_checksums));
  BatchSpec spec;
  spec.batch_size = c.train.batch_size;
  spec.block_size = c.model.block_size;
  spec.grad_accum = c.train.grad_accum;
  t->train_sampler_ = std::make_unique<BatchSampler>(*t->data_.train, c.train.seed, spec);
  t->val_sampler_ = std::make_unique<BatchSampler>(*t->data_.val, c.train.seed, spec);

  // 3-4. Model and optimizer.
  t->engine_ = std::make_unique<StepEngine>(c);
  if (options.log) {
    SHOAL_LOG(Info) << "model: GPT " << c.model.n_layer << " layers, " << c.model.n_head
                    << " heads, width " << c.model.n_embd << ", context " << c.model.block_size
                    << ", vocab " << c.model.vocab_size << ": "
                    << t->engine_->model().NumParameters() << " parameters";
    SHOAL_LOG(Info) << "data: " << c.data.dir << ": " << t->data_.train->size() << " train / "
                    << t->data_.val->size() << " val tokens";
  }

  // 5. Checkpoints and resume.
  t->checkpoints_ = std::make_unique<CheckpointStore>(ResolvedCheckpointDir(c), c.checkpoint.keep);
  if (options.resume) SHOAL_RETURN_IF_ERROR(t->Resume());

  // 6. Metrics: MFU denominator and the JSONL file.
  SHOAL_ASSIGN_OR_RETURN(t->peak_gflops_, PeakGflops());
  if (!options.bench) {
    SHOAL_RETURN_IF_ERROR(MakeDirs(c.train.out_dir));
    SHOAL_ASSIGN_OR_RETURN(MetricsFile m, MetricsFile::Open(c.train.out_dir + "/metrics.jsonl"));
    t->metrics_.emplace(std::move(m));
  }
  return t;
}

absl::Status Trainer::Resume() {
  std::vector<std::string> skipped;
  SHOAL_ASSIGN_OR_RETURN(std::optional<CheckpointState> state, checkpoints_->LoadLatest(&skipped));
  for (const std::string& s : skipped) SHOAL_LOG(Warning) << "skipping checkpoint " << s;
  if (!state) {
    SHOAL_LOG(Warning) << "--resume: no valid checkpoint under " << checkpoints_->root()
                       << "; starting from step 0";
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
  SHOAL_LOG(Info) << "resumed from " << checkpoints_->root() << " at step " << start_step_;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::SaveCheckpoint(int64_t step) {
  CheckpointState state;
  state.step = step;
  state.config_toml = config_.ToToml();
  // The sampler is counter-based: (seed, step) is the whole RNG state of the run.
  state.rng = {{"seed", config_.train.seed}, {"sampler", "splitmix64(seed, global sample index)"}};
  state.data = {{"next_step", step},
                {"dir", config_.data.dir},
                {"train_tokens", data_.train->size()},
                {"val_tokens", data_.val->size()}};
  state.model = engine_->model().NamedParameters();
  state.optimizer = engine_->optimizer().StateDict();
  return checkpoints_->Save(state);
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
  const int64_t tokens_per_step = static_cast<int64_t>(c.train.batch_size) * c.train.grad_accum *
                                  c.model.block_size;

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
    if (options_.stop_requested != nullptr && options_.stop_requested->load()) {
      result.stopped_early = true;
      SHOAL_LOG(Warning) << "stop requested: checkpointing at step " << step << " and exiting";
      break;
    }
    const Clock::time_point t0 = Clock::now();
    for (int m = 0; m < c.train.grad_accum; ++m) {
      train_sampler_->TrainBatch(step, m, micro[m].first.data_ptr<int64_t>(),
                                 micro[m].second.data_ptr<int64_t>());
    }
    SHOAL_RETURN_IF_ERROR(CatchTorch("training step", [&] { stats = engine_->Step(step, micro); }));
    const double dt = Seconds(t0, Clock::now());
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
    if (done % c.train.log_every == 0 || done == end_step) {
      TrainLogRecord r;
      r.step = done;
      r.total_steps = c.train.steps;
      r.loss = interval_loss / interval_steps;
      r.lr = stats.lr;
      r.grad_norm = stats.grad_norm;
      r.tokens_per_s = tokens_per_step * interval_steps / interval_compute_s;
      r.mfu = r.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9);
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
    result.mfu = result.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9);
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
