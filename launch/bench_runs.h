// Running benchmark child processes and reading their result line.
#ifndef SHOAL_LAUNCH_BENCH_RUNS_H_
#define SHOAL_LAUNCH_BENCH_RUNS_H_

#include <functional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace shoal::launch {

// Runs `command` (through /bin/sh, stderr merged into stdout), echoing every line to stderr and
// handing it to `on_line` when given; an error naming the command when it exits non-zero.
absl::Status RunEchoing(const std::string& command,
                        const std::function<void(const std::string& line)>& on_line = nullptr);

// Runs `command` (through /bin/sh), echoing its output to stderr; returns the last line that
// parses as a JSON object with a "tokens_per_s" field (a launcher's "[rank0]: " prefix removed),
// or an error naming the command when it fails or prints none.
absl::StatusOr<nlohmann::json> RunForJson(const std::string& command);

// Prints "shoal: error: <message>" and returns the exit code for `status`: 2 for the user's
// mistakes (invalid argument, not found, failed precondition), 1 otherwise.
int ExitCode(const absl::Status& status);

// Parses `argv` into `app` (exit 2 on a usage error, 0 for --help), then runs `run` and turns
// its status into the exit code.
int ParseAndRun(CLI::App& app, int argc, char** argv, const std::function<absl::Status()>& run);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_BENCH_RUNS_H_
