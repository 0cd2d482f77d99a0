#include "common/net_util.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace shoal {

absl::Status SplitHostPort(const std::string& text, const std::string& what, int min_port,
                           std::string* host, int* port) {
  const auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " \"", text, "\": ", why, " (want HOST:PORT)"));
  };
  std::string port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("unterminated [IPv6] host or no port after it");
    }
    *host = text.substr(1, close - 1);
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos) return bad("no port");
    *host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host->find(':') != std::string::npos) return bad("an IPv6 host needs brackets");
  }
  if (host->empty()) return bad("empty host");
  int value = 0;
  if (port_text.empty() || port_text.size() > 5 ||
      !std::all_of(port_text.begin(), port_text.end(),
                   [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }) ||
      !absl::SimpleAtoi(port_text, &value) || value < min_port || value > 65535) {
    return bad(absl::StrCat("the port must be a number in [", min_port, ", 65535], got \"",
                            port_text, "\""));
  }
  *port = value;
  return absl::OkStatus();
}

bool CanConnect(const std::string& host_port, absl::Duration timeout) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(host_port, "address", 1, &host, &port).ok()) return false;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return false;
  const absl::Time deadline = absl::Now() + timeout;
  bool ok = false;
  for (addrinfo* a = found; a != nullptr && !ok; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                          a->ai_protocol);
    if (fd < 0) continue;
    int rc = connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc == 0) {
      ok = true;
    } else if (errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      const int64_t ms = std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (poll(&p, 1, static_cast<int>(ms)) == 1) {
        int err = 0;
        socklen_t len = sizeof(err);
        ok = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
      }
    }
    close(fd);
  }
  freeaddrinfo(found);
  return ok;
}

}  // namespace shoal
