// `shoal bench dp`: data parallel on one host. The same global batch trained by 1 rank x 2
// threads and by 2 ranks x 1 thread, each a real `shoal bench train` child (the second under
// `shoal run`); their tokens/s and the ratio in one JSON line.
#include <cstdio>
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
#include "common/status.h"
#include "runtime/config.h"

namespace shoal::bench {
namespace {

// 2 ranks x 1 thread against 1 rank x 2 threads at the same global batch.
absl::Status RunBenchDp(const std::string& config_path, const std::vector<std::string>& overrides,
                        int64_t steps) {
  SHOAL_ASSIGN_OR_RETURN(runtime::Config config, runtime::LoadConfig(config_path, overrides));
  const int batch = config.train.batch_size;
  if (batch % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bench dp splits train.batch_size over 2 ranks; it must be even (got ", batch, ")"));
  }
  std::string sets;
  for (const std::string& o : overrides) sets += " --set '" + o + "'";
  const std::string self = SelfExecutablePath();
  const std::string common = absl::StrCat(" bench train --config ", config_path, " --steps ",
                                          steps, sets, " --set train.omp_threads=1");
  SHOAL_ASSIGN_OR_RETURN(nlohmann::json one,
                         RunForJson(absl::StrCat(self, common, " --set train.blas_threads=2")));
  SHOAL_ASSIGN_OR_RETURN(
      nlohmann::json two,
      RunForJson(absl::StrCat(self, " run --standalone --nproc-per-node 2 --", common,
                              " --set train.blas_threads=1 train.batch_size=", batch / 2)));
  const double a = one["tokens_per_s"].get<double>(), b = two["tokens_per_s"].get<double>();
  nlohmann::json j = {{"bench", "dp"},
                      {"config", config_path},
                      {"global_batch", batch},
                      {"tokens_per_s_1rank_2threads", a},
                      {"tokens_per_s_2ranks_1thread", b},
                      {"ratio", b / a}};
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace

int DpBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "Data parallel on one host: 2 ranks x 1 thread vs 1 rank x 2 threads, same global batch"};
  app.name("shoal bench dp");
  std::string config;
  std::vector<std::string> overrides;
  int64_t steps = 10;
  app.add_option("--config", config, "TOML config file")->required();
  app.add_option("--set", overrides, "Override a config value: section.key=value")
      ->expected(1, -1);
  app.add_option("--steps", steps, "Timed steps per run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return ParseAndRun(app, argc, argv, host, [&] { return RunBenchDp(config, overrides, steps); });
}

}  // namespace shoal::bench
