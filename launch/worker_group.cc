#include "launch/worker_group.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <deque>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/status.h"

extern char** environ;

namespace shoal::launch {
namespace {

// A line longer than this without a newline is relayed in pieces (each piece prefixed), so a
// rank printing a progress bar with '\r' forever cannot grow the launcher without bound.
constexpr size_t kMaxLine = 64 * 1024;

// After the last rank exited, how long to keep reading pipes that a grandchild still holds.
constexpr absl::Duration kDrainTimeout = absl::Seconds(2);

bool IsTerminating(int sig) {
  return sig == SIGINT || sig == SIGTERM || sig == SIGHUP || sig == SIGQUIT;
}

// write(2) until done; gives up quietly on errors (a closed stdout must not stop supervision).
void WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n > 0) {
      off += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return;
    }
  }
}

// One of a rank's output pipes.
struct Stream {
  int fd = -1;           // read end; -1 once closed
  int out_fd = 1;        // where its lines go (the launcher's stdout or stderr)
  std::string partial;   // bytes after the last newline
};

struct Worker {
  RankExit exit;
  bool running = false;
  Stream out, err;
  std::string prefix;             // "[rank3]: "
  std::deque<std::string> tail;   // last lines, both streams
};

class WorkerGroup {
 public:
  WorkerGroup(const WorkerGroupSpec& spec, SignalRelay& signals)
      : spec_(spec), signals_(signals) {}
  ~WorkerGroup() {
    for (Worker& w : workers_) {
      CloseStream(w.out);
      CloseStream(w.err);
    }
    if (devnull_ >= 0) ::close(devnull_);
  }

  absl::Status Start();
  WorkerGroupResult Supervise();
  // Kills and reaps whatever Start() managed to start (used when Start() fails half-way).
  void KillStarted();

 private:
  std::vector<std::string> EnvironmentFor(int local_rank) const;
  void ReadStream(Worker& w, Stream& s);
  void Emit(Worker& w, const Stream& s, const std::string& line);
  void CloseStream(Stream& s) {
    if (s.fd >= 0) ::close(s.fd);
    s.fd = -1;
  }
  void FlushAndClose(Worker& w, Stream& s) {
    if (!s.partial.empty()) Emit(w, s, s.partial);
    s.partial.clear();
    CloseStream(s);
  }
  // Sends `sig` to the process group of every rank still running (a rank that is reaped no
  // longer owns its process group id, so it is never signalled).
  void SignalRunning(int sig);
  void Reap();

  const WorkerGroupSpec& spec_;
  SignalRelay& signals_;
  int devnull_ = -1;
  std::vector<Worker> workers_;
  WorkerGroupResult result_;
};

std::vector<std::string> WorkerGroup::EnvironmentFor(int local_rank) const {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq == nullptr) continue;
    env[std::string(*e, eq - *e)] = eq + 1;
  }
  const int world = spec_.nnodes * spec_.nproc_per_node;
  const int rank = spec_.node_rank * spec_.nproc_per_node + local_rank;
  // torchrun's set (torch/distributed/run.py), one role ("default") per node.
  env["RANK"] = std::to_string(rank);
  env["LOCAL_RANK"] = std::to_string(local_rank);
  env["WORLD_SIZE"] = std::to_string(world);
  env["LOCAL_WORLD_SIZE"] = std::to_string(spec_.nproc_per_node);
  env["GROUP_RANK"] = std::to_string(spec_.node_rank);
  env["GROUP_WORLD_SIZE"] = std::to_string(spec_.nnodes);
  env["ROLE_NAME"] = "default";
  env["ROLE_RANK"] = std::to_string(rank);
  env["ROLE_WORLD_SIZE"] = std::to_string(world);
  env["MASTER_ADDR"] = spec_.master_addr;
  env["MASTER_PORT"] = std::to_string(spec_.master_port);
  env["TORCHELASTIC_RESTART_COUNT"] = std::to_string(spec_.restart_count);
  env["SHOAL_RESTART_COUNT"] = std::to_string(spec_.restart_count);
  env["TORCHELASTIC_MAX_RESTARTS"] = std::to_string(spec_.max_restarts);
  env["TORCHELASTIC_RUN_ID"] = spec_.run_id;
  if (spec_.set_omp_num_threads) env["OMP_NUM_THREADS"] = "1";
  std::vector<std::string> out;
  out.reserve(env.size());
  for (const auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

absl::Status WorkerGroup::Start() {
  devnull_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull_ < 0) {
    return absl::InternalError(absl::StrCat("open /dev/null: ", std::strerror(errno)));
  }
  std::vector<std::string> argv_s;
  argv_s.push_back(spec_.argv0.empty() ? spec_.binary : spec_.argv0);
  argv_s.insert(argv_s.end(), spec_.args.begin(), spec_.args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  const pid_t launcher = ::getpid();
  workers_.resize(spec_.nproc_per_node);
  for (int local = 0; local < spec_.nproc_per_node; ++local) {
    Worker& w = workers_[local];
    w.exit.local_rank = local;
    w.exit.rank = spec_.node_rank * spec_.nproc_per_node + local;
    w.prefix = absl::StrCat("[rank", w.exit.rank, "]: ");

    // Everything the child needs is built before fork: after it, only async-signal-safe calls.
    std::vector<std::string> env_s = EnvironmentFor(local);
    std::vector<char*> envp;
    for (std::string& e : env_s) envp.push_back(e.data());
    envp.push_back(nullptr);
    const std::string exec_failed =
        absl::StrCat("shoal run: rank ", w.exit.rank, ": cannot execute ", spec_.binary,
                     " (errno ");

    int out_pipe[2], err_pipe[2];
    if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
      return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
    }
    if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
      const int e = errno;
      ::close(out_pipe[0]);
      ::close(out_pipe[1]);
      return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(e)));
    }
    // Signals stay blocked across fork: a child must not run the launcher's handler (which
    // would report the signal to the launcher through the inherited pipe) before it has reset
    // the handlers below.
    sigset_t all, before;
    sigfillset(&all);
    ::sigprocmask(SIG_BLOCK, &all, &before);
    const pid_t pid = ::fork();
    if (pid != 0) ::sigprocmask(SIG_SETMASK, &before, nullptr);
    if (pid < 0) {
      const int e = errno;
      for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) ::close(fd);
      return absl::InternalError(
          absl::StrCat("fork for rank ", w.exit.rank, ": ", std::strerror(e)));
    }
    if (pid == 0) {
      // Own process group: a terminal's Ctrl-C reaches only the launcher, which forwards it
      // once (a worker that saw it twice would take the second as "exit now"), and stopping a
      // rank's group also stops what it spawned.
      ::setpgid(0, 0);
      // Die with the launcher, even if it is SIGKILLed, instead of training on as orphans.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != launcher) ::_exit(127);
      ::dup2(devnull_, 0);
      ::dup2(out_pipe[1], 1);
      ::dup2(err_pipe[1], 2);
      // Default handlers for what the launcher catches, and for SIGPIPE, which it ignores
      // (exec would keep an ignored signal ignored); then unblock, as exec keeps the mask.
      struct sigaction dfl = {};
      dfl.sa_handler = SIG_DFL;
      for (int sig = 1; sig < NSIG; ++sig) {
        struct sigaction cur;
        if (sig == SIGKILL || sig == SIGSTOP || ::sigaction(sig, nullptr, &cur) != 0) continue;
        if (sig == SIGPIPE || (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN)) {
          ::sigaction(sig, &dfl, nullptr);
        }
      }
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::execve(spec_.binary.c_str(), argv.data(), envp.data());
      const int e = errno;
      char digits[16];
      int n = 0;
      for (int v = e; n < 15; v /= 10) {
        digits[14 - n++] = static_cast<char>('0' + v % 10);
        if (v < 10) break;
      }
      [[maybe_unused]] ssize_t r = ::write(2, exec_failed.data(), exec_failed.size());
      r = ::write(2, digits + 15 - n, n);
      r = ::write(2, ")\n", 2);
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    w.exit.pid = pid;
    w.running = true;
    w.out.fd = out_pipe[0];
    w.out.out_fd = 1;
    w.err.fd = err_pipe[0];
    w.err.out_fd = 2;
    for (int fd : {w.out.fd, w.err.fd}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
  return absl::OkStatus();
}

void WorkerGroup::KillStarted() {
  for (Worker& w : workers_) {
    if (w.running) ::kill(-w.exit.pid, SIGKILL);
  }
  for (Worker& w : workers_) {
    if (!w.running) continue;
    int status;
    while (::waitpid(w.exit.pid, &status, 0) < 0 && errno == EINTR) {
    }
    w.running = false;
  }
}

void WorkerGroup::Emit(Worker& w, const Stream& s, const std::string& line) {
  // One write per line: lines of different ranks never interleave within a line.
  WriteAll(s.out_fd, w.prefix + line + "\n");
  w.tail.push_back(line);
  while (static_cast<int>(w.tail.size()) > spec_.tail_lines) w.tail.pop_front();
}

void WorkerGroup::ReadStream(Worker& w, Stream& s) {
  char buf[65536];
  // A bounded number of reads, so one rank that writes without pause cannot starve the others
  // or the signal handling; poll() comes back to it at once.
  for (int reads = 0; reads < 16; ++reads) {
    const ssize_t n = ::read(s.fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return;  // EAGAIN: nothing more for now
    if (n == 0) {
      FlushAndClose(w, s);
      return;
    }
    s.partial.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = s.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
      Emit(w, s, s.partial.substr(start, nl - start));
    }
    s.partial.erase(0, start);
    while (s.partial.size() >= kMaxLine) {
      Emit(w, s, s.partial.substr(0, kMaxLine));
      s.partial.erase(0, kMaxLine);
    }
  }
}

void WorkerGroup::SignalRunning(int sig) {
  for (Worker& w : workers_) {
    if (!w.running) continue;
    // The group may not exist yet if the child has not run setpgid: signal the pid then.
    if (::kill(-w.exit.pid, sig) != 0) ::kill(w.exit.pid, sig);
    w.exit.signalled = true;
  }
}

void WorkerGroup::Reap() {
  for (;;) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno == EINTR) continue;
    if (pid <= 0) return;
    for (Worker& w : workers_) {
      if (!w.running || w.exit.pid != pid) continue;
      w.running = false;
      w.exit.time = absl::Now();
      if (WIFEXITED(status)) w.exit.exit_code = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) w.exit.term_signal = WTERMSIG(status);
      result_.exit_order.push_back(w.exit.local_rank);
      if (w.exit.failed() && !w.exit.signalled && result_.root_cause < 0) {
        result_.root_cause = w.exit.local_rank;
      }
    }
  }
}

WorkerGroupResult WorkerGroup::Supervise() {
  absl::Time kill_at = absl::InfiniteFuture();
  absl::Time drain_until = absl::InfiniteFuture();
  bool stopping = false;         // the launcher has begun ending the group
  bool failure_handled = false;  // the first failed exit has been acted on
  for (;;) {
    const absl::Time now = absl::Now();
    const bool any_running =
        std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) { return w.running; });
    if (!any_running) {
      if (drain_until == absl::InfiniteFuture()) drain_until = now + kDrainTimeout;
      const bool any_open = std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) {
        return w.out.fd >= 0 || w.err.fd >= 0;
      });
      if (!any_open || now >= drain_until) break;
    }
    if (now >= kill_at) {
      SignalRunning(SIGKILL);
      result_.sigkill_needed = true;
      kill_at = absl::InfiniteFuture();
    }

    std::vector<pollfd> fds;
    std::vector<std::pair<Worker*, Stream*>> owners;
    fds.push_back({signals_.fd(), POLLIN, 0});
    owners.push_back({nullptr, nullptr});
    for (Worker& w : workers_) {
      for (Stream* s : {&w.out, &w.err}) {
        if (s->fd < 0) continue;
        fds.push_back({s->fd, POLLIN, 0});
        owners.push_back({&w, s});
      }
    }
    absl::Duration wait = spec_.monitor_interval;
    wait = std::min(wait, kill_at - now);
    if (!any_running) wait = std::min(wait, drain_until - now);
    const int timeout_ms =
        static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(wait) + 1));
    const int ready = ::poll(fds.data(), fds.size(), timeout_ms);
    if (ready > 0) {
      for (size_t i = 1; i < fds.size(); ++i) {
        if (fds[i].revents != 0) ReadStream(*owners[i].first, *owners[i].second);
      }
    }

    for (int sig : signals_.Drain()) {
      if (sig == SIGCHLD) continue;  // just a wake-up; Reap() below looks
      SignalRunning(sig);
      result_.forwarded.push_back(sig);
      if (IsTerminating(sig)) {
        if (result_.terminating_signal == 0) result_.terminating_signal = sig;
        kill_at = std::min(kill_at, absl::Now() + spec_.signal_grace);
      }
      stopping = true;
    }

    Reap();
    const bool failure = std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) {
      return !w.running && w.exit.failed();
    });
    if (failure && !failure_handled) {
      failure_handled = true;
      if (!stopping) {
        // A rank failed on its own: the rest cannot make progress without it.
        stopping = true;
        SignalRunning(SIGTERM);
        kill_at = std::min(kill_at, absl::Now() + spec_.stop_grace);
      } else {
        // A rank ended badly after a forwarded signal (SIGUSR1: checkpoint and leave). The
        // others got the same signal: give them the signal grace, not another signal that a
        // worker could take as "exit now", before killing them.
        kill_at = std::min(kill_at, absl::Now() + spec_.signal_grace);
      }
    }
  }
  for (Worker& w : workers_) {
    FlushAndClose(w, w.out);
    FlushAndClose(w, w.err);
    w.exit.last_lines.assign(w.tail.begin(), w.tail.end());
    result_.ranks.push_back(w.exit);
  }
  return result_;
}

}  // namespace

bool WorkerGroupResult::AllSucceeded() const {
  return std::none_of(ranks.begin(), ranks.end(), [](const RankExit& r) { return r.failed(); });
}

std::string SignalName(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  if (abbrev == nullptr) return absl::StrCat("signal ", sig);
  return absl::StrCat("SIG", abbrev);
}

absl::StatusOr<WorkerGroupResult> RunWorkerGroup(const WorkerGroupSpec& spec,
                                                 SignalRelay& signals) {
  if (spec.nproc_per_node < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("nproc_per_node must be >= 1, got ", spec.nproc_per_node));
  }
  WorkerGroup group(spec, signals);
  absl::Status started = group.Start();
  if (!started.ok()) {
    group.KillStarted();
    return started;
  }
  return group.Supervise();
}

}  // namespace shoal::launch
