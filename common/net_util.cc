#include "common/net_util.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

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

namespace {

// A connected TCP socket to host:port (non-blocking), or -1 when none opens by `deadline`.
int ConnectBy(const std::string& host, int port, absl::Time deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return -1;
  int connected = -1;
  for (addrinfo* a = found; a != nullptr && connected < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                          a->ai_protocol);
    if (fd < 0) continue;
    bool ok = false;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
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
    if (ok) {
      connected = fd;
    } else {
      close(fd);
    }
  }
  freeaddrinfo(found);
  return connected;
}

}  // namespace

bool CanConnect(const std::string& host_port, absl::Duration timeout) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(host_port, "address", 1, &host, &port).ok()) return false;
  const int fd = ConnectBy(host, port, absl::Now() + timeout);
  if (fd < 0) return false;
  close(fd);
  return true;
}

namespace {

// The request HttpGet sends, and where to: checked, nothing sent.
absl::Status PrepareGet(const std::string& url, const std::vector<std::string>& headers,
                        std::string* host_out, int* port_out, std::string* request_out) {
  const std::string scheme = "http://";
  if (url.compare(0, scheme.size(), scheme) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("URL \"", url, "\": only http://HOST[:PORT]/PATH is supported"));
  }
  const size_t slash = url.find('/', scheme.size());
  const std::string authority = url.substr(scheme.size(), slash - scheme.size());
  const std::string path = slash == std::string::npos ? "/" : url.substr(slash);
  std::string host;
  int port = 80;
  if (authority.find(':') != std::string::npos && authority.back() != ']') {
    SHOAL_RETURN_IF_ERROR(SplitHostPort(authority, "URL " + url, 1, &host, &port));
  } else if (authority.size() > 2 && authority.front() == '[' && authority.back() == ']') {
    host = authority.substr(1, authority.size() - 2);
  } else {
    host = authority;
  }
  if (host.empty()) return absl::InvalidArgumentError(absl::StrCat("URL \"", url, "\": no host"));
  for (const std::string& h : {path, host}) {
    for (unsigned char c : h) {
      if (c <= 0x20 || c == 0x7f) {
        return absl::InvalidArgumentError(
            absl::StrCat("URL \"", url, "\": a space or control byte in it"));
      }
    }
  }
  std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", authority, "\r\n");
  for (const std::string& h : headers) {
    if (h.find('\r') != std::string::npos || h.find('\n') != std::string::npos ||
        h.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("header \"", h, "\": want one line NAME: VALUE"));
    }
    absl::StrAppend(&request, h, "\r\n");
  }
  absl::StrAppend(&request, "Connection: close\r\n\r\n");
  *host_out = host;
  *port_out = port;
  *request_out = std::move(request);
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckHttpGet(const std::string& url, const std::vector<std::string>& headers) {
  std::string host, request;
  int port = 0;
  return PrepareGet(url, headers, &host, &port, &request);
}

absl::StatusOr<HttpReply> HttpGet(const std::string& url, const std::vector<std::string>& headers,
                                  absl::Duration timeout, int64_t max_body_bytes) {
  std::string host, request;
  int port = 0;
  SHOAL_RETURN_IF_ERROR(PrepareGet(url, headers, &host, &port, &request));
  const absl::Time deadline = absl::Now() + timeout;
  const int fd = ConnectBy(host, port, deadline);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": cannot connect"));
  }
  auto wait = [&](short events) {
    pollfd p{fd, events, 0};
    const int64_t ms = std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - absl::Now()));
    return poll(&p, 1, static_cast<int>(ms)) == 1;
  };
  size_t sent = 0;
  while (sent < request.size()) {
    if (!wait(POLLOUT)) break;
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0 && errno != EAGAIN && errno != EINTR) break;
    if (n > 0) sent += static_cast<size_t>(n);
  }
  std::string reply;
  const size_t cap = static_cast<size_t>(max_body_bytes) + 16384;  // the head's room too
  bool closed = false;
  while (sent == request.size() && reply.size() < cap && wait(POLLIN)) {
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) {
      closed = true;
      break;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      break;
    }
    reply.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  if (sent != request.size() || (!closed && reply.size() < cap)) {
    return absl::DeadlineExceededError(
        absl::StrCat("GET ", url, ": no whole reply within ", absl::FormatDuration(timeout)));
  }
  const size_t head_end = reply.find("\r\n\r\n");
  int status = 0;
  if (reply.compare(0, 5, "HTTP/") != 0 || head_end == std::string::npos ||
      reply.find(' ') == std::string::npos ||
      !absl::SimpleAtoi(reply.substr(reply.find(' ') + 1, 3), &status) || status < 100 ||
      status > 599) {
    return absl::DataLossError(absl::StrCat("GET ", url, ": not an HTTP reply"));
  }
  HttpReply out;
  out.status = status;
  out.body = reply.substr(head_end + 4, static_cast<size_t>(max_body_bytes));
  return out;
}

}  // namespace shoal
