// `shoal bench allocator`: the host allocator policy (common/host_allocator.h) measured. The same
// `shoal bench train` child run with SHOAL_HOST_ALLOCATOR=system (glibc's defaults) and =keep
// (freed blocks kept for reuse), alternated --rounds times in one run; the mean tokens/s of
// each, their ratio and the largest peak RSS of each in one JSON line. DeMo (optim.name = "demo") allocates and frees its
// coefficient tensors every step, which is where the policy shows.
#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_runs.h"
#include "bench/benches.h"
#include "common/file_util.h"
#include "common/host_allocator.h"
#include "common/status.h"
#include "runtime/config.h"

namespace shoal::bench {
namespace {

absl::Status RunBenchAllocator(const std::string& config_path,
                               const std::vector<std::string>& overrides, int64_t steps,
                               int rounds) {
  // Checked here so a bad config fails before any child starts.
  SHOAL_RETURN_IF_ERROR(runtime::LoadConfig(config_path, overrides).status());
  // glibc's own settings would make both children alike (they win over SHOAL_HOST_ALLOCATOR).
  absl::StatusOr<HostAllocatorPolicy> keep =
      ChooseHostAllocatorPolicy("keep", std::getenv("GLIBC_TUNABLES"), MallocVariablesSet());
  if (!keep.ok() || *keep != HostAllocatorPolicy::kKeep) {
    return absl::FailedPreconditionError(
        "bench allocator: glibc's malloc settings are set in the environment (MALLOC_*_ or "
        "GLIBC_TUNABLES glibc.malloc.*) and would override both arms; unset them");
  }
  std::string sets;
  for (const std::string& o : overrides) sets += " --set '" + o + "'";
  const std::string train = absl::StrCat(SelfExecutablePath(), " bench train --config ",
                                         config_path, " --steps ", steps, sets);
  double sum[2] = {0, 0}, step_ms[2] = {0, 0}, peak_mb[2] = {0, 0};
  const char* names[2] = {"system", "keep"};
  for (int r = 0; r < rounds; ++r) {
    for (int arm = 0; arm < 2; ++arm) {
      SHOAL_ASSIGN_OR_RETURN(
          nlohmann::json j,
          RunForJson(absl::StrCat("SHOAL_HOST_ALLOCATOR=", names[arm], " ", train)));
      sum[arm] += j["tokens_per_s"].get<double>();
      if (j.contains("step_time_ms")) step_ms[arm] += j["step_time_ms"].get<double>();
      if (j.contains("peak_rss_mb")) {
        peak_mb[arm] = std::max(peak_mb[arm], j["peak_rss_mb"].get<double>());
      }
    }
  }
  const nlohmann::json j = {{"bench", "allocator"},
                            {"config", config_path},
                            {"rounds", rounds},
                            {"tokens_per_s_system", sum[0] / rounds},
                            {"tokens_per_s_keep", sum[1] / rounds},
                            {"step_time_ms_system", step_ms[0] / rounds},
                            {"step_time_ms_keep", step_ms[1] / rounds},
                            {"peak_rss_mb_system", peak_mb[0]},
                            {"peak_rss_mb_keep", peak_mb[1]},
                            {"ratio", sum[1] / sum[0]}};
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace

int AllocatorBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{"The host allocator policy: bench train with glibc's defaults vs freed blocks kept"};
  app.name("shoal bench allocator");
  std::string config;
  std::vector<std::string> overrides;
  int64_t steps = 10;
  int rounds = 2;
  app.add_option("--config", config, "TOML config file")->required();
  app.add_option("--set", overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  app.add_option("--steps", steps, "Timed steps per run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--rounds", rounds, "Runs of each arm, alternated")
      ->check(CLI::Range(1, 20))
      ->capture_default_str();
  return ParseAndRun(app, argc, argv, host,
                     [&] { return RunBenchAllocator(config, overrides, steps, rounds); });
}

}  // namespace shoal::bench
