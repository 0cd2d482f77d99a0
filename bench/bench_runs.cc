#include "bench/bench_runs.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status.h"

namespace shoal::bench {

ChildProcess::ChildProcess(ChildProcess&& o) noexcept
    : pid_(o.pid_), exit_code_(o.exit_code_), log_(std::move(o.log_)),
      netns_(std::move(o.netns_)) {
  o.pid_ = -1;
}

absl::Status ChildProcess::Start(const std::vector<std::string>& args, const std::string& log,
                                 int core) {
  log_ = log;
  const std::string self = SelfExecutablePath();
  std::vector<std::string> argv = {"shoal"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> raw;
  for (std::string& a : argv) raw.push_back(a.data());
  raw.push_back(nullptr);
  const std::string netns = netns_.empty() ? std::string() : "/run/netns/" + netns_;
  pid_ = ::fork();
  if (pid_ < 0) return absl::InternalError("fork failed");
  if (pid_ == 0) {
    ::setpgid(0, 0);
    if (core >= 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(core, &set);
      ::sched_setaffinity(0, sizeof(set), &set);
    }
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    if (!netns.empty()) {
      const int ns = ::open(netns.c_str(), O_RDONLY | O_CLOEXEC);
      if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) {
        std::fprintf(stderr, "cannot enter the network namespace %s\n", netns.c_str());
        ::_exit(126);
      }
    }
    ::execv(self.c_str(), raw.data());
    ::_exit(127);
  }
  return absl::OkStatus();
}

int ChildProcess::Poll() {
  if (pid_ <= 0) return exit_code_;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) != pid_) return -1;
  pid_ = -1;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return exit_code_;
}

void ChildProcess::Kill9() {
  if (pid_ <= 0) return;
  ::kill(-pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  exit_code_ = 128 + SIGKILL;
}

void ChildProcess::Stop() {
  if (pid_ <= 0) return;
  ::kill(-pid_, SIGTERM);
  const auto t0 = std::chrono::steady_clock::now();
  while (Poll() < 0) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(10)) {
      Kill9();
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void StopAll(const std::vector<ChildProcess*>& children) {
  for (ChildProcess* c : children) {
    if (c->pid() > 0) ::kill(-c->pid(), SIGTERM);
  }
  for (ChildProcess* c : children) c->Stop();
}

absl::StatusOr<nlohmann::json> WaitForPortFile(ChildProcess& child, const std::string& path,
                                               absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (child.Poll() >= 0) {
      return absl::InternalError(absl::StrCat("the child exited at start; see ", child.log()));
    }
    absl::StatusOr<std::string> text = ReadFileToString(path);
    if (text.ok()) {
      nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("grpc")) return j;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("the child did not write ", path, " within ",
                                                  absl::FormatDuration(timeout), "; see ",
                                                  child.log()));
}

absl::Status RunEchoing(const std::string& command,
                        const std::function<void(const std::string& line)>& on_line) {
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return absl::InternalError("cannot run: " + command);
  char buf[8192];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) {
    std::fputs(buf, stderr);
    if (on_line) on_line(buf);
  }
  const int status = ::pclose(p);
  if (status != 0) {
    return absl::InternalError(absl::StrCat("benchmark run failed (status ", status, "): ", command));
  }
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> RunForJson(const std::string& command) {
  nlohmann::json last;
  SHOAL_RETURN_IF_ERROR(RunEchoing(command, [&](const std::string& line) {
    const size_t brace = line.find('{');
    if (brace == std::string::npos) return;
    auto j = nlohmann::json::parse(line.substr(brace), nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("tokens_per_s")) last = j;
  }));
  if (last.is_null()) {
    return absl::InternalError(absl::StrCat("benchmark run printed no result line: ", command));
  }
  return last;
}

int ReportFailure(const BenchHost& host, const absl::Status& status) {
  std::fprintf(stderr, "shoal: error: %s\n", std::string(status.message()).c_str());
  return host.exit_code(status);
}

int ParseAndRun(CLI::App& app, int argc, char** argv, const BenchHost& host,
                const std::function<absl::Status()>& run) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // CLI11's parse errors are usage errors; --help is 0
  }
  const absl::Status s = run();
  return s.ok() ? 0 : ReportFailure(host, s);
}

}  // namespace shoal::bench
