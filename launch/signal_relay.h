// SignalRelay turns the asynchronous signals `shoal run` handles into bytes on a pipe, so the
// supervision loop can poll() them together with the workers' output instead of doing work in
// a signal handler (the self-pipe trick).
//
// One relay may exist per process at a time. Install() replaces the handlers of the given
// signals and ignores SIGPIPE (a closed stdout must not kill the launcher); the destructor
// restores all of them. The pipe is close-on-exec and non-blocking. Not thread-safe: one thread
// installs, drains and destroys it.
#ifndef SHOAL_LAUNCH_SIGNAL_RELAY_H_
#define SHOAL_LAUNCH_SIGNAL_RELAY_H_

#include <signal.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"

namespace shoal::launch {

class SignalRelay {
 public:
  // kFailedPrecondition if another relay is installed; kInternal if the pipe or sigaction fails.
  static absl::StatusOr<std::unique_ptr<SignalRelay>> Install(const std::vector<int>& signals);
  ~SignalRelay();
  SignalRelay(const SignalRelay&) = delete;
  SignalRelay& operator=(const SignalRelay&) = delete;

  // Readable when a signal has arrived since the last Drain().
  int fd() const { return read_fd_; }

  // The signals received since the last call, in arrival order (a burst of one signal may
  // collapse into fewer entries, as the kernel collapses pending signals). Never blocks.
  std::vector<int> Drain();

 private:
  SignalRelay(int read_fd, int write_fd) : read_fd_(read_fd), write_fd_(write_fd) {}

  int read_fd_;
  int write_fd_;
  std::vector<std::pair<int, struct sigaction>> previous_;  // restored by the destructor
};

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_SIGNAL_RELAY_H_
