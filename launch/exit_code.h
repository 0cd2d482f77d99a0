// How a shoal process ends; the only place that turns a status into an exit code.
//   0    success (also a worker the coordinator drained);
//   2    bad input or usage: invalid argument, not found, failed precondition, and a wrong
//        coordinator token (unauthenticated, permission denied), since retrying the same command
//        cannot help;
//   1    anything else;
//   128 + signal  stopped by SIGINT / SIGTERM / SIGUSR1 (after the checkpoint).
// (`shoal coordinator` and `shoal status` keep their own, narrower mapping: cmd_coordinator.cc.)
#ifndef SHOAL_LAUNCH_EXIT_CODE_H_
#define SHOAL_LAUNCH_EXIT_CODE_H_

#include <atomic>

#include "absl/status/status.h"

namespace shoal::launch {

// The exit code for a failed `status` (2 or 1, above). Prints nothing.
int ExitCodeFor(const absl::Status& status);

// Prints "shoal: error: <message>" to stderr and returns ExitCodeFor(status).
int Fail(const absl::Status& status);

// Installs the stop handler on SIGINT, SIGTERM and SIGUSR1 (Slurm's warning before preemption
// or the time limit). The first signal sets StopRequested(): the trainer finishes its step,
// writes a checkpoint and returns. Another one exits at once with 128 + signal, unless it comes
// within 2 s of the first: under `shoal run` inside Slurm a rank can get the same SIGTERM twice
// (from Slurm and forwarded by the launcher), which must not cut the checkpoint.
void InstallStopHandler();

// Set (once, from the signal handler) by the first stop signal; lives for the whole process.
std::atomic<bool>* StopRequested();

// The first stop signal's number, 0 if none came.
int StopSignal();

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_EXIT_CODE_H_
