// `shoal simulate`: the coordinator's membership and layout solver on virtual devices
// (scheduler/simulator.h), or with --swarm its swarm policy with virtual peers and trainers
// (scheduler/swarm_simulator.h). Reads a devices file, runs the simulation and prints the
// throughput table (or JSON lines) and a summary. No network, no LibTorch: it runs the scheduler
// library only.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "launch/subcommands.h"
#include "scheduler/simulator.h"
#include "scheduler/swarm_simulator.h"
#include "scheduler/swarm_simulator_output.h"

namespace shoal::launch {
namespace {

int SimulateExitCode(const absl::Status& status) {
  std::fprintf(stderr, "shoal simulate: error: %s\n", std::string(status.message()).c_str());
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound;
  return user_error ? 2 : 1;
}

int RefuseFlag(const std::string& message) {
  std::fprintf(stderr, "shoal simulate: error: %s\n", message.c_str());
  return 2;
}

// --swarm's run: the flags checked against the file's model, then the swarm simulator.
int SimulateSwarmMain(const std::string& devices_file, scheduler::SwarmSimulationOptions options,
                      bool json) {
  absl::StatusOr<scheduler::ClusterSpec> spec = scheduler::LoadClusterFile(devices_file);
  if (!spec.ok()) return SimulateExitCode(spec.status());
  const int n_layer = spec->job.model().n_layer();
  if (options.stages < 1 || options.stages > n_layer) {
    return RefuseFlag(absl::StrCat("--stages must be in [1, ", n_layer, "] (n_layer of ",
                                   devices_file, "), got ", options.stages));
  }
  absl::StatusOr<scheduler::SwarmSimulationResult> result =
      scheduler::SimulateSwarm(*spec, options);
  if (!result.ok()) return SimulateExitCode(result.status());
  if (json) {
    std::cout << scheduler::FormatSwarmSimulationJson(*result);
  } else {
    int devices = 0;
    for (const scheduler::DeviceGroupSpec& g : spec->groups) devices += g.count;
    std::cout << "shoal simulate --swarm: " << devices_file << ", " << devices << " devices in "
              << spec->groups.size() << " groups, " << options.stages << " stages x "
              << options.micro_batches << " micro-batches of "
              << result->summary.tokens_per_step / options.micro_batches << " tokens, "
              << options.trainers << (options.trainers == 1 ? " trainer" : " trainers")
              << ", churn " << options.churn_per_hour
              << " failures per preemptible device-hour, seed " << options.seed << "\n"
              << scheduler::FormatSwarmSimulationTable(*result);
  }
  std::cout.flush();
  return 0;
}

}  // namespace

int SimulateMain(int argc, char** argv) {
  CLI::App app{
      "Run the coordinator's membership and layout solver on virtual devices: joins, heartbeats, "
      "failures at a churn rate, replacements, and the throughput of each layout over virtual "
      "time. With --swarm, its swarm policy instead: virtual peers serving pipeline stages and "
      "trainers pushing micro-batches through them"};
  app.name("shoal simulate");
  std::string devices_file;
  scheduler::SimulationOptions options;
  bool json = false;
  app.add_option("--devices", devices_file, "Devices file (TOML: [job], [[group]], [simulation])")
      ->required();
  app.add_option("--churn", options.churn_per_hour,
                 "Expected failures per preemptible device per virtual hour")
      ->capture_default_str();
  app.add_option("--steps", options.steps, "Optimizer steps to simulate")->capture_default_str();
  app.add_option("--seed", options.seed, "Seed of the failure times")->capture_default_str();
  double relayout_gain = -1;
  app.add_option("--relayout-gain", relayout_gain,
                 "The coordinator's --relayout-gain (default: the file's simulation.relayout_gain, "
                 "else 0)")
      ->check(CLI::Range(0.0, 10.0));
  app.add_flag("--json", json, "Print JSON lines (one per row, then a summary) instead of a table");
  bool swarm = false;
  scheduler::SwarmSimulationOptions swarm_options;
  app.add_flag("--swarm", swarm,
               "Simulate swarm mode (the coordinator's SwarmState) instead of a mesh layout");
  app.add_option("--stages", swarm_options.stages,
                 "--swarm: pipeline stages (required; 1 to the model's n_layer)");
  app.add_option("--micro-batches", swarm_options.micro_batches,
                 "--swarm: micro-batches per step")
      ->capture_default_str();
  app.add_option("--trainers", swarm_options.trainers,
                 "--swarm: virtual trainers")
      ->capture_default_str();
  app.add_option("--in-flight", swarm_options.in_flight,
                 "--swarm: micro-batches each trainer runs at once (as shoal worker's)")
      ->capture_default_str();
  app.add_option("--checkpoint-every", swarm_options.checkpoint_every,
                 "--swarm: steps between checkpoints, the target of a rollback (0: none, the "
                 "init)")
      ->capture_default_str();
  app.add_option("--kill-every", swarm_options.kill_every_s,
                 "--swarm: besides --churn, kill one live preemptible peer (drawn by --seed) "
                 "every this many virtual seconds, as `shoal bench swarm` does (0: never)")
      ->capture_default_str();
  app.add_option("--rebalance-s", swarm_options.rebalance_s,
                 "--swarm: the coordinator's --rebalance-s, seconds between rebalancing checks "
                 "(0: never)")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (swarm) {
    if (app.count("--relayout-gain") > 0) {
      return RefuseFlag("--relayout-gain is for the mesh layout; --swarm has none");
    }
    if (app.count("--stages") == 0) return RefuseFlag("--stages is required with --swarm");
    // The ranges are the simulator's (scheduler/swarm_simulator.h), named here by flag.
    if (swarm_options.micro_batches < 1 || swarm_options.micro_batches > 65536) {
      return RefuseFlag(absl::StrCat("--micro-batches must be in [1, 65536], got ",
                                     swarm_options.micro_batches));
    }
    if (swarm_options.trainers < 1 || swarm_options.trainers > 4096) {
      return RefuseFlag(
          absl::StrCat("--trainers must be in [1, 4096], got ", swarm_options.trainers));
    }
    if (!std::isfinite(swarm_options.rebalance_s) || swarm_options.rebalance_s < 0 ||
        swarm_options.rebalance_s > 86400) {
      return RefuseFlag(absl::StrCat("--rebalance-s must be in [0, 86400] (0: never), got ",
                                     swarm_options.rebalance_s));
    }
    if (!std::isfinite(swarm_options.kill_every_s) || swarm_options.kill_every_s < 0 ||
        swarm_options.kill_every_s > 1e7) {
      return RefuseFlag(absl::StrCat("--kill-every must be in [0, 1e7] (0: never), got ",
                                     swarm_options.kill_every_s));
    }
    if (swarm_options.checkpoint_every < 0) {
      return RefuseFlag(absl::StrCat("--checkpoint-every must be >= 0, got ",
                                     swarm_options.checkpoint_every));
    }
    swarm_options.steps = options.steps;
    swarm_options.churn_per_hour = options.churn_per_hour;
    swarm_options.seed = options.seed;
    return SimulateSwarmMain(devices_file, swarm_options, json);
  }
  for (const char* flag :
       {"--stages", "--micro-batches", "--trainers", "--checkpoint-every", "--rebalance-s",
        "--kill-every"}) {
    if (app.count(flag) > 0) return RefuseFlag(absl::StrCat(flag, " needs --swarm"));
  }
  absl::StatusOr<scheduler::ClusterSpec> spec = scheduler::LoadClusterFile(devices_file);
  if (!spec.ok()) return SimulateExitCode(spec.status());
  if (relayout_gain >= 0) spec->settings.relayout_gain = relayout_gain;
  absl::StatusOr<scheduler::SimulationResult> result = scheduler::Simulate(*spec, options);
  if (!result.ok()) return SimulateExitCode(result.status());
  if (json) {
    std::cout << scheduler::FormatSimulationJson(*result);
  } else {
    std::cout << "shoal simulate: " << devices_file << ", " << spec->groups.size()
              << " device groups, churn " << options.churn_per_hour
              << " failures per preemptible device-hour, relayout gain "
              << spec->settings.relayout_gain << ", seed " << options.seed << "\n"
              << scheduler::FormatSimulationTable(*result);
  }
  std::cout.flush();
  return 0;
}

}  // namespace shoal::launch
