// Helpers the benchmarks share: running child processes (`shoal bench train`, `shoal run ...`)
// and reading their result line, and parsing a benchmark's flags into an exit code.
#ifndef SHOAL_BENCH_BENCH_RUNS_H_
#define SHOAL_BENCH_BENCH_RUNS_H_

#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
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

// A child process of this binary (`shoal ARGS...`) in a process group of its own, its stdout and
// stderr in a log file; stopped (Stop) when destroyed. Not thread-safe.
class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ChildProcess(ChildProcess&& o) noexcept;
  ~ChildProcess() { Stop(); }

  // Starts it (fork + exec of SelfExecutablePath()), pinned to CPU `core` when >= 0.
  absl::Status Start(const std::vector<std::string>& args, const std::string& log, int core = -1);
  // The network namespace (a name under /run/netns) the next Start runs it in; empty: this one's.
  void set_netns(std::string name) { netns_ = std::move(name); }
  pid_t pid() const { return pid_; }  // -1 once it has exited and been waited for
  const std::string& log() const { return log_; }
  // Its exit code (128 + signal) once it has exited, else -1. Never blocks.
  int Poll();
  // SIGKILL to its group, then waited for.
  void Kill9();
  // SIGTERM to its group; SIGKILL after 10 s.
  void Stop();

 private:
  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::string log_;
  std::string netns_;
};

// SIGTERM to every child's group at once, then each waited for (ChildProcess::Stop).
void StopAll(const std::vector<ChildProcess*>& children);

// The JSON object `child` writes to `path` once it listens (`--port-file`: {"grpc": P, ...}),
// waited for. kInternal when the child exits first, kDeadlineExceeded after `timeout`.
absl::StatusOr<nlohmann::json> WaitForPortFile(ChildProcess& child, const std::string& path,
                                               absl::Duration timeout);

// Prints "shoal: error: <message>" and returns host.exit_code(status).
int ReportFailure(const BenchHost& host, const absl::Status& status);

// Parses `argv` into `app` (exit 2 on a usage error, 0 for --help), then runs `run` and turns
// its status into the exit code (ReportFailure).
int ParseAndRun(CLI::App& app, int argc, char** argv, const BenchHost& host,
                const std::function<absl::Status()>& run);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_BENCH_RUNS_H_
