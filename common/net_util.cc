#include "common/net_util.h"

#include <algorithm>
#include <cctype>

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

}  // namespace shoal
