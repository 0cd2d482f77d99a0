#include "comm/c10d_status.h"

#include <c10/util/Exception.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace shoal::comm::internal {

std::string ExceptionText(const std::exception_ptr& e) {
  std::string text;
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& err) {
    // what() appends a multi-line C++ backtrace that helps nobody reading a status.
    text = err.what_without_backtrace();
  } catch (const std::exception& err) {
    text = err.what();
  } catch (...) {
    text = "unknown exception";
  }
  // Gloo prefixes messages with "[/build/.../pair.cc:598] "; the source location is noise too.
  absl::string_view view = absl::StripAsciiWhitespace(text);
  if (absl::StartsWith(view, "[")) {
    const size_t close = view.find("] ");
    if (close != absl::string_view::npos && view.substr(0, close).find(':') != absl::string_view::npos) {
      view.remove_prefix(close + 2);
    }
  }
  return std::string(view);
}

absl::StatusCode ClassifyFailureText(absl::string_view text, absl::StatusCode fallback) {
  const std::string lower = absl::AsciiStrToLower(text);
  // Order matters: "timed out while trying to connect" is a timeout, not a refusal.
  for (const char* needle : {"timed out", "timeout", "deadline"}) {
    if (absl::StrContains(lower, needle)) return absl::StatusCode::kDeadlineExceeded;
  }
  for (const char* needle :
       {"closed by peer", "connection reset", "connection refused", "broken pipe",
        "connection closed", "econnreset", "epipe", "econnrefused", "failed to connect",
        "connect() failed", "no route to host", "network is unreachable", "socket closed",
        "remote process exited", "read error", "write error"}) {
    if (absl::StrContains(lower, needle)) return absl::StatusCode::kUnavailable;
  }
  return fallback;
}

absl::Status StatusFromException(const std::exception_ptr& e, absl::string_view context,
                                 absl::StatusCode fallback) {
  const std::string text = ExceptionText(e);
  return absl::Status(ClassifyFailureText(text, fallback), absl::StrCat(context, ": ", text));
}

}  // namespace shoal::comm::internal
