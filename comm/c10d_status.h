// Converts exceptions thrown by LibTorch's c10d and by Gloo into absl::Status, inside comm/ only.
//
// c10d and Gloo report every failure by throwing (c10::Error, c10d::TimeoutError,
// gloo::IoException, std::runtime_error); uncaught they abort the process. Code that calls them
// catches everything and converts it here, so that the rest of shoal sees status codes:
//   - a timeout ("timed out", "Timeout")                          -> kDeadlineExceeded
//   - a peer that closed or reset its connection, a refused or
//     failed connect, a broken pipe                               -> kUnavailable
//   - anything else                                               -> `fallback` (the caller's)
// The message is `context` + ": " + the exception's text without its C++ backtrace.
#ifndef SHOAL_COMM_C10D_STATUS_H_
#define SHOAL_COMM_C10D_STATUS_H_

#include <exception>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace shoal::comm::internal {

// The text of `e` (c10::Error without its backtrace); "unknown exception" for a non-std one.
std::string ExceptionText(const std::exception_ptr& e);

// The status code that the text of a c10d/Gloo failure implies, or `fallback`.
absl::StatusCode ClassifyFailureText(absl::string_view text, absl::StatusCode fallback);

// Status for the exception `e` thrown by c10d or Gloo while doing `context`.
// REQUIRES: e != nullptr.
absl::Status StatusFromException(const std::exception_ptr& e, absl::string_view context,
                                 absl::StatusCode fallback = absl::StatusCode::kInternal);

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_C10D_STATUS_H_
