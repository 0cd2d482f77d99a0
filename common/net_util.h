// Network addresses as users write them.
#ifndef SHOAL_COMMON_NET_UTIL_H_
#define SHOAL_COMMON_NET_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace shoal {

// Splits "HOST:PORT" or "[V6]:PORT" into host (brackets removed) and port, the port in
// [min_port, 65535]. kInvalidArgument naming `what` and the text when the host is empty, an IPv6
// host lacks brackets, or the port is missing, not a number or out of range.
absl::Status SplitHostPort(const std::string& text, const std::string& what, int min_port,
                           std::string* host, int* port);

// Whether a TCP connection to HOST:PORT opens within `timeout` (closed at once; nothing is sent).
// False for an address that does not parse or resolve.
bool CanConnect(const std::string& host_port, absl::Duration timeout);

// A plain HTTP/1.0 GET of http://HOST[:PORT]/PATH (no TLS, no redirects), with extra header
// lines ("NAME: VALUE"), all within `timeout`; the body cut at max_body_bytes. For a cloud's
// instance metadata (a preemption notice). kInvalidArgument for a URL or header it cannot send,
// kUnavailable when nothing answers, kDeadlineExceeded, kDataLoss for a reply that is not HTTP.
struct HttpReply {
  int status = 0;
  std::string body;
};
absl::StatusOr<HttpReply> HttpGet(const std::string& url, const std::vector<std::string>& headers,
                                  absl::Duration timeout, int64_t max_body_bytes = 1 << 16);
// HttpGet's checks of the URL and headers alone (nothing is resolved or sent).
absl::Status CheckHttpGet(const std::string& url, const std::vector<std::string>& headers);

}  // namespace shoal

#endif  // SHOAL_COMMON_NET_UTIL_H_
