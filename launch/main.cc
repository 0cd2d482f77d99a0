// shoal: one binary, every role. Subcommands:
//   shoal prepare-data --input PATH... --out DIR [--val-fraction F] [--tokenizer byte]
//   shoal train --config FILE [--set section.key=value ...] [--resume] [--stop-after N]
//               [--throttle F] [--coordinator HOST:PORT [--coordinator-token-file F]
//               [--coordinator-ca F] [--coordinator-timeout S]]
//   shoal bench train --config FILE [--steps N] [--threads T] [--set ...]
// Only this file decides how the process ends: a status becomes a message and an exit code
// (2: bad input or usage, 1: anything else, 130/143: interrupted).
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <ctime>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/backend.h"
#include "comm/comm_bench.h"
#include "comm/store.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/process_memory.h"
#include "common/sha256.h"
#include "common/status.h"
#include "launch/env.h"
#include "launch/launcher.h"
#include "launch/bench_runs.h"
#include "launch/subcommands.h"
#include "launch/worker_link.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/prepare_data.h"
#include "runtime/trainer.h"

namespace shoal {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};

std::atomic<int64_t> g_first_signal_ms{0};

int64_t NowMs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // async-signal-safe
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// First SIGINT/SIGTERM/SIGUSR1: finish the step, checkpoint, exit. A second one exits at once,
// unless it comes within 2 s of the first: under `shoal run` inside Slurm a rank can get the same
// SIGTERM twice (from Slurm and forwarded by the launcher), which must not cut the checkpoint.
void OnSignal(int sig) {
  if (g_stop.exchange(true)) {
    if (NowMs() - g_first_signal_ms.load() < 2000) return;
    std::_Exit(128 + sig);
  }
  g_first_signal_ms = NowMs();
  g_signal = sig;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "shoal: error: %s\n", std::string(status.message()).c_str());
  // A wrong coordinator token is bad input too: retrying the same command cannot help.
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound ||
                          status.code() == absl::StatusCode::kFailedPrecondition ||
                          status.code() == absl::StatusCode::kUnauthenticated ||
                          status.code() == absl::StatusCode::kPermissionDenied;
  return user_error ? 2 : 1;
}

int RunPrepareData(const runtime::PrepareDataOptions& options) {
  absl::Status s = runtime::PrepareData(options);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "prepared %s (train.bin, val.bin, meta.json)\n", options.out_dir.c_str());
  return 0;
}

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
absl::StatusOr<std::unique_ptr<comm::Backend>> JoinGroup(const launch::DistributedEnv& env,
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

// `throttle_rank` >= 0: options.throttle applies on that rank only.
int RunTrain(const std::string& config_path, const std::vector<std::string>& overrides,
             runtime::TrainOptions options, launch::WorkerLinkOptions link_options = {},
             int throttle_rank = -1) {
  auto config = runtime::LoadConfig(config_path, overrides);
  if (!config.ok()) return Fail(config.status());
  auto env = launch::DetectDistributedEnv();
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
  std::unique_ptr<launch::WorkerLink> link;
  if (!link_options.coordinator.empty()) {
    link_options.throttle = options.throttle;
    link_options.disk_path = ExistingAncestor(config->train.out_dir);
    auto started = launch::WorkerLink::Start(link_options, *config, *env, backend.get(), &g_stop);
    if (!started.ok()) return Fail(started.status());
    link = std::move(*started);
    launch::WorkerLink* l = link.get();
    options.on_step = [l](const runtime::StepReport& r) { l->OnStep(r); };
    options.layout = link->layout();
  }
  options.stop_requested = &g_stop;
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGUSR1, OnSignal);  // Slurm's warning before preemption or the time limit
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
  const bool drained_only = link && link->drained() && g_signal.load() == 0;
  const int stopped_code = drained_only ? 0 : 128 + g_signal.load();
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

// `shoal bench dp`: 2 ranks x 1 thread against 1 rank x 2 threads at the same global batch.
int RunBenchDp(const std::string& config_path, const std::vector<std::string>& overrides,
               int64_t steps) {
  auto config = runtime::LoadConfig(config_path, overrides);
  if (!config.ok()) return Fail(config.status());
  const int batch = config->train.batch_size;
  if (batch % 2 != 0) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "bench dp splits train.batch_size over 2 ranks; it must be even (got ", batch, ")")));
  }
  std::string sets;
  for (const std::string& o : overrides) sets += " --set '" + o + "'";
  const std::string self = SelfExecutablePath();
  const std::string common = absl::StrCat(" bench train --config ", config_path, " --steps ",
                                          steps, sets, " --set train.omp_threads=1");
  auto one = launch::RunForJson(absl::StrCat(self, common, " --set train.blas_threads=2"));
  if (!one.ok()) return Fail(one.status());
  auto two = launch::RunForJson(absl::StrCat(self, " run --standalone --nproc-per-node 2 --", common,
                                     " --set train.blas_threads=1 train.batch_size=", batch / 2));
  if (!two.ok()) return Fail(two.status());
  const double a = (*one)["tokens_per_s"].get<double>(), b = (*two)["tokens_per_s"].get<double>();
  nlohmann::json j = {{"bench", "dp"},
                      {"config", config_path},
                      {"global_batch", batch},
                      {"tokens_per_s_1rank_2threads", a},
                      {"tokens_per_s_2ranks_1thread", b},
                      {"ratio", b / a}};
  std::cout << j.dump() << std::endl;
  return 0;
}

// `shoal bench comm`: inside a rank, run the benchmark; outside, start the ranks first.
int RunBenchComm(const std::string& backend, int ranks, int64_t max_mb, int iterations,
                 int argc, char** argv) {
  auto env = launch::DetectDistributedEnv();
  if (!env.ok()) return Fail(env.status());
  if (env->world_size == 1 && ranks > 1) {
    std::string args;
    for (int i = 1; i < argc; ++i) args += std::string(" '") + argv[i] + "'";
    const std::string self = SelfExecutablePath();
    const std::string cmd =
        backend == "mpi"
            ? absl::StrCat("mpirun --allow-run-as-root --oversubscribe -np ", ranks, " ", self,
                           args)
            : absl::StrCat(self, " run --standalone --nproc-per-node ", ranks, " --", args);
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  }
  comm::CommBenchOptions o;
  o.backend = backend;
  o.rank = env->rank;
  o.world_size = env->world_size;
  o.master_addr = env->master_addr;
  o.master_port = env->master_port;
  o.max_bytes = max_mb << 20;
  o.iterations = iterations;
  absl::Status s = comm::RunCommBench(o);
  if (!s.ok()) return Fail(s);
  return 0;
}

}  // namespace
}  // namespace shoal

int main(int argc, char** argv) {
  // The thread pools read their idle policy from the environment when the libraries load, which
  // is before main: set it and start again once (see device_probe.h).
  // Only the subcommands that train need it; the others skip a second load of LibTorch.
  const bool trains = argc >= 2 && (std::string(argv[1]) == "train" || std::string(argv[1]) == "bench");
  if (trains && shoal::runtime::NeedsEnvironmentReexec()) {
    ::execv("/proc/self/exe", argv);
    // execv failed: carry on with the pools as they are.
  }
  // `shoal run [launcher flags] -- <worker subcommand ...>` has its own parser.
  if (argc >= 2 && std::string(argv[1]) == "run") {
    return shoal::launch::RunLauncherMain(argc - 1, argv + 1);
  }
  // The coordinator's subcommands parse their own flags (launch/subcommands.h).
  if (argc >= 2) {
    const std::string sub = argv[1];
    if (sub == "coordinator") return shoal::launch::CoordinatorMain(argc - 1, argv + 1);
    if (sub == "status") return shoal::launch::StatusMain(argc - 1, argv + 1);
    if (sub == "simulate") return shoal::launch::SimulateMain(argc - 1, argv + 1);
    if (sub == "profile") return shoal::launch::ProfileMain(argc - 1, argv + 1);
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "coordinator") {
      return shoal::launch::BenchCoordinatorMain(argc - 2, argv + 2);
    }
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "split") {
      return shoal::launch::BenchSplitMain(argc - 2, argv + 2);
    }
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "pipeline") {
      return shoal::launch::BenchPipelineMain(argc - 2, argv + 2);
    }
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "hetero") {
      return shoal::launch::BenchHeteroMain(argc - 2, argv + 2);
    }
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "demo") {
      return shoal::launch::BenchDemoMain(argc - 2, argv + 2);
    }
    if (sub == "bench" && argc >= 3 && std::string(argv[2]) == "memory") {
      return shoal::launch::BenchMemoryMain(argc - 2, argv + 2);
    }
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
  train_cmd->add_option("--throttle", train_opts.throttle,
                        "Slow this rank down on purpose by this factor >= 1 (heterogeneity tests)");
  int throttle_rank = -1;
  train_cmd->add_option("--throttle-rank", throttle_rank,
                        "Apply --throttle on this rank only (default: every rank)")
      ->check(CLI::NonNegativeNumber);
  shoal::launch::WorkerLinkOptions link_opts;
  double coordinator_timeout_s = 60;
  train_cmd->add_option("--coordinator", link_opts.coordinator,
                        "HOST:PORT of `shoal coordinator`: join it, report steps, obey drains");
  train_cmd->add_option("--coordinator-token-file", link_opts.token_file,
                        "File holding the coordinator's token");
  train_cmd->add_option("--coordinator-ca", link_opts.tls_ca_file,
                        "PEM CA file: talk TLS to the coordinator");
  train_cmd->add_option("--coordinator-timeout", coordinator_timeout_s,
                        "Seconds to reach the coordinator and get the first layout")
      ->capture_default_str();

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
  double bench_throttle = 1.0;
  int bench_throttle_rank = -1;
  bench_train->add_option("--throttle", bench_throttle,
                          "Slow ranks down on purpose by this factor >= 1")
      ->capture_default_str();
  bench_train->add_option("--throttle-rank", bench_throttle_rank,
                          "Apply --throttle on this rank only (default: every rank)")
      ->check(CLI::NonNegativeNumber);

  // Listed for --help; parsed by their own mains above.
  app.add_subcommand("coordinator", "Run the coordinator service (gRPC, HTTP status and dashboard)");
  app.add_subcommand("status", "Show the cluster as the coordinator sees it");
  app.add_subcommand("simulate", "Run the coordinator's membership and solver on virtual devices");
  app.add_subcommand("profile", "Measure this machine's device profile (as workers send it)");

  bench_cmd->add_subcommand(
      "split", "The solver's uneven pipeline split vs the uniform one on measured block times");
  bench_cmd->add_subcommand(
      "pipeline", "Pipeline schedules: measured bubble fraction against (p-1)/(m+p-1), p = 2, 4");
  bench_cmd->add_subcommand(
      "hetero", "Two ranks, one slowed down: 2-stage pipeline with the solver's split vs uniform");
  bench_cmd->add_subcommand(
      "demo", "AdamW + fp32 all-reduce vs DeMo on real ranks: bytes per step and validation loss");
  bench_cmd->add_subcommand(
      "memory", "Model states paged to disk under a host budget vs all in RAM: tokens/s, RSS");

  // env: what rank discovery sees (for launch scripts and tests)
  auto* env_cmd = app.add_subcommand(
      "env", "Print this process's place in a distributed job (rank, world size, ...) as JSON");

  // bench dp
  auto* bench_dp = bench_cmd->add_subcommand(
      "dp", "Data parallel on one host: 2 ranks x 1 thread vs 1 rank x 2 threads, same global batch");
  std::string dp_config;
  std::vector<std::string> dp_overrides;
  int64_t dp_steps = 10;
  bench_dp->add_option("--config", dp_config, "TOML config file")->required();
  bench_dp->add_option("--set", dp_overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  bench_dp->add_option("--steps", dp_steps, "Timed steps per run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  // bench comm
  auto* bench_comm = bench_cmd->add_subcommand(
      "comm", "All-reduce time and bus bandwidth, 4 KB .. 256 MB, beside raw loopback TCP");
  std::string comm_backend = "gloo";
  int comm_ranks = 2;
  int64_t comm_max_mb = 256;
  int comm_iterations = 10;
  bench_comm->add_option("--backend", comm_backend, "gloo or mpi")
      ->check(CLI::IsMember({"gloo", "mpi", "nccl"}))
      ->capture_default_str();
  bench_comm->add_option("--ranks", comm_ranks, "Ranks to start (when not already in a job)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_comm->add_option("--max-mb", comm_max_mb, "Largest message (MB)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_comm->add_option("--iterations", comm_iterations, "Timed all-reduces per size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  CLI11_PARSE(app, argc, argv);

  if (*bench_dp) return shoal::RunBenchDp(dp_config, dp_overrides, dp_steps);
  if (*bench_comm) {
    return shoal::RunBenchComm(comm_backend, comm_ranks, comm_max_mb, comm_iterations, argc, argv);
  }

  if (*env_cmd) {
    auto env = shoal::launch::DetectDistributedEnv();
    if (!env.ok()) return shoal::Fail(env.status());
    nlohmann::json j = {{"rank", env->rank},
                        {"world_size", env->world_size},
                        {"local_rank", env->local_rank},
                        {"local_world_size", env->local_world_size},
                        {"node_rank", env->node_rank},
                        {"master_addr", env->master_addr},
                        {"master_port", env->master_port},
                        {"restart_count", env->restart_count},
                        {"source", env->source}};
    std::cout << j.dump() << std::endl;
    return 0;
  }

  if (*prep_cmd) {
    prep.progress = !no_progress;
    return shoal::RunPrepareData(prep);
  }
  if (*train_cmd) {
    if (link_opts.coordinator.empty() &&
        (!link_opts.token_file.empty() || !link_opts.tls_ca_file.empty())) {
      return shoal::Fail(absl::InvalidArgumentError(
          "--coordinator-token-file and --coordinator-ca need --coordinator HOST:PORT"));
    }
    if (!(coordinator_timeout_s > 0) || coordinator_timeout_s > 86400) {
      return shoal::Fail(absl::InvalidArgumentError(absl::StrCat(
          "--coordinator-timeout must be in (0, 86400] seconds, got ", coordinator_timeout_s)));
    }
    link_opts.timeout = absl::Seconds(coordinator_timeout_s);
    return shoal::RunTrain(config_path, overrides, train_opts, link_opts, throttle_rank);
  }
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
    o.throttle = bench_throttle;
    return shoal::RunTrain(bench_config, bench_overrides, o, {}, bench_throttle_rank);
  }
  return 0;
}
