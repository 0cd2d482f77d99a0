#include "launch/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "launch/signal_relay.h"
#include "launch/worker_group.h"

namespace shoal::launch {
namespace {

constexpr char kSelfExe[] = "/proc/self/exe";
constexpr int kDefaultRdzvPort = 29400;  // torchrun's port when --rdzv-endpoint has none

// The command line as given, before validation.
struct LauncherFlags {
  std::string nproc_per_node = "1";
  std::string nnodes = "1";
  int node_rank = -1;  // -1: not given
  std::string rdzv_endpoint;
  std::string rdzv_backend = "static";
  std::string rdzv_id = "none";
  std::string master_addr;  // empty: not given
  int master_port = -1;     // -1: not given
  int max_restarts = 0;
  bool standalone = false;
  double monitor_interval_s = 0.1;
  double stop_grace_s = 5;
  double signal_grace_s = 30;
  std::string worker_binary = kSelfExe;
  std::vector<std::string> worker_args;
  bool had_separator = false;  // the worker arguments came after `--`
};

void Say(const std::string& message) {
  const std::string line = "shoal run: " + message + "\n";
  [[maybe_unused]] ssize_t n = ::write(2, line.data(), line.size());
}

absl::Status FlagError(const std::string& message) {
  return absl::InvalidArgumentError(message);
}

// A free TCP port on 127.0.0.1, found by binding port 0. Another process could take it before
// rank 0 binds it; torchrun's --standalone has the same window.
absl::StatusOr<int> FreeLocalPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int e = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat("finding a free port on 127.0.0.1: ",
                                            std::strerror(e)));
  }
  ::close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

std::string RandomRunId() {
  std::random_device rd;
  return absl::StrCat(absl::Hex(rd(), absl::kZeroPad8), absl::Hex(rd(), absl::kZeroPad8));
}

// "host", "host:port" or "[v6addr]:port"; the port defaults to 29400 as in torchrun.
absl::Status ParseEndpoint(const std::string& endpoint, std::string& host, int& port) {
  std::string port_s;
  if (!endpoint.empty() && endpoint[0] == '[') {
    const size_t close = endpoint.find(']');
    if (close == std::string::npos) {
      return FlagError(absl::StrCat("--rdzv-endpoint '", endpoint, "': unbalanced '['"));
    }
    host = endpoint.substr(1, close - 1);
    if (close + 1 < endpoint.size()) {
      if (endpoint[close + 1] != ':') {
        return FlagError(absl::StrCat("--rdzv-endpoint '", endpoint, "' is not HOST[:PORT]"));
      }
      port_s = endpoint.substr(close + 2);
    }
  } else {
    const size_t colon = endpoint.rfind(':');
    host = endpoint.substr(0, colon);
    if (colon != std::string::npos) port_s = endpoint.substr(colon + 1);
  }
  if (host.empty()) {
    return FlagError(absl::StrCat("--rdzv-endpoint '", endpoint, "' has no host"));
  }
  port = kDefaultRdzvPort;
  if (!port_s.empty() && (!absl::SimpleAtoi(port_s, &port) || port < 1 || port > 65535)) {
    return FlagError(absl::StrCat("--rdzv-endpoint '", endpoint, "': port '", port_s,
                                  "' is not in 1-65535"));
  }
  return absl::OkStatus();
}

// Checks the flags and turns them into the spec of the first attempt.
absl::StatusOr<WorkerGroupSpec> BuildSpec(const LauncherFlags& f) {
  WorkerGroupSpec spec;
  if (f.worker_args.empty()) {
    return FlagError(
        "no worker command: give it after `--`, e.g. shoal run --nproc-per-node 2 -- train "
        "--config x.toml");
  }
  if (!f.had_separator && f.worker_args[0].size() > 1 && f.worker_args[0][0] == '-') {
    return FlagError(absl::StrCat("unknown flag '", f.worker_args[0],
                                  "' (worker arguments go after `--`)"));
  }
  spec.args = f.worker_args;

  if (f.nproc_per_node == "cpu" || f.nproc_per_node == "auto") {
    spec.nproc_per_node = std::max(1u, std::thread::hardware_concurrency());
  } else if (!absl::SimpleAtoi(f.nproc_per_node, &spec.nproc_per_node) ||
             spec.nproc_per_node < 1 || spec.nproc_per_node > 4096) {
    return FlagError(absl::StrCat("--nproc-per-node '", f.nproc_per_node,
                                  "' is not a count in 1-4096, 'cpu' or 'auto'"));
  }

  std::vector<std::string> range = absl::StrSplit(f.nnodes, ':');
  int min_nodes = 0, max_nodes = 0;
  if (range.size() > 2 || !absl::SimpleAtoi(range[0], &min_nodes) ||
      !absl::SimpleAtoi(range.back(), &max_nodes) || min_nodes < 1) {
    return FlagError(absl::StrCat("--nnodes '", f.nnodes, "' is not N or MIN:MAX with N >= 1"));
  }
  if (min_nodes != max_nodes) {
    return FlagError(absl::StrCat("--nnodes '", f.nnodes,
                                  "': elastic node ranges are not supported (static "
                                  "rendezvous); give a fixed count"));
  }
  spec.nnodes = min_nodes;

  if (f.rdzv_backend != "static" && f.rdzv_backend != "c10d") {
    return FlagError(absl::StrCat("--rdzv-backend '", f.rdzv_backend,
                                  "' is not supported; use static (c10d is taken as static)"));
  }

  if (f.node_rank >= 0) {
    if (f.node_rank >= spec.nnodes) {
      return FlagError(absl::StrCat("--node-rank ", f.node_rank, " is not below --nnodes ",
                                    spec.nnodes));
    }
    spec.node_rank = f.node_rank;
  } else if (spec.nnodes > 1) {
    return FlagError(absl::StrCat("--node-rank is required with --nnodes ", spec.nnodes,
                                  " (static rendezvous: every node names its own rank)"));
  }

  const bool explicit_master = !f.master_addr.empty() || f.master_port >= 0;
  if (!f.rdzv_endpoint.empty() && explicit_master) {
    return FlagError("give --rdzv-endpoint or --master-addr/--master-port, not both");
  }
  if (f.master_port >= 0 && (f.master_port < 1 || f.master_port > 65535)) {
    return FlagError(absl::StrCat("--master-port ", f.master_port, " is not in 1-65535"));
  }
  spec.run_id = f.rdzv_id;
  if (f.standalone) {
    if (spec.nnodes != 1) {
      return FlagError(absl::StrCat("--standalone is for one node, but --nnodes is ",
                                    spec.nnodes));
    }
    if (explicit_master || !f.rdzv_endpoint.empty()) {
      return FlagError(
          "--standalone picks its own address and port; drop --master-addr, --master-port "
          "and --rdzv-endpoint");
    }
    spec.master_addr = "127.0.0.1";
    SHOAL_ASSIGN_OR_RETURN(spec.master_port, FreeLocalPort());
    if (spec.run_id == "none") spec.run_id = RandomRunId();
  } else if (!f.rdzv_endpoint.empty()) {
    SHOAL_RETURN_IF_ERROR(ParseEndpoint(f.rdzv_endpoint, spec.master_addr, spec.master_port));
  } else {
    if (!f.master_addr.empty()) spec.master_addr = f.master_addr;
    if (f.master_port >= 0) spec.master_port = f.master_port;
  }
  if (spec.nnodes > 1 && f.master_addr.empty() && f.rdzv_endpoint.empty()) {
    return FlagError(absl::StrCat("--master-addr (or --rdzv-endpoint) is required with --nnodes ",
                                  spec.nnodes, ": it names the host of rank 0 to every node"));
  }

  if (f.max_restarts < 0) {
    return FlagError(absl::StrCat("--max-restarts ", f.max_restarts, " is negative"));
  }
  spec.max_restarts = f.max_restarts;
  if (!(f.monitor_interval_s > 0) || f.monitor_interval_s > 3600) {
    return FlagError(absl::StrCat("--monitor-interval ", f.monitor_interval_s,
                                  " is not in (0, 3600] seconds"));
  }
  spec.monitor_interval = absl::Seconds(f.monitor_interval_s);
  if (!(f.stop_grace_s >= 0) || !(f.signal_grace_s >= 0)) {
    return FlagError("--stop-grace and --signal-grace must be >= 0 seconds");
  }
  spec.stop_grace = absl::Seconds(f.stop_grace_s);
  spec.signal_grace = absl::Seconds(f.signal_grace_s);

  spec.binary = f.worker_binary;
  if (::access(spec.binary.c_str(), X_OK) != 0) {
    return FlagError(absl::StrCat("--worker-binary '", spec.binary,
                                  "' is not an executable file: ", std::strerror(errno)));
  }
  if (spec.binary == kSelfExe) {
    // The ranks run this very binary; name it as the user would in messages and `ps`.
    char path[PATH_MAX];
    const ssize_t n = ::readlink(kSelfExe, path, sizeof(path) - 1);
    spec.argv0 = n > 0 ? std::string(path, n) : "shoal";
  }
  return spec;
}

std::string Hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

std::string DescribeEnd(const RankExit& r) {
  if (r.term_signal != 0) {
    return absl::StrCat(-r.term_signal, " (", SignalName(r.term_signal), ")");
  }
  return absl::StrCat(r.exit_code);
}

// torchrun's ChildFailedError block: the root cause first, then the others.
void PrintFailureReport(const WorkerGroupSpec& spec, const WorkerGroupResult& result) {
  const RankExit& root = result.ranks[result.root_cause];
  const std::string host = Hostname();
  const std::string rule(64, '=');
  const std::string thin(64, '-');
  std::string out = rule + "\n";
  absl::StrAppend(&out, "shoal run: worker group FAILED (attempt ", spec.restart_count + 1,
                  ", restarts used ", spec.restart_count, " of ", spec.max_restarts, ")\n");
  absl::StrAppend(&out, "command   : ", spec.argv0.empty() ? spec.binary : spec.argv0, " ",
                  absl::StrJoin(spec.args, " "), "\n", thin, "\n");
  absl::StrAppend(&out, "Root Cause (first observed failure):\n[0]:\n");
  absl::StrAppend(&out, "  time      : ",
                  absl::FormatTime("%Y-%m-%d_%H:%M:%S", root.time, absl::LocalTimeZone()), "\n");
  absl::StrAppend(&out, "  host      : ", host, "\n");
  absl::StrAppend(&out, "  rank      : ", root.rank, " (local_rank: ", root.local_rank, ")\n");
  absl::StrAppend(&out, "  exitcode  : ", DescribeEnd(root), " (pid: ", root.pid, ")\n");
  if (root.last_lines.empty()) {
    absl::StrAppend(&out, "  last output: <none>\n");
  } else {
    absl::StrAppend(&out, "  last output (", root.last_lines.size(), " lines):\n");
    for (const std::string& line : root.last_lines) absl::StrAppend(&out, "    ", line, "\n");
  }
  absl::StrAppend(&out, thin, "\nOther Failures:\n");
  int others = 0;
  std::vector<std::string> stopped;
  for (const RankExit& r : result.ranks) {
    if (r.local_rank == result.root_cause) continue;
    if (r.signalled) {
      stopped.push_back(absl::StrCat(r.rank, " (", r.term_signal != 0
                                                         ? SignalName(r.term_signal)
                                                         : absl::StrCat("exit ", r.exit_code),
                                     ")"));
    } else if (r.failed()) {
      absl::StrAppend(&out, "[", ++others, "]:\n  rank      : ", r.rank,
                      " (local_rank: ", r.local_rank, ")\n  exitcode  : ", DescribeEnd(r),
                      " (pid: ", r.pid, ")\n");
    }
  }
  if (others == 0) absl::StrAppend(&out, "  <NO_OTHER_FAILURES>\n");
  if (!stopped.empty()) {
    absl::StrAppend(&out, "Stopped by the launcher: rank ", absl::StrJoin(stopped, ", rank "),
                    result.sigkill_needed ? " (some needed SIGKILL)" : "", "\n");
  }
  absl::StrAppend(&out, rule, "\n");
  [[maybe_unused]] ssize_t n = ::write(2, out.data(), out.size());
}

// The worker arguments of attempt `restart`: `--resume` added after the first.
std::vector<std::string> ArgsForAttempt(const std::vector<std::string>& args, int restart) {
  std::vector<std::string> out = args;
  if (restart > 0 && std::find(out.begin(), out.end(), "--resume") == out.end()) {
    out.push_back("--resume");
  }
  return out;
}

int Supervise(WorkerGroupSpec spec) {
  const std::vector<std::string> base_args = spec.args;
  absl::StatusOr<std::unique_ptr<SignalRelay>> relay =
      SignalRelay::Install({SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGCHLD});
  if (!relay.ok()) {
    Say(absl::StrCat("error: ", relay.status().message()));
    return 1;
  }
  for (int restart = 0;; ++restart) {
    spec.restart_count = restart;
    spec.args = ArgsForAttempt(base_args, restart);
    absl::StatusOr<WorkerGroupResult> result = RunWorkerGroup(spec, **relay);
    if (!result.ok()) {
      Say(absl::StrCat("error: ", result.status().message()));
      return 1;
    }
    if (result->root_cause >= 0) PrintFailureReport(spec, *result);
    if (result->terminating_signal != 0) {
      Say(absl::StrCat("received ", SignalName(result->terminating_signal),
                       "; forwarded it to the ranks, which have exited",
                       result->sigkill_needed ? " (some after SIGKILL)" : ""));
      return 128 + result->terminating_signal;
    }
    if (!result->forwarded.empty()) {
      // SIGUSR1 only: the ranks checkpointed and left on request; not a failure to restart.
      for (int local : result->exit_order) {
        if (result->ranks[local].failed()) return result->ranks[local].ShellCode();
      }
      return 0;
    }
    if (result->AllSucceeded()) return 0;
    if (result->root_cause < 0) {  // cannot happen: a failure nobody caused
      Say("error: worker group failed without a root cause");
      return 1;
    }
    const int code = result->ranks[result->root_cause].ShellCode();
    if (restart >= spec.max_restarts) {
      if (spec.max_restarts > 0) {
        Say(absl::StrCat("no restarts left (", spec.max_restarts, " used); exiting ", code));
      }
      return code;
    }
    // A signal that arrived between the groups ends the run instead of restarting it.
    for (int sig : (*relay)->Drain()) {
      if (sig != SIGCHLD) {
        Say(absl::StrCat("received ", SignalName(sig), "; not restarting"));
        return sig == SIGUSR1 ? code : 128 + sig;
      }
    }
    Say(absl::StrCat("restarting the worker group (restart ", restart + 1, " of ",
                     spec.max_restarts, "); the ranks get --resume and SHOAL_RESTART_COUNT=",
                     restart + 1));
  }
}

constexpr char kFooter[] = R"(
Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT / SHOAL_RESTART_COUNT and
TORCHELASTIC_MAX_RESTARTS. Output lines are prefixed [rank<R>]:. SIGINT, SIGTERM, SIGHUP,
SIGQUIT and SIGUSR1 are forwarded. When a rank fails the others are stopped, a root-cause
report is printed and, while --max-restarts allows, the group restarts with --resume appended.
Multi-node: run the same command on every node with --nnodes N --node-rank R --master-addr A.
Examples:
  shoal run --standalone --nproc-per-node 2 -- train --config configs/tiny.toml
  shoal run --nproc-per-node 2 --max-restarts 3 -- train --config run.toml)";

}  // namespace

int RunLauncherMain(int argc, char** argv) {
  LauncherFlags f;
  CLI::App app{"shoal run: start and supervise the local ranks of a job (torchrun-compatible)",
               "shoal run"};
  app.footer(kFooter);
  app.add_option("--nproc-per-node,--nproc_per_node", f.nproc_per_node,
                 "Ranks on this node: a count, 'cpu' or 'auto' (= cores)")
      ->envname("PET_NPROC_PER_NODE")
      ->capture_default_str();
  app.add_option("--nnodes", f.nnodes, "Nodes in the job: N (or N:N)")
      ->envname("PET_NNODES")
      ->capture_default_str();
  app.add_option("--node-rank,--node_rank", f.node_rank,
                 "This node's rank, 0..nnodes-1 (required when nnodes > 1)")
      ->envname("PET_NODE_RANK");
  app.add_option("--master-addr,--master_addr", f.master_addr,
                 "Host of global rank 0 (default 127.0.0.1)")
      ->envname("PET_MASTER_ADDR");
  app.add_option("--master-port,--master_port", f.master_port,
                 "Port of the rendezvous store on the master (default 29500)")
      ->envname("PET_MASTER_PORT");
  app.add_option("--rdzv-endpoint,--rdzv_endpoint", f.rdzv_endpoint,
                 "HOST[:PORT] of the rendezvous (port 29400 if left out); the same as "
                 "--master-addr/--master-port")
      ->envname("PET_RDZV_ENDPOINT");
  app.add_option("--rdzv-backend,--rdzv_backend", f.rdzv_backend,
                 "static (c10d is accepted and taken as static)")
      ->envname("PET_RDZV_BACKEND")
      ->capture_default_str();
  app.add_option("--rdzv-id,--rdzv_id", f.rdzv_id, "Job id, given to the ranks as "
                 "TORCHELASTIC_RUN_ID")
      ->envname("PET_RDZV_ID");
  app.add_flag("--standalone", f.standalone,
               "One node: rendezvous on a free port of 127.0.0.1")
      ->envname("PET_STANDALONE");
  app.add_option("--max-restarts,--max_restarts", f.max_restarts,
                 "Times to restart the whole group after a failure (workers get --resume)")
      ->envname("PET_MAX_RESTARTS")
      ->capture_default_str();
  app.add_option("--monitor-interval,--monitor_interval", f.monitor_interval_s,
                 "Seconds between checks of the ranks (exits are also noticed at once)")
      ->envname("PET_MONITOR_INTERVAL")
      ->capture_default_str();
  app.add_option("--stop-grace,--stop_grace", f.stop_grace_s,
                 "Seconds between SIGTERM and SIGKILL when stopping the ranks after a failure")
      ->capture_default_str();
  app.add_option("--signal-grace,--signal_grace", f.signal_grace_s,
                 "Seconds the ranks get after a forwarded SIGINT/SIGTERM/SIGHUP/SIGQUIT "
                 "before SIGKILL")
      ->capture_default_str();
  app.add_option("--worker-binary,--worker_binary", f.worker_binary,
                 "Program each rank runs (default: this shoal binary)")
      ->capture_default_str();

  // Everything after the first `--` is the workers'. Without one, the first word that is not a
  // launcher flag starts them (torchrun's form).
  int split = argc;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--") == 0) {
      split = i;
      break;
    }
  }
  if (split == argc) app.prefix_command();
  try {
    app.parse(split, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  f.had_separator = split < argc;
  if (f.had_separator) {
    f.worker_args.assign(argv + split + 1, argv + argc);
  } else {
    f.worker_args = app.remaining();
  }

  absl::StatusOr<WorkerGroupSpec> spec = BuildSpec(f);
  if (!spec.ok()) {
    Say(absl::StrCat("error: ", spec.status().message()));
    return spec.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  if (spec->nproc_per_node > 1 && ::getenv("OMP_NUM_THREADS") == nullptr) {
    spec->set_omp_num_threads = true;
    Say(absl::StrCat("OMP_NUM_THREADS is not set; setting it to 1 for each of the ",
                     spec->nproc_per_node,
                     " ranks so they do not oversubscribe the cores (export it to tune)"));
  }
  return Supervise(*std::move(spec));
}

}  // namespace shoal::launch
