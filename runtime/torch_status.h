// CatchTorch: runs a piece of code that may throw a LibTorch (c10::Error) or standard exception
// and turns the exception into a status. runtime/ is where LibTorch's exceptions stop; everything
// above it sees statuses only.
#ifndef SHOAL_RUNTIME_TORCH_STATUS_H_
#define SHOAL_RUNTIME_TORCH_STATUS_H_

#include <c10/util/Exception.h>

#include <exception>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace shoal::runtime {

// Runs `fn`; kInternal "<what>: <the exception's message>" if it throws.
template <typename Fn>
absl::Status CatchTorch(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
  return absl::OkStatus();
}

// The same for code that returns a value: the value, or kInternal as above.
template <typename Fn>
auto CatchTorchOr(const char* what, Fn&& fn) -> absl::StatusOr<decltype(fn())> {
  try {
    return fn();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
}

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_TORCH_STATUS_H_
