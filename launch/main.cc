// shoal: one binary, every role. Subcommands:
//   shoal prepare-data --input PATH... --out DIR [--val-fraction F] [--tokenizer byte]
//   shoal train --config FILE [--set section.key=value ...] [--resume] [--stop-after N]
//   shoal bench train --config FILE [--steps N] [--threads T] [--set ...]
// Only this file decides how the process ends: a status becomes a message and an exit code
// (2: bad input or usage, 1: anything else, 130/143: interrupted).
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "common/logging.h"
#include "launch/launcher.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/prepare_data.h"
#include "runtime/trainer.h"

namespace shoal {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};

void OnSignal(int sig) {
  if (g_stop.exchange(true)) std::_Exit(128 + sig);  // second signal: leave now
  g_signal = sig;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "shoal: error: %s\n", std::string(status.message()).c_str());
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound ||
                          status.code() == absl::StatusCode::kFailedPrecondition;
  return user_error ? 2 : 1;
}

long PeakRssMb() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  long kb = 0;
  while (std::fgets(line, sizeof(line), f)) {
    if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
  }
  std::fclose(f);
  return kb / 1024;
}

int RunPrepareData(const runtime::PrepareDataOptions& options) {
  absl::Status s = runtime::PrepareData(options);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "prepared %s (train.bin, val.bin, meta.json)\n", options.out_dir.c_str());
  return 0;
}

int RunTrain(const std::string& config_path, const std::vector<std::string>& overrides,
             runtime::TrainOptions options) {
  auto config = runtime::LoadConfig(config_path, overrides);
  if (!config.ok()) return Fail(config.status());
  options.stop_requested = &g_stop;
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  auto trainer = runtime::Trainer::Create(*config, options);
  if (!trainer.ok()) return Fail(trainer.status());
  auto result = (*trainer)->Run();
  if (!result.ok()) return Fail(result.status());
  if (!options.bench) {
    if (result->first_val_loss >= 0) {
      std::fprintf(stderr, "val loss %.4f -> %.4f\n", result->first_val_loss,
                   result->last_val_loss);
    }
    std::fprintf(stderr, "checkpoint: %s\n", result->checkpoint.c_str());
    if (result->stopped_early) return 128 + g_signal.load();
    return 0;
  }
  const runtime::Config& c = *config;
  nlohmann::json j = {
      {"config", config_path},
      {"steps_timed", static_cast<int64_t>(result->losses.size()) - options.bench_warmup_steps},
      {"tokens_per_s", result->tokens_per_s},
      {"mfu", result->mfu},
      {"peak_gflops", result->peak_gflops},
      {"step_time_ms", result->step_time_ms},
      {"peak_rss_mb", PeakRssMb()},
      {"omp_threads", result->omp_threads},
      {"blas_threads", result->blas_threads},
      {"batch_size", c.train.batch_size},
      {"block_size", c.model.block_size},
      {"final_loss", result->losses.empty() ? 0.0 : result->losses.back()}};
  std::cout << j.dump() << std::endl;
  return 0;
}

}  // namespace
}  // namespace shoal

int main(int argc, char** argv) {
  // The thread pools read their idle policy from the environment when the libraries load, which
  // is before main: set it and start again once (see device_probe.h).
  if (shoal::runtime::NeedsEnvironmentReexec()) {
    ::execv("/proc/self/exe", argv);
    // execv failed: carry on with the pools as they are.
  }
  // `shoal run [launcher flags] -- <worker subcommand ...>` has its own parser.
  if (argc >= 2 && std::string(argv[1]) == "run") {
    return shoal::launch::RunLauncherMain(argc - 1, argv + 1);
  }
  CLI::App app{"shoal: pre-training transformer language models on heterogeneous clusters"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "shoal 0.1.0");

  // prepare-data
  shoal::runtime::PrepareDataOptions prep;
  auto* prep_cmd = app.add_subcommand(
      "prepare-data", "Tokenize UTF-8 text into train.bin / val.bin (uint16) and meta.json");
  prep_cmd->add_option("--input", prep.inputs, "Text files or folders (recursive)")
      ->required()
      ->expected(1, -1);
  prep_cmd->add_option("--out", prep.out_dir, "Output folder")->required();
  prep_cmd->add_option("--val-fraction", prep.val_fraction,
                       "Share of tokens for validation, in (0, 0.5]")
      ->capture_default_str();
  prep_cmd->add_option("--tokenizer", prep.tokenizer, "Tokenizer: byte")->capture_default_str();
  bool no_progress = false;
  prep_cmd->add_flag("--no-progress", no_progress, "Do not draw a progress bar");

  // train
  std::string config_path;
  std::vector<std::string> overrides;
  shoal::runtime::TrainOptions train_opts;
  auto* train_cmd = app.add_subcommand("train", "Train a GPT from a TOML config");
  train_cmd->add_option("--config", config_path, "TOML config file")->required();
  train_cmd->add_option("--set", overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  train_cmd->add_flag("--resume", train_opts.resume,
                      "Continue from the newest valid checkpoint in checkpoint.dir");
  train_cmd->add_option("--stop-after", train_opts.stop_after,
                        "Stop (with a checkpoint) after this many steps of this invocation")
      ->check(CLI::NonNegativeNumber);

  // bench train
  auto* bench_cmd = app.add_subcommand("bench", "Benchmarks that print figures");
  bench_cmd->require_subcommand(1);
  auto* bench_train = bench_cmd->add_subcommand(
      "train", "Time training steps; prints a JSON line with tokens_per_s, mfu, ...");
  std::string bench_config;
  std::vector<std::string> bench_overrides;
  int64_t bench_steps = 20;
  int bench_threads = 0;
  bench_train->add_option("--config", bench_config, "TOML config file")->required();
  bench_train->add_option("--set", bench_overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  bench_train->add_option("--steps", bench_steps, "Timed steps (after 3 warm-up steps)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_train->add_option("--threads", bench_threads,
                          "Cores to use for both thread pools (0: all)")
      ->check(CLI::NonNegativeNumber);

  CLI11_PARSE(app, argc, argv);

  if (*prep_cmd) {
    prep.progress = !no_progress;
    return shoal::RunPrepareData(prep);
  }
  if (*train_cmd) return shoal::RunTrain(config_path, overrides, train_opts);
  if (*bench_train) {
    shoal::runtime::TrainOptions o;
    o.bench = true;
    o.bench_warmup_steps = 3;
    bench_overrides.push_back("train.steps=" + std::to_string(bench_steps + 3));
    bench_overrides.push_back("optim.warmup_steps=1");
    if (bench_threads > 0) {
      bench_overrides.push_back("train.omp_threads=" + std::to_string(bench_threads));
      bench_overrides.push_back("train.blas_threads=" + std::to_string(bench_threads));
    }
    return shoal::RunTrain(bench_config, bench_overrides, o);
  }
  return 0;
}
