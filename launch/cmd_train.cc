// `shoal train` and `shoal bench train`: one process's part of a training run. It joins the
// job's data-parallel group when the environment says there is one (checking that every rank
// runs the same binary and config), joins the coordinator when given one, builds the trainer and
// runs it until the last step, a stop signal or a drain; `bench train` prints its figures as one
// JSON line instead of the run's summary.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "common/file_util.h"
#include "common/process_memory.h"
#include "common/sha256.h"
#include "common/status.h"
#include "launch/env.h"
#include "launch/exit_code.h"
#include "launch/subcommands.h"
#include "launch/worker_link.h"
#include "runtime/config.h"
#include "runtime/trainer.h"

namespace shoal::launch {
namespace {

// The first 13 hex digits of a digest as a double (exact: 52 bits), to compare across ranks.
double DigestPrefix(const std::string& hex) {
  return static_cast<double>(std::stoull(hex.substr(0, 13), nullptr, 16));
}

// Ranks of one job must run the same binary on the same config: rank 0 broadcasts both hashes,
// every rank compares. kFailedPrecondition says which differs.
absl::Status CheckSameRun(comm::Backend* backend, const runtime::Config& config,
                          absl::Duration timeout) {
  SHOAL_ASSIGN_OR_RETURN(std::string binary, Sha256File("/proc/self/exe"));
  const std::string toml = config.ToToml();
  // The first line of ToToml names the file it came from, which may differ between hosts.
  const std::string body = toml.substr(toml.find('\n') + 1);
  at::Tensor mine = at::empty({2}, at::kDouble);
  mine[0] = DigestPrefix(Sha256Hex(body.data(), body.size()));
  mine[1] = DigestPrefix(binary);
  at::Tensor theirs = mine.clone();
  SHOAL_RETURN_IF_ERROR(backend->Broadcast(theirs, 0, {timeout})->Wait());
  if (theirs[0].item<double>() != mine[0].item<double>()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", backend->rank(), " runs a different config than rank 0 (", config.source,
        "); every rank must get the same config and --set overrides"));
  }
  if (theirs[1].item<double>() != mine[1].item<double>()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", backend->rank(), " runs a different shoal binary than rank 0"));
  }
  return absl::OkStatus();
}

// Joins the job's data-parallel group when the environment says there is one.
// `store_out` receives the group's store (its namespace for this restart): model-parallel
// groups are built on it.
absl::StatusOr<std::unique_ptr<comm::Backend>> JoinGroup(const DistributedEnv& env,
                                                         const runtime::Config& config,
                                                         std::shared_ptr<comm::Store>* store_out) {
  const absl::Duration timeout = absl::Seconds(config.parallel.timeout_s);
  comm::BackendOptions bo;
  bo.kind = config.parallel.backend;
  bo.rank = env.rank;
  bo.world_size = env.world_size;
  bo.timeout = timeout;
  if (bo.kind != "mpi") {
    comm::TcpStoreOptions so;
    so.host = env.master_addr;
    so.port = env.master_port;
    so.is_server = env.rank == 0;
    so.world_size = env.world_size;
    so.timeout = timeout;
    SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<comm::Store> store, comm::MakeTcpStore(so));
    // A fresh namespace per restart, so a restarted group never reads the last one's keys.
    bo.store = comm::MakePrefixStore(absl::StrCat("shoal/restart-", env.restart_count), store);
    *store_out = bo.store;
  }
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<comm::Backend> backend, comm::CreateBackend(bo));
  SHOAL_RETURN_IF_ERROR(CheckSameRun(backend.get(), config, timeout));
  return backend;
}

// The nearest folder of `path` (or above it) that exists: the disk tier's place in the profile
// before the run has created its output folder.
std::string ExistingAncestor(std::string path) {
  while (!path.empty() && path != "." && path != "/" && !PathExists(path)) path = DirName(path);
  return path.empty() ? "." : path;
}

// One process's part of a training run: loads the config with `overrides`, joins the
// data-parallel group when the environment has one (kFailedPrecondition unless every rank runs
// the same binary and config) and the coordinator when `link_options.coordinator` is set, then
// trains, stopping at a stop signal (exit_code.h) or a drain. `throttle_rank` >= 0:
// options.throttle applies on that rank only. Returns the exit code: 0 when it finished (or was
// drained), 128 + signal when a signal stopped it, Fail()'s code for an error. With
// options.bench, rank 0 prints the bench JSON line instead of the run's summary.
int RunTrain(const std::string& config_path, const std::vector<std::string>& overrides,
             runtime::TrainOptions options, WorkerLinkOptions link_options, int throttle_rank) {
  auto config = runtime::LoadConfig(config_path, overrides);
  if (!config.ok()) return Fail(config.status());
  auto env = DetectDistributedEnv();
  if (!env.ok()) return Fail(env.status());
  if (throttle_rank >= env->world_size) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--throttle-rank ", throttle_rank, " is not a rank of this job of ", env->world_size)));
  }
  if (throttle_rank >= 0 && env->rank != throttle_rank) options.throttle = 1.0;
  std::unique_ptr<comm::Backend> backend;
  if (env->world_size > 1) {
    auto joined = JoinGroup(*env, *config, &options.store);
    if (!joined.ok()) return Fail(joined.status());
    backend = std::move(*joined);
    options.backend = backend.get();
    options.nodes = std::max(1, env->world_size / std::max(1, env->local_world_size));
    options.ranks_on_host = std::max(1, env->local_world_size);
  }
  // Mesh mode: join the coordinator after the data-parallel rendezvous, not before. By then
  // every rank is known to run the same binary and config (so all send the same job spec), and
  // the group lets ranks on one host take turns profiling the device; the assignment still
  // comes before the trainer is built, which is where a layout will decide what it builds.
  std::unique_ptr<WorkerLink> link;
  if (!link_options.coordinator.empty()) {
    link_options.throttle = options.throttle;
    link_options.disk_path = ExistingAncestor(config->train.out_dir);
    auto started = WorkerLink::Start(link_options, *config, *env, backend.get(),
                                     StopRequested());
    if (!started.ok()) return Fail(started.status());
    link = std::move(*started);
    WorkerLink* l = link.get();
    options.on_step = [l](const runtime::StepReport& r) { l->OnStep(r); };
    options.layout = link->layout();
  }
  options.stop_requested = StopRequested();
  InstallStopHandler();
  auto trainer = runtime::Trainer::Create(*config, options);
  if (!trainer.ok()) {
    if (link) link->Close(absl::StrCat("failed: ", trainer.status().message()));
    return Fail(trainer.status());
  }
  auto result = (*trainer)->Run();
  if (link) {
    link->Close(!result.ok()            ? absl::StrCat("failed: ", result.status().message())
                : link->drained()       ? "drained"
                : result->stopped_early ? "stopped"
                                        : "finished");
  }
  if (!result.ok()) return Fail(result.status());
  // A drained worker stopped because the coordinator asked, not because of a signal: that is
  // a clean end (exit 0), with its checkpoint written.
  const bool drained_only = link && link->drained() && StopSignal() == 0;
  const int stopped_code = drained_only ? 0 : 128 + StopSignal();
  if (!options.bench) {
    if (env->rank != 0) return result->stopped_early ? stopped_code : 0;
    if (result->first_val_loss >= 0) {
      std::fprintf(stderr, "val loss %.4f -> %.4f\n", result->first_val_loss,
                   result->last_val_loss);
    }
    std::fprintf(stderr, "checkpoint: %s\n", result->checkpoint.c_str());
    if (drained_only && result->stopped_early) {
      std::fprintf(stderr, "drained by coordinator %s\n", link_options.coordinator.c_str());
    }
    if (result->stopped_early) return stopped_code;
    return 0;
  }
  if (env->rank != 0) return 0;
  const runtime::Config& c = *config;
  nlohmann::json j = {
      {"ranks", env->world_size},
      {"config", config_path},
      {"steps_timed", static_cast<int64_t>(result->losses.size()) - options.bench_warmup_steps},
      {"tokens_per_s", result->tokens_per_s},
      {"mfu", result->mfu},
      {"peak_gflops", result->peak_gflops},
      {"step_time_ms", result->step_time_ms},
      {"peak_rss_mb", PeakResidentBytes() / (1 << 20)},
      {"omp_threads", result->omp_threads},
      {"blas_threads", result->blas_threads},
      {"batch_size", c.train.batch_size},
      {"block_size", c.model.block_size},
      {"final_loss", result->losses.empty() ? 0.0 : result->losses.back()}};
  std::cout << j.dump() << std::endl;
  return 0;
}

}  // namespace

int TrainMain(int argc, char** argv) {
  CLI::App app{"Train a GPT from a TOML config"};
  app.name("shoal train");
  std::string config_path;
  std::vector<std::string> overrides;
  runtime::TrainOptions train_opts;
  app.add_option("--config", config_path, "TOML config file")->required();
  app.add_option("--set", overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  app.add_flag("--resume", train_opts.resume,
               "Continue from the newest valid checkpoint in checkpoint.dir");
  app.add_option("--stop-after", train_opts.stop_after,
                 "Stop (with a checkpoint) after this many steps of this invocation")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--throttle", train_opts.throttle,
                 "Slow this rank down on purpose by this factor >= 1 (heterogeneity tests)");
  int throttle_rank = -1;
  app.add_option("--throttle-rank", throttle_rank,
                 "Apply --throttle on this rank only (default: every rank)")
      ->check(CLI::NonNegativeNumber);
  WorkerLinkOptions link_opts;
  double coordinator_timeout_s = 60;
  app.add_option("--coordinator", link_opts.coordinator,
                 "HOST:PORT of `shoal coordinator`: join it, report steps, obey drains");
  app.add_option("--coordinator-token-file", link_opts.token_file,
                 "File holding the coordinator's token");
  app.add_option("--coordinator-ca", link_opts.tls_ca_file,
                 "PEM CA file: talk TLS to the coordinator");
  app.add_option("--coordinator-timeout", coordinator_timeout_s,
                 "Seconds to reach the coordinator and get the first layout")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (link_opts.coordinator.empty() &&
      (!link_opts.token_file.empty() || !link_opts.tls_ca_file.empty())) {
    return Fail(absl::InvalidArgumentError(
        "--coordinator-token-file and --coordinator-ca need --coordinator HOST:PORT"));
  }
  if (!(coordinator_timeout_s > 0) || coordinator_timeout_s > 86400) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--coordinator-timeout must be in (0, 86400] seconds, got ", coordinator_timeout_s)));
  }
  link_opts.timeout = absl::Seconds(coordinator_timeout_s);
  return RunTrain(config_path, overrides, train_opts, link_opts, throttle_rank);
}

int BenchTrainMain(int argc, char** argv) {
  CLI::App app{"Time training steps; prints a JSON line with tokens_per_s, mfu, ..."};
  app.name("shoal bench train");
  std::string config;
  std::vector<std::string> overrides;
  int64_t steps = 20;
  int threads = 0;
  double throttle = 1.0;
  int throttle_rank = -1;
  app.add_option("--config", config, "TOML config file")->required();
  app.add_option("--set", overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  app.add_option("--steps", steps, "Timed steps (after 3 warm-up steps)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", threads, "Cores to use for both thread pools (0: all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--throttle", throttle, "Slow ranks down on purpose by this factor >= 1")
      ->capture_default_str();
  app.add_option("--throttle-rank", throttle_rank,
                 "Apply --throttle on this rank only (default: every rank)")
      ->check(CLI::NonNegativeNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  runtime::TrainOptions o;
  o.bench = true;
  o.bench_warmup_steps = 3;
  overrides.push_back("train.steps=" + std::to_string(steps + 3));
  overrides.push_back("optim.warmup_steps=1");
  if (threads > 0) {
    overrides.push_back("train.omp_threads=" + std::to_string(threads));
    overrides.push_back("train.blas_threads=" + std::to_string(threads));
  }
  o.throttle = throttle;
  return RunTrain(config, overrides, o, {}, throttle_rank);
}

}  // namespace shoal::launch
