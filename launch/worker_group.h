// A WorkerGroup is one attempt at running the local ranks of one node: the ranks are started
// together (fork + exec, each in its own process group), their output is relayed line by line
// with a "[rank<R>]: " prefix, and they are supervised until every one has exited. When a rank
// fails while the others run, the others are stopped (SIGTERM to each process group, SIGKILL
// after a grace period); signals the launcher receives are forwarded to every rank. Restarting
// a failed group is the caller's decision (launcher.cc): a group runs once.
//
// RunWorkerGroup blocks until every rank has exited and its output has been relayed. It forks,
// so call it from a process whose other threads (if any) hold no locks the child would need;
// the child only calls async-signal-safe functions between fork and exec. Not thread-safe.
#ifndef SHOAL_LAUNCH_WORKER_GROUP_H_
#define SHOAL_LAUNCH_WORKER_GROUP_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "launch/signal_relay.h"

namespace shoal::launch {

struct WorkerGroupSpec {
  std::string binary;                // executed for every rank (execve: a path, no PATH search)
  std::string argv0;                 // the ranks' argv[0]; empty: `binary`
  std::vector<std::string> args;     // the ranks' arguments after argv[0]
  int nproc_per_node = 1;            // local ranks, >= 1
  int nnodes = 1;                    // nodes in the job, each running one group
  int node_rank = 0;                 // this node: global rank = node_rank * nproc + local rank
  std::string master_addr = "127.0.0.1";  // MASTER_ADDR: the host of global rank 0
  int master_port = 29500;           // MASTER_PORT
  int restart_count = 0;             // this attempt: 0 the first, k after k restarts
  int max_restarts = 0;              // TORCHELASTIC_MAX_RESTARTS, for the workers' information
  std::string run_id = "none";       // TORCHELASTIC_RUN_ID
  bool set_omp_num_threads = false;  // add OMP_NUM_THREADS=1 (the caller checks and says so)
  absl::Duration monitor_interval = absl::Milliseconds(100);  // longest sleep between checks
  absl::Duration stop_grace = absl::Seconds(5);     // after a failure: SIGTERM, then SIGKILL
  absl::Duration signal_grace = absl::Seconds(30);  // after a forwarded INT/TERM/HUP/QUIT
  int tail_lines = 10;               // output lines kept per rank for the failure report
};

// How one rank ended.
struct RankExit {
  int rank = 0;                         // global
  int local_rank = 0;
  pid_t pid = 0;
  int exit_code = 0;                    // exit status when it exited normally
  int term_signal = 0;                  // the signal that ended it, else 0
  absl::Time time;                      // when the launcher saw it end
  bool signalled = false;               // the launcher had signalled it before it ended
  std::vector<std::string> last_lines;  // its last `tail_lines` lines, stdout and stderr

  bool failed() const { return exit_code != 0 || term_signal != 0; }
  // The code a shell would report: the exit status, or 128 + signal.
  int ShellCode() const { return term_signal != 0 ? 128 + term_signal : exit_code; }
};

struct WorkerGroupResult {
  std::vector<RankExit> ranks;    // indexed by local rank
  std::vector<int> exit_order;    // local ranks in the order they ended
  int root_cause = -1;            // local rank of the first rank that failed before the
                                  // launcher signalled it; -1 when none did
  std::vector<int> forwarded;     // signals forwarded to the ranks, in order
  int terminating_signal = 0;     // the first forwarded INT/TERM/HUP/QUIT, else 0
  bool sigkill_needed = false;    // some rank outlived its grace period

  bool AllSucceeded() const;
};

// Starts the group described by `spec`, supervises it as described above, reading the
// launcher's signals from `signals` (which must relay SIGCHLD and the signals to forward), and
// returns how every rank ended. A failing rank is a result, not an error: the status is
// kInternal only when the launcher itself failed (pipe, fork); ranks already started are then
// killed and reaped before it returns.
absl::StatusOr<WorkerGroupResult> RunWorkerGroup(const WorkerGroupSpec& spec,
                                                 SignalRelay& signals);

// "SIGTERM" for 15; "signal 99" for a number without a name.
std::string SignalName(int sig);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_WORKER_GROUP_H_
