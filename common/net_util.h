// Network addresses as users write them.
#ifndef SHOAL_COMMON_NET_UTIL_H_
#define SHOAL_COMMON_NET_UTIL_H_

#include <string>

#include "absl/status/status.h"

namespace shoal {

// Splits "HOST:PORT" or "[V6]:PORT" into host (brackets removed) and port, the port in
// [min_port, 65535]. kInvalidArgument naming `what` and the text when the host is empty, an IPv6
// host lacks brackets, or the port is missing, not a number or out of range.
absl::Status SplitHostPort(const std::string& text, const std::string& what, int min_port,
                           std::string* host, int* port);

}  // namespace shoal

#endif  // SHOAL_COMMON_NET_UTIL_H_
