// `shoal simulate`: the coordinator's membership and layout solver on virtual devices
// (scheduler/simulator.h). Reads a devices file, runs the simulation and prints the throughput
// table (or JSON lines) and a summary. No network, no LibTorch: it runs the scheduler library only.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <string>

#include "absl/status/status.h"
#include "launch/subcommands.h"
#include "scheduler/simulator.h"

namespace shoal::launch {
namespace {

int SimulateExitCode(const absl::Status& status) {
  std::fprintf(stderr, "shoal simulate: error: %s\n", std::string(status.message()).c_str());
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound;
  return user_error ? 2 : 1;
}

}  // namespace

int SimulateMain(int argc, char** argv) {
  CLI::App app{
      "Run the coordinator's membership and layout solver on virtual devices: joins, heartbeats, "
      "failures at a churn rate, replacements, and the throughput of each layout over virtual "
      "time"};
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
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
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
