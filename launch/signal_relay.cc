#include "launch/signal_relay.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace shoal::launch {
namespace {

// The write end, read by the handler. -1 when no relay is installed.
std::atomic<int> g_write_fd{-1};
// The process that installed the relay: a forked child that has not yet exec'd must not
// report its signals as the launcher's.
std::atomic<pid_t> g_owner{0};

void OnSignal(int sig) {
  const int saved_errno = errno;  // the interrupted code may be about to read errno
  const int fd = g_write_fd.load();
  if (fd >= 0 && ::getpid() == g_owner.load()) {
    const unsigned char byte = static_cast<unsigned char>(sig);
    // A full pipe drops the byte; the loop still wakes up for the ones already queued.
    [[maybe_unused]] ssize_t n = ::write(fd, &byte, 1);
  }
  errno = saved_errno;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SignalRelay>> SignalRelay::Install(
    const std::vector<int>& signals) {
  if (g_write_fd.load() >= 0) {
    return absl::FailedPreconditionError("a SignalRelay is already installed in this process");
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("pipe2 for signals: ", std::strerror(errno)));
  }
  std::unique_ptr<SignalRelay> relay(new SignalRelay(fds[0], fds[1]));
  g_owner.store(::getpid());
  g_write_fd.store(fds[1]);

  struct sigaction ignore = {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  struct sigaction old = {};
  if (::sigaction(SIGPIPE, &ignore, &old) == 0) relay->previous_.emplace_back(SIGPIPE, old);

  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : signals) {
    int flags = SA_RESTART;
    if (sig == SIGCHLD) flags |= SA_NOCLDSTOP;  // stopped children are not exits
    sa.sa_flags = flags;
    if (::sigaction(sig, &sa, &old) != 0) {
      return absl::InternalError(
          absl::StrCat("sigaction(", sig, "): ", std::strerror(errno)));  // ~ restores the rest
    }
    relay->previous_.emplace_back(sig, old);
  }
  return relay;
}

SignalRelay::~SignalRelay() {
  for (auto it = previous_.rbegin(); it != previous_.rend(); ++it) {
    ::sigaction(it->first, &it->second, nullptr);
  }
  g_write_fd.store(-1);
  ::close(read_fd_);
  ::close(write_fd_);
}

std::vector<int> SignalRelay::Drain() {
  std::vector<int> out;
  unsigned char buf[64];
  for (;;) {
    const ssize_t n = ::read(read_fd_, buf, sizeof(buf));
    if (n > 0) {
      out.insert(out.end(), buf, buf + n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;  // EAGAIN: empty
  }
  return out;
}

}  // namespace shoal::launch
