// The shared secret a coordinator and its workers authenticate with: a token file holds it, the
// coordinator (scheduler/coordinator_service.h) compares it, workers and `shoal status`
// (comm/coordinator_client.h) send it as `authorization: Bearer <token>`. Here, below both sides,
// so that a worker reads its token without depending on the server. (Not the training data's
// token files: those are runtime/token_file.h.)
#ifndef SHOAL_COMMON_AUTH_TOKEN_H_
#define SHOAL_COMMON_AUTH_TOKEN_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace shoal {

// Reads a token file: the first line, whitespace trimmed. kInvalidArgument naming the file if it
// is empty, longer than 4 KB or holds non-printable bytes (gRPC metadata must be printable
// ASCII); kNotFound if it cannot be read. Thread-safe.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Whether a and b are equal, in time that depends only on their lengths (so comparing a
// presented token with the job's does not tell an attacker how many leading bytes were right).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace shoal

#endif  // SHOAL_COMMON_AUTH_TOKEN_H_
