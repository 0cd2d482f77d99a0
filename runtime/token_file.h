// Token files: flat little-endian uint16 arrays (nanoGPT's train.bin / val.bin), memory-mapped
// read-only. Opening validates the file (size even and non-zero, every id < vocab_size), so the
// trainer never indexes an embedding out of range. Immutable after Open; thread-safe.
#ifndef SHOAL_RUNTIME_TOKEN_FILE_H_
#define SHOAL_RUNTIME_TOKEN_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace shoal::runtime {

class TokenFile {
 public:
  // Maps `path`. kNotFound if missing; kDataLoss (naming the file) when empty, of odd size, or
  // holding an id >= vocab_size (the message gives the first bad position and value);
  // kPermissionDenied / kInternal when it cannot be opened or mapped for another reason.
  // The id scan is skipped when vocab_size >= 65536, since no uint16 can exceed it.
  static absl::StatusOr<std::unique_ptr<TokenFile>> Open(const std::string& path, int vocab_size);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const uint16_t* data() const { return data_; }
  // Number of tokens.
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  TokenFile(std::string path, void* map, size_t bytes);
  std::string path_;
  void* map_;
  size_t bytes_;
  const uint16_t* data_;
  size_t size_;
};

// The token files of one prepared data folder.
struct TokenDataset {
  std::unique_ptr<TokenFile> train;
  std::unique_ptr<TokenFile> val;
};

// Opens DIR/train.bin and DIR/val.bin. When DIR/meta.json exists it is checked too: its
// vocab_size must be <= `vocab_size`, token counts must match the files, and with
// `verify_checksums` the sha256 of each file must match. Each file must hold more than
// `block_size` tokens (one window plus its shifted target). Errors name the file and the problem:
// kNotFound / kDataLoss as for TokenFile::Open; kDataLoss for a meta.json that does not parse or
// does not match the files; kInvalidArgument when meta.json's vocab_size exceeds `vocab_size` or
// a file is not longer than `block_size` (the message names model.block_size).
absl::StatusOr<TokenDataset> OpenTokenDataset(const std::string& dir, int vocab_size,
                                              int block_size, bool verify_checksums);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_TOKEN_FILE_H_
