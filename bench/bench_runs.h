// Helpers the benchmarks share: running child processes (`shoal bench train`, `shoal run ...`)
// and reading their result line, and parsing a benchmark's flags into an exit code.
#ifndef SHOAL_BENCH_BENCH_RUNS_H_
#define SHOAL_BENCH_BENCH_RUNS_H_

#include <functional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/bench_main.h"

namespace shoal::bench {

// Runs `command` (through /bin/sh, stderr merged into stdout), echoing every line to stderr and
// handing it to `on_line` when given; an error naming the command when it exits non-zero.
absl::Status RunEchoing(const std::string& command,
                        const std::function<void(const std::string& line)>& on_line = nullptr);

// Runs `command` (through /bin/sh), echoing its output to stderr; returns the last line that
// parses as a JSON object with a "tokens_per_s" field (a launcher's "[rank0]: " prefix removed),
// or an error naming the command when it fails or prints none.
absl::StatusOr<nlohmann::json> RunForJson(const std::string& command);

// Prints "shoal: error: <message>" and returns host.exit_code(status).
int ReportFailure(const BenchHost& host, const absl::Status& status);

// Parses `argv` into `app` (exit 2 on a usage error, 0 for --help), then runs `run` and turns
// its status into the exit code (ReportFailure).
int ParseAndRun(CLI::App& app, int argc, char** argv, const BenchHost& host,
                const std::function<absl::Status()>& run);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_BENCH_RUNS_H_
