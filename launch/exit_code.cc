#include "launch/exit_code.h"

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

namespace shoal::launch {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};
std::atomic<int64_t> g_first_signal_ms{0};

int64_t NowMs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // async-signal-safe
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void OnSignal(int sig) {
  if (g_stop.exchange(true)) {
    if (NowMs() - g_first_signal_ms.load() < 2000) return;
    std::_Exit(128 + sig);
  }
  g_first_signal_ms = NowMs();
  g_signal = sig;
}

}  // namespace

int ExitCodeFor(const absl::Status& status) {
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound ||
                          status.code() == absl::StatusCode::kFailedPrecondition ||
                          status.code() == absl::StatusCode::kUnauthenticated ||
                          status.code() == absl::StatusCode::kPermissionDenied;
  return user_error ? 2 : 1;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "shoal: error: %s\n", std::string(status.message()).c_str());
  return ExitCodeFor(status);
}

void InstallStopHandler() {
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGUSR1, OnSignal);
}

std::atomic<bool>* StopRequested() { return &g_stop; }

int StopSignal() { return g_signal.load(); }

}  // namespace shoal::launch
