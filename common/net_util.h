// Network addresses as users write them.
#ifndef SHOAL_COMMON_NET_UTIL_H_
#define SHOAL_COMMON_NET_UTIL_H_

#include <string>

#include "absl/status/status.h"
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

}  // namespace shoal

#endif  // SHOAL_COMMON_NET_UTIL_H_
