// SHA-256 of byte ranges and files, as lowercase hex. Used for token files, checkpoints and
// anything else whose integrity is checked on load. Thread-safe.
#ifndef SHOAL_COMMON_SHA256_H_
#define SHOAL_COMMON_SHA256_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace shoal {

// Hex digest of `size` bytes at `data`.
std::string Sha256Hex(const void* data, size_t size);

// Hex digest of a file's contents. kNotFound / kDataLoss (read error) name the path.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace shoal

#endif  // SHOAL_COMMON_SHA256_H_
