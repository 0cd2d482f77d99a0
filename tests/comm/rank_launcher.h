// Runs ranks as real processes on this host: the test binary starts copies of itself
// (/proc/self/exe) with a few environment variables that tell each copy which rank it is, waits
// for all of them with a deadline, and kills (by pid) any that outlive it. Each rank's stdout and
// stderr go to a file, read back into RankResult::output.
//
// A test binary using it checks IsRankProcess() at the top of main() and, if so, runs the rank's
// body instead of the tests.
#ifndef SHOAL_TESTS_COMM_RANK_LAUNCHER_H_
#define SHOAL_TESTS_COMM_RANK_LAUNCHER_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

extern char** environ;

namespace shoal::testing {

inline constexpr char kRankEnv[] = "SHOAL_COMM_TEST_RANK";

// True in a process started by LaunchRanks.
inline bool IsRankProcess() { return std::getenv(kRankEnv) != nullptr; }

// An integer from the environment, or `fallback`.
inline int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}
inline std::string EnvString(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : fallback;
}

struct RankResult {
  int rank = -1;
  int exit_code = -1;       // exit status, 128 + signal, or -1 when killed at the deadline
  bool timed_out = false;   // still running at the deadline (then killed)
  std::string output;       // stdout + stderr
};

// Starts one process per entry of `ranks` (the rank numbers to run; a test may leave some out),
// each with `env` plus SHOAL_COMM_TEST_RANK=<rank>, and waits at most `deadline` for all.
inline std::vector<RankResult> LaunchRanks(const std::vector<int>& ranks,
                                           const std::map<std::string, std::string>& env,
                                           std::chrono::seconds deadline) {
  TempDir logs;
  std::vector<RankResult> results(ranks.size());
  std::vector<pid_t> pids(ranks.size(), -1);
  for (size_t i = 0; i < ranks.size(); ++i) {
    results[i].rank = ranks[i];
    std::vector<std::string> strings;
    for (char** e = environ; *e != nullptr; ++e) strings.emplace_back(*e);
    for (const auto& [k, v] : env) strings.push_back(k + "=" + v);
    strings.push_back(std::string(kRankEnv) + "=" + std::to_string(ranks[i]));
    std::vector<char*> envp;
    for (std::string& s : strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe";
    std::vector<char*> argv{exe.data(), nullptr};
    const std::string log = logs / ("rank" + std::to_string(ranks[i]) + ".log");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    if (posix_spawn(&pids[i], exe.c_str(), &actions, nullptr, argv.data(), envp.data()) != 0) {
      pids[i] = -1;
      results[i].output = "posix_spawn failed";
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  const auto end = std::chrono::steady_clock::now() + deadline;
  size_t running = 0;
  for (pid_t p : pids) running += p > 0;
  while (running > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] <= 0) continue;
      int status = 0;
      if (::waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        results[i].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        pids[i] = -1;
        --running;
      }
    }
    if (running == 0) break;
    if (std::chrono::steady_clock::now() > end) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (pids[i] <= 0) continue;
        ::kill(pids[i], SIGKILL);  // only processes this function started
        ::waitpid(pids[i], nullptr, 0);
        results[i].timed_out = true;
        results[i].exit_code = -1;
        pids[i] = -1;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    results[i].output += ReadTextFile(logs / ("rank" + std::to_string(ranks[i]) + ".log"));
  }
  return results;
}

// "rank 0: exit 0\n<output>..." for every rank: what a failed test prints.
inline std::string DescribeRanks(const std::vector<RankResult>& results) {
  std::string s;
  for (const RankResult& r : results) {
    s += "---- rank " + std::to_string(r.rank) + ": " +
         (r.timed_out ? std::string("KILLED at the deadline")
                      : "exit " + std::to_string(r.exit_code)) +
         "\n" + r.output;
  }
  return s;
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_COMM_RANK_LAUNCHER_H_
