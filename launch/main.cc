// shoal: one binary, every role. main() looks argv[1] up in one table of subcommands (name,
// one-line help, handler) and hands it the rest of the command line; `shoal --help` lists the
// same table. Each handler parses its own flags. `shoal bench` is itself a table: bench/'s
// benchmarks plus `bench train`, which is the trainer (cmd_train.cc).
// How the process ends (exit codes 0 / 1 / 2 / 128 + signal, stop signals) is exit_code.h's.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "bench/bench_main.h"
#include "common/host_allocator.h"
#include "common/subcommand_table.h"
#include "launch/env.h"
#include "launch/exit_code.h"
#include "launch/launcher.h"
#include "launch/subcommands.h"
#include "runtime/device_probe.h"
#include "runtime/prepare_data.h"

namespace shoal::launch {
namespace {

// shoal prepare-data --input PATH... --out DIR [--val-fraction F] [--tokenizer byte]
int PrepareDataMain(int argc, char** argv) {
  CLI::App app{"Tokenize UTF-8 text into train.bin / val.bin (uint16) and meta.json"};
  app.name("shoal prepare-data");
  runtime::PrepareDataOptions prep;
  app.add_option("--input", prep.inputs, "Text files or folders (recursive)")
      ->required()
      ->expected(1, -1);
  app.add_option("--out", prep.out_dir, "Output folder")->required();
  app.add_option("--val-fraction", prep.val_fraction, "Share of tokens for validation, in (0, 0.5]")
      ->capture_default_str();
  app.add_option("--tokenizer", prep.tokenizer, "Tokenizer: byte")->capture_default_str();
  bool no_progress = false;
  app.add_flag("--no-progress", no_progress, "Do not draw a progress bar");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  prep.progress = !no_progress;
  const absl::Status s = runtime::PrepareData(prep);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "prepared %s (train.bin, val.bin, meta.json)\n", prep.out_dir.c_str());
  return 0;
}

// shoal env: what rank discovery sees (for launch scripts and tests), as JSON.
int EnvMain(int argc, char** argv) {
  CLI::App app{"Print this process's place in a distributed job (rank, world size, ...) as JSON"};
  app.name("shoal env");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  auto env = DetectDistributedEnv();
  if (!env.ok()) return Fail(env.status());
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

// shoal bench <name> ...: what bench/ needs from launch/ (rank discovery, the exit-code mapping)
// goes in as a BenchHost; `bench train` runs the trainer, so it is launch/'s.
int BenchMain(int argc, char** argv) {
  bench::BenchHost host;
  host.detect_rank = []() -> absl::StatusOr<bench::RankEnv> {
    absl::StatusOr<DistributedEnv> env = DetectDistributedEnv();
    if (!env.ok()) return env.status();
    bench::RankEnv r;
    r.rank = env->rank;
    r.world_size = env->world_size;
    r.master_addr = env->master_addr;
    r.master_port = env->master_port;
    r.restart_count = env->restart_count;
    return r;
  };
  host.exit_code = ExitCodeFor;
  return bench::BenchMain(
      argc, argv, host,
      {{"train", "Time training steps; prints a JSON line with tokens_per_s, mfu, ...",
        BenchTrainMain}});
}

// The coordinator's subcommands need SHOAL_COORDINATOR (gRPC): a binary built without it keeps
// their names, and each says so and exits 2.
#ifdef SHOAL_HAVE_COORDINATOR
#define SHOAL_IF_COORDINATOR(main, name) main
#define SHOAL_NOT_BUILT ""
#else
#define SHOAL_NOT_BUILT " [not in this build: SHOAL_COORDINATOR]"
#define SHOAL_IF_COORDINATOR(main, name)                                                       \
  [](int, char**) {                                                                            \
    std::fprintf(stderr,                                                                       \
                 "shoal " name ": this binary was built without the coordinator "              \
                 "(SHOAL_COORDINATOR: gRPC, prometheus-cpp and cpp-httplib were not found, "   \
                 "or it was switched off at configure)\n");                                    \
    return 2;                                                                                  \
  }
#endif

// Every subcommand, in the order `shoal --help` lists them.
const std::vector<Subcommand>& Subcommands() {
  static const auto* const table = new std::vector<Subcommand>{
      {"prepare-data", "Tokenize UTF-8 text into train.bin / val.bin (uint16) and meta.json",
       PrepareDataMain},
      {"train", "Train a GPT from a TOML config", TrainMain},
      {"run", "Start and supervise the local ranks of a job: shoal run [flags] -- <subcommand>",
       RunLauncherMain},
      {"bench", "Benchmarks that print figures", BenchMain},
      {"coordinator",
       "Run the coordinator service (gRPC, HTTP status and dashboard)" SHOAL_NOT_BUILT,
       SHOAL_IF_COORDINATOR(CoordinatorMain, "coordinator")},
      {"worker", "Join a swarm as a stage peer or (--trainer) a trainer: shoal worker --join ..."
           SHOAL_NOT_BUILT,
       SHOAL_IF_COORDINATOR(WorkerMain, "worker")},
      {"status", "Show the cluster as the coordinator sees it" SHOAL_NOT_BUILT,
       SHOAL_IF_COORDINATOR(StatusMain, "status")},
      {"simulate", "Run the coordinator's membership and solver on virtual devices", SimulateMain},
      {"profile", "Measure this machine's device profile (as workers send it)", ProfileMain},
      {"env", "Print this process's place in a distributed job (rank, world size, ...) as JSON",
       EnvMain},
  };
  return *table;
}

}  // namespace
}  // namespace shoal::launch

int main(int argc, char** argv) {
  const std::string sub = argc >= 2 ? argv[1] : "";
  // The thread pools read their idle policy from the environment when the libraries load, which
  // is before main: set it and start again once (see device_probe.h).
  // Only the subcommands that train need it; the others skip a second load of LibTorch.
  if ((sub == "train" || sub == "bench" || sub == "worker") &&
      shoal::runtime::NeedsEnvironmentReexec()) {
    ::execv("/proc/self/exe", argv);
    // execv failed: carry on with the pools as they are.
  }
  // Freed tensors stay mapped for the next step (common/host_allocator.h), in every role.
  const absl::StatusOr<shoal::HostAllocatorPolicy> allocator =
      shoal::HostAllocatorPolicyFromEnvironment();
  if (!allocator.ok()) return shoal::launch::Fail(allocator.status());
  (void)shoal::ApplyHostAllocatorPolicy(*allocator);
  if (sub == "--version") {
    std::cout << "shoal 0.1.0" << std::endl;
    return 0;
  }
  return shoal::RunSubcommand(
      "shoal", "shoal: pre-training transformer language models on heterogeneous clusters",
      shoal::launch::Subcommands(), argc, argv);
}
