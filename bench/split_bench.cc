// `shoal bench split`: the layout solver's uneven pipeline split against reality. Two profiles of
// this machine (throttle 1 and throttle F, as two ranks of different speed would report) go into
// scheduler::SplitLayers; the real forward + backward time of the model's pieces is measured at
// both throttles; the uneven split and the uniform one are then compared on the MEASURED times
// with the same pipeline formula (scheduler::PipelineStepSeconds).
// `shoal bench hetero`: the end-to-end figure. The same solver split, then two real ranks train
// as a 2-stage pipeline, rank 1 throttled, with that split and with the uniform one.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_runs.h"
#include "bench/benches.h"
#include "common/file_util.h"
#include "common/status.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/gpt.h"
#include "runtime/profiler.h"
#include "scheduler/layout_solver.h"

namespace shoal::bench {
namespace {

using Clock = std::chrono::steady_clock;


// Wall seconds of forward + backward of each piece of the model over one micro-batch, with
// `throttle` sleeping after each piece's forward and after its backward as the trainer does after
// a step (the throttle is linear, so per piece or per step gives the same stretched time).
struct PieceTimes {
  double embedding = 0;
  double block = 0;   // mean over the blocks
  double head = 0;
};

PieceTimes TimePass(runtime::Gpt& model, const at::Tensor& tokens, const at::Tensor& targets,
                    const runtime::Throttle& throttle) {
  const auto& pieces = model.pieces();
  const int n = static_cast<int>(pieces.size());
  std::vector<double> t(n, 0.0);
  runtime::MicroBatch mb{&targets, tokens.size(0), tokens.size(1)};
  at::Tensor x = tokens;
  for (int p = 0; p < n; ++p) {
    const auto t0 = Clock::now();
    x = pieces[p]->Forward(x, mb);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    t[p] += s + throttle.After(s);
  }
  at::Tensor g = at::ones({}, at::kFloat);  // d(loss)/d(loss)
  for (int p = n - 1; p >= 0; --p) {
    const auto t0 = Clock::now();
    g = pieces[p]->Backward(g);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    t[p] += s + throttle.After(s);
  }
  PieceTimes out;
  out.embedding = t[0];
  out.head = t[n - 1];
  for (int p = 1; p < n - 1; ++p) out.block += t[p];
  out.block /= std::max(1, n - 2);
  return out;
}

// Per piece, the fastest of the runs: the work is deterministic, so the fastest run is the one
// least disturbed by other processes on the machine (medians drift with the machine's load).
PieceTimes FastestTimes(const std::vector<PieceTimes>& runs) {
  PieceTimes best = runs.front();
  for (const PieceTimes& r : runs) {
    best.embedding = std::min(best.embedding, r.embedding);
    best.block = std::min(best.block, r.block);
    best.head = std::min(best.head, r.head);
  }
  return best;
}

// The solver's split of a model over `stages` pipeline stages, the first `fast_stages` on this
// machine as it is and the rest on it throttled by `throttle`, from two device profiles as a fast
// and a slow rank would send them. Per-block time per micro-batch = block FLOPs / (measured GEMM
// rate x the solver's compute efficiency); the head's FLOPs ride on the last stage (the
// embedding is a lookup: no FLOPs in the cost model).
struct ProfiledSplit {
  v1::DeviceProfile fast, slow;
  std::vector<double> predicted_layer, predicted_extra;  // per stage, seconds per micro-batch
  std::vector<int> uneven, uniform;
};

absl::StatusOr<ProfiledSplit> SplitFromProfiles(const runtime::Config& config, int stages,
                                                int fast_stages, double throttle, bool refresh,
                                                double profile_seconds) {
  ProfiledSplit out;
  runtime::ProfileOptions po;
  po.refresh = refresh;
  po.seconds = profile_seconds;
  po.throttle = 1.0;
  SHOAL_ASSIGN_OR_RETURN(out.fast, runtime::ProfileDevice(po));
  po.throttle = throttle;
  SHOAL_ASSIGN_OR_RETURN(out.slow, runtime::ProfileDevice(po));
  const int n_layer = config.model.n_layer;
  v1::ModelSpec spec;
  spec.set_n_layer(n_layer);
  spec.set_n_head(config.model.n_head);
  spec.set_n_embd(config.model.n_embd);
  spec.set_block_size(config.model.block_size);
  spec.set_vocab_size(config.model.vocab_size);
  spec.set_param_bytes(4);
  spec.set_grad_bytes(4);
  spec.set_optimizer_bytes(8);
  const scheduler::ModelCosts costs = scheduler::ComputeModelCosts(spec);
  const scheduler::SolverOptions solver;
  const double tokens = static_cast<double>(config.train.batch_size) * config.model.block_size;
  out.predicted_layer.assign(stages, 0.0);
  out.predicted_extra.assign(stages, 0.0);
  for (int i = 0; i < stages; ++i) {
    const double rate =
        (i >= fast_stages ? out.slow : out.fast).fp32_gflops() * 1e9 * solver.compute_efficiency;
    out.predicted_layer[i] = costs.block_flops_per_token * tokens / rate;
    if (i == stages - 1) out.predicted_extra[i] = costs.head_flops_per_token * tokens / rate;
  }
  SHOAL_ASSIGN_OR_RETURN(out.uneven,
                         scheduler::SplitLayers(n_layer, out.predicted_layer, out.predicted_extra,
                                                std::vector<int>(stages, n_layer)));
  out.uniform = scheduler::UniformSplit(n_layer, stages);
  return out;
}

struct SplitBenchOptions {
  std::string config;
  std::vector<std::string> overrides;
  double throttle = 2.0;
  int stages = 2;
  int micro_batches = 8;
  int reps = 5;
  double profile_seconds = 2.0;
  bool refresh = false;
};

absl::Status RunBenchSplit(const SplitBenchOptions& o) {
  SHOAL_RETURN_IF_ERROR(runtime::Throttle::CheckFactor(o.throttle, "--throttle"));
  SHOAL_ASSIGN_OR_RETURN(runtime::Config config, runtime::LoadConfig(o.config, o.overrides));
  const int n_layer = config.model.n_layer;
  if (o.stages < 2 || o.stages > n_layer) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--stages must be in [2, model.n_layer = ", n_layer, "], got ", o.stages));
  }
  if (o.micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--micro-batches must be >= 1, got ", o.micro_batches));
  }
  if (o.reps < 1) return absl::InvalidArgumentError(absl::StrCat("--reps must be >= 1, got ", o.reps));

  // The first half of the stages (rounded up) run on the fast device, the rest on the slow one.
  const int fast_stages = (o.stages + 1) / 2;
  auto is_slow = [&](int stage) { return stage >= fast_stages; };

  // 1-2. The solver's split from two profiles, as a fast and a slow rank would send them.
  SHOAL_ASSIGN_OR_RETURN(const ProfiledSplit split,
                         SplitFromProfiles(config, o.stages, fast_stages, o.throttle, o.refresh,
                                           o.profile_seconds));
  const v1::DeviceProfile& fast = split.fast;
  const v1::DeviceProfile& slow = split.slow;
  const std::vector<double>& predicted_layer = split.predicted_layer;
  const std::vector<double>& predicted_extra = split.predicted_extra;
  const std::vector<int>& uneven = split.uneven;
  const std::vector<int>& uniform = split.uniform;

  // 3. Real times: the config's model, one micro-batch (B, T) of random token ids (the time of
  // a step does not depend on which ids), the trainer's thread plan. Throttled and unthrottled
  // passes alternate so a drifting machine load hits both alike.
  const runtime::ThreadPlan plan = runtime::ChooseThreadPlan(
      config.model, config.train.omp_threads, config.train.blas_threads);
  SHOAL_RETURN_IF_ERROR(runtime::ApplyThreadPlan(plan));
  runtime::Gpt model(config.model, config.train.seed);
  const int64_t B = config.train.batch_size, T = config.model.block_size;
  at::Tensor ids = at::randint(config.model.vocab_size, {B, T + 1}, at::kLong);
  at::Tensor x = ids.narrow(1, 0, T).contiguous(), y = ids.narrow(1, 1, T).contiguous();
  const runtime::Throttle unthrottled(1.0), throttled(o.throttle);
  std::vector<PieceTimes> fast_runs, slow_runs;
  try {
    TimePass(model, x, y, unthrottled);  // warm-up: buffers, thread pools
    for (int r = 0; r < o.reps; ++r) {
      fast_runs.push_back(TimePass(model, x, y, unthrottled));
      slow_runs.push_back(TimePass(model, x, y, throttled));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("bench split: timing the model: ",
                                            e.what_without_backtrace()));
  }
  const PieceTimes fast_t = FastestTimes(fast_runs), slow_t = FastestTimes(slow_runs);

  // 4. Both splits on the measured times, through the same pipeline formula.
  auto stage_seconds = [&](const std::vector<int>& split, bool measured) {
    std::vector<double> s(o.stages);
    for (int i = 0; i < o.stages; ++i) {
      if (measured) {
        const PieceTimes& t = is_slow(i) ? slow_t : fast_t;
        s[i] = split[i] * t.block + (i == 0 ? t.embedding : 0) +
               (i == o.stages - 1 ? t.head : 0);
      } else {
        s[i] = split[i] * predicted_layer[i] + predicted_extra[i];
      }
    }
    return s;
  };
  const std::vector<double> uneven_s = stage_seconds(uneven, true);
  const std::vector<double> uniform_s = stage_seconds(uniform, true);
  const double measured_uneven = scheduler::PipelineStepSeconds(uneven_s, o.micro_batches);
  const double measured_uniform = scheduler::PipelineStepSeconds(uniform_s, o.micro_batches);
  const double predicted_uneven =
      scheduler::PipelineStepSeconds(stage_seconds(uneven, false), o.micro_batches);

  std::printf("bench split: %s, %d blocks over %d stages, %d micro-batches of %lld x %lld tokens\n",
              config.source.c_str(), n_layer, o.stages, o.micro_batches,
              static_cast<long long>(B), static_cast<long long>(T));
  std::printf("devices: fast = throttle 1 (%.1f GFLOP/s measured), slow = throttle %g (%.1f)\n",
              fast.fp32_gflops(), o.throttle, slow.fp32_gflops());
  std::printf("measured per micro-batch: block %.2f ms fast / %.2f ms slow, embedding %.2f / %.2f,"
              " head %.2f / %.2f ms\n",
              1e3 * fast_t.block, 1e3 * slow_t.block, 1e3 * fast_t.embedding,
              1e3 * slow_t.embedding, 1e3 * fast_t.head, 1e3 * slow_t.head);
  std::printf("%-6s %-6s %14s %14s %16s %16s\n", "stage", "device", "uneven blocks",
              "uniform blocks", "uneven s/micro", "uniform s/micro");
  for (int i = 0; i < o.stages; ++i) {
    std::printf("%-6d %-6s %14d %14d %16.4f %16.4f\n", i, is_slow(i) ? "slow" : "fast", uneven[i],
                uniform[i], uneven_s[i], uniform_s[i]);
  }
  std::printf("step (1F1B, %d micro-batches): uneven %.3f s measured (%.3f s predicted), "
              "uniform %.3f s measured: %.2fx\n",
              o.micro_batches, measured_uneven, predicted_uneven, measured_uniform,
              measured_uniform / measured_uneven);
  nlohmann::json j = {{"bench", "split"},
                      {"config", o.config},
                      {"n_layer", n_layer},
                      {"stages", o.stages},
                      {"throttle", o.throttle},
                      {"micro_batches", o.micro_batches},
                      {"slow_stages_from", fast_stages},
                      {"fast_gflops", fast.fp32_gflops()},
                      {"slow_gflops", slow.fp32_gflops()},
                      {"measured_block_s_fast", fast_t.block},
                      {"measured_block_s_slow", slow_t.block},
                      {"uneven_split", uneven},
                      {"uniform_split", uniform},
                      {"measured_step_s_uneven", measured_uneven},
                      {"measured_step_s_uniform", measured_uniform},
                      {"ratio", measured_uniform / measured_uneven},
                      {"predicted_step_s_uneven", predicted_uneven}};
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// bench hetero

struct HeteroBenchOptions {
  std::string config;
  std::vector<std::string> overrides;
  double throttle = 2.0;
  int micro_batches = 8;
  int64_t steps = 6;
  int rounds = 2;
  double profile_seconds = 2.0;
  bool refresh = false;
};

// Two ranks, a two-stage pipeline, rank 1 (the last stage) throttled: real training steps with
// the solver's split and with the uniform one, alternating `rounds` times each so drifting load
// hits both alike; the best tokens/s of each counts.
absl::Status RunBenchHetero(const HeteroBenchOptions& o) {
  SHOAL_RETURN_IF_ERROR(runtime::Throttle::CheckFactor(o.throttle, "--throttle"));
  if (o.micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--micro-batches must be >= 1, got ", o.micro_batches));
  }
  if (o.steps < 1) return absl::InvalidArgumentError(absl::StrCat("--steps must be >= 1, got ", o.steps));
  if (o.rounds < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--rounds must be >= 1, got ", o.rounds));
  }
  std::vector<std::string> overrides = o.overrides;
  overrides.push_back(absl::StrCat("train.grad_accum=", o.micro_batches));
  SHOAL_ASSIGN_OR_RETURN(runtime::Config config, runtime::LoadConfig(o.config, overrides));
  if (config.model.n_layer < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bench hetero needs model.n_layer >= 2 for two stages, got ", config.model.n_layer));
  }
  SHOAL_ASSIGN_OR_RETURN(const ProfiledSplit split,
                         SplitFromProfiles(config, 2, /*fast_stages=*/1, o.throttle, o.refresh,
                                           o.profile_seconds));
  std::string sets;
  for (const std::string& s : overrides) sets += " --set '" + s + "'";
  const std::string self = SelfExecutablePath();
  auto run = [&](const std::vector<int>& stages) -> absl::StatusOr<double> {
    const std::string cmd = absl::StrCat(
        self, " run --standalone --nproc-per-node 2 -- bench train --config ", o.config,
        " --steps ", o.steps, sets,
        " --set train.omp_threads=1 train.blas_threads=1 parallel.pp=2 'parallel.stages=[",
        absl::StrJoin(stages, ","), "]' --throttle ", o.throttle, " --throttle-rank 1");
    SHOAL_ASSIGN_OR_RETURN(nlohmann::json j, RunForJson(cmd));
    return j["tokens_per_s"].get<double>();
  };
  double uneven_tps = 0, uniform_tps = 0;
  for (int r = 0; r < o.rounds; ++r) {
    SHOAL_ASSIGN_OR_RETURN(const double a, run(split.uneven));
    SHOAL_ASSIGN_OR_RETURN(const double b, run(split.uniform));
    uneven_tps = std::max(uneven_tps, a);
    uniform_tps = std::max(uniform_tps, b);
  }
  const double ratio = uneven_tps / uniform_tps;
  std::printf("bench hetero: %s, %d blocks, 2 stages (rank 0 fast, rank 1 throttled %gx), "
              "%d micro-batches of %d x %d tokens, 1 thread per rank\n",
              config.source.c_str(), config.model.n_layer, o.throttle, o.micro_batches,
              config.train.batch_size, config.model.block_size);
  std::printf("profiles: rank 0 %.1f GFLOP/s, rank 1 %.1f GFLOP/s (measured just now)\n",
              split.fast.fp32_gflops(), split.slow.fp32_gflops());
  std::printf("%-10s %-10s %14s\n", "split", "blocks", "tokens/s");
  std::printf("%-10s %-10s %14.0f\n", "solver", absl::StrJoin(split.uneven, "/").c_str(),
              uneven_tps);
  std::printf("%-10s %-10s %14.0f\n", "uniform", absl::StrJoin(split.uniform, "/").c_str(),
              uniform_tps);
  // Ideal, blocks only: uniform n/2 blocks on the slow stage take T n/2; balanced, the slow
  // stage holds n/(1+T) blocks and takes T n/(1+T): (1+T)/2.
  std::printf("ratio (solver / uniform): %.2fx (ideal for %g:1, blocks only: %.2fx)\n", ratio,
              o.throttle, (1.0 + o.throttle) / 2.0);
  nlohmann::json j = {{"bench", "hetero"},
                      {"config", o.config},
                      {"n_layer", config.model.n_layer},
                      {"throttle", o.throttle},
                      {"micro_batches", o.micro_batches},
                      {"fast_gflops", split.fast.fp32_gflops()},
                      {"slow_gflops", split.slow.fp32_gflops()},
                      {"uneven_split", split.uneven},
                      {"uniform_split", split.uniform},
                      {"tokens_per_s_uneven", uneven_tps},
                      {"tokens_per_s_uniform", uniform_tps},
                      {"ratio", ratio}};
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

// The flags both split benchmarks share (`refresh` null: no --refresh flag).
void AddSplitFlags(CLI::App& app, std::string* config, std::vector<std::string>* overrides,
                   double* throttle, const char* throttle_help, int* micro_batches,
                   const char* micro_batches_help, double* profile_seconds, bool* refresh) {
  app.add_option("--config", *config, "TOML config file")->required();
  app.add_option("--set", *overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  app.add_option("--throttle", *throttle, throttle_help)->capture_default_str();
  app.add_option("--micro-batches", *micro_batches, micro_batches_help)->capture_default_str();
  app.add_option("--profile-seconds", *profile_seconds, "Time budget of each device profile")
      ->capture_default_str();
  if (refresh != nullptr) app.add_flag("--refresh", *refresh, "Profile again even when cached");
}

}  // namespace

int SplitBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "The solver's uneven pipeline split (from two device profiles: throttle 1 and F) against "
      "the uniform split, on measured per-block times; prints a table and a JSON line"};
  app.name("shoal bench split");
  SplitBenchOptions o;
  AddSplitFlags(app, &o.config, &o.overrides, &o.throttle,
                "Slow-down factor of the slow device (>= 1)", &o.micro_batches,
                "Micro-batches per step in the 1F1B formula", &o.profile_seconds, &o.refresh);
  app.add_option("--stages", o.stages, "Pipeline stages (the first half fast, the rest slow)")
      ->capture_default_str();
  app.add_option("--reps", o.reps, "Timed passes per device (the fastest counts)")
      ->capture_default_str();
  return ParseAndRun(app, argc, argv, host, [&] { return RunBenchSplit(o); });
}

int HeteroBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "Two ranks of different speed (rank 1 throttled) as a 2-stage pipeline: tokens/s with the "
      "solver's uneven split against the uniform split, same run; prints a table and a JSON line"};
  app.name("shoal bench hetero");
  HeteroBenchOptions o;
  // Both profiles are always measured now, one right after the other: cached ones from
  // different moments of a shared machine skew the split (seen: 3.8:1 for a 2:1 throttle).
  o.refresh = true;
  AddSplitFlags(app, &o.config, &o.overrides, &o.throttle, "Slow-down factor of rank 1 (>= 1)",
                &o.micro_batches, "Micro-batches per step (train.grad_accum)",
                &o.profile_seconds, nullptr);
  app.add_option("--steps", o.steps, "Timed steps per run (after 3 warm-up steps)")
      ->capture_default_str();
  app.add_option("--rounds", o.rounds, "Runs of each split, alternating (the best counts)")
      ->capture_default_str();
  return ParseAndRun(app, argc, argv, host, [&] { return RunBenchHetero(o); });
}

}  // namespace shoal::bench
