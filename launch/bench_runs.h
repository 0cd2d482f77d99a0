// Running benchmark child processes and reading their result line.
#ifndef SHOAL_LAUNCH_BENCH_RUNS_H_
#define SHOAL_LAUNCH_BENCH_RUNS_H_

#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

namespace shoal::launch {

// Runs `command` (through /bin/sh), echoing its output to stderr; returns the last line that
// parses as a JSON object with a "tokens_per_s" field (a launcher's "[rank0]: " prefix removed),
// or an error naming the command when it fails or prints none.
absl::StatusOr<nlohmann::json> RunForJson(const std::string& command);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_BENCH_RUNS_H_
