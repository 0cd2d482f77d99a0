// Status helpers shared by every module. shoal uses absl::Status / absl::StatusOr at module
// boundaries; these macros keep the propagation terse. Codes map one-to-one onto gRPC's.
#ifndef SHOAL_COMMON_STATUS_H_
#define SHOAL_COMMON_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define SHOAL_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::absl::Status _shoal_status = (expr);         \
    if (!_shoal_status.ok()) return _shoal_status; \
  } while (0)

#define SHOAL_CONCAT_INNER_(a, b) a##b
#define SHOAL_CONCAT_(a, b) SHOAL_CONCAT_INNER_(a, b)

// `lhs = value of expr`, or returns its status from the enclosing function.
#define SHOAL_ASSIGN_OR_RETURN(lhs, expr) \
  SHOAL_ASSIGN_OR_RETURN_IMPL_(SHOAL_CONCAT_(_shoal_statusor_, __LINE__), lhs, expr)
#define SHOAL_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()

#endif  // SHOAL_COMMON_STATUS_H_
