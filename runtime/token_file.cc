#include "runtime/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/sha256.h"
#include "common/status.h"

// The files hold little-endian uint16 and are read in place through the mapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "shoal token files assume little-endian");

namespace shoal::runtime {

absl::StatusOr<std::unique_ptr<TokenFile>> TokenFile::Open(const std::string& path,
                                                           int vocab_size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const std::string why =
        absl::StrCat("cannot open token file ", path, ": ", std::strerror(errno));
    if (errno == ENOENT) return absl::NotFoundError(why);
    if (errno == EACCES) return absl::PermissionDeniedError(why);
    return absl::InternalError(why);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string why =
        absl::StrCat("cannot stat token file ", path, ": ", std::strerror(errno));
    ::close(fd);
    return absl::InternalError(why);
  }
  const auto bytes = static_cast<size_t>(st.st_size);
  if (!S_ISREG(st.st_mode) || bytes == 0 || bytes % sizeof(uint16_t) != 0) {
    ::close(fd);
    if (!S_ISREG(st.st_mode)) {
      return absl::DataLossError(absl::StrCat("token file ", path, " is not a regular file"));
    }
    if (bytes == 0) return absl::DataLossError(absl::StrCat("token file ", path, " is empty"));
    return absl::DataLossError(absl::StrCat("token file ", path, " has an odd size (", bytes,
                                            " bytes); it must hold whole uint16 ids"));
  }
  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  // The mapping keeps the file alive; the descriptor is no longer needed.
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap token file ", path, " (", bytes,
                                            " bytes): ", std::strerror(errno)));
  }
  std::unique_ptr<TokenFile> file(new TokenFile(path, map, bytes));

  // One sequential pass so that an id the embedding table cannot index is caught here, with its
  // position, rather than as an out-of-range gather deep inside a training step.
  if (vocab_size < 65536) {
    ::madvise(map, bytes, MADV_SEQUENTIAL);
    const uint16_t* ids = file->data();
    const auto limit = static_cast<uint16_t>(vocab_size < 0 ? 0 : vocab_size);
    for (size_t i = 0; i < file->size(); ++i) {
      if (ids[i] >= limit) {
        return absl::DataLossError(absl::StrCat("token file ", path, ": token ", i, " has id ",
                                                ids[i], ", not below the vocab size ", vocab_size));
      }
    }
    ::madvise(map, bytes, MADV_NORMAL);
  }
  return file;
}

TokenFile::TokenFile(std::string path, void* map, size_t bytes)
    : path_(std::move(path)),
      map_(map),
      bytes_(bytes),
      data_(static_cast<const uint16_t*>(map)),
      size_(bytes / sizeof(uint16_t)) {}

TokenFile::~TokenFile() { ::munmap(map_, bytes_); }

namespace {

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return absl::StrCat(dir, name);
  return absl::StrCat(dir, "/", name);
}

// What meta.json says about the folder; only the fields that are checked.
struct Meta {
  int64_t vocab_size = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
  std::string train_sha256;
  std::string val_sha256;
};

absl::StatusOr<Meta> ReadMeta(const std::string& path) {
  SHOAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  const nlohmann::json j = nlohmann::json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError(absl::StrCat(path, " is not a JSON object"));
  }
  if (j.contains("format") && j["format"] != "shoal-tokens-v1") {
    return absl::DataLossError(
        absl::StrCat(path, ": unknown format ", j["format"].dump(), " (expected shoal-tokens-v1)"));
  }
  Meta meta;
  for (auto [key, field] :
       {std::pair{"vocab_size", &meta.vocab_size}, std::pair{"train_tokens", &meta.train_tokens},
        std::pair{"val_tokens", &meta.val_tokens}}) {
    if (!j.contains(key) || !j[key].is_number_integer()) {
      return absl::DataLossError(
          absl::StrCat(path, ": missing or non-integer field \"", key, "\""));
    }
    *field = j[key].get<int64_t>();
  }
  for (auto [key, field] :
       {std::pair{"train_sha256", &meta.train_sha256}, std::pair{"val_sha256", &meta.val_sha256}}) {
    if (!j.contains(key) || !j[key].is_string()) {
      return absl::DataLossError(absl::StrCat(path, ": missing or non-string field \"", key, "\""));
    }
    *field = j[key].get<std::string>();
  }
  return meta;
}

// Checks one token file against meta.json's count and, optionally, checksum.
absl::Status CheckAgainstMeta(const TokenFile& file, const std::string& meta_path, int64_t tokens,
                              const std::string& sha256, bool verify_checksums) {
  if (static_cast<int64_t>(file.size()) != tokens) {
    return absl::DataLossError(absl::StrCat("token file ", file.path(), " holds ", file.size(),
                                            " tokens but ", meta_path, " says ", tokens));
  }
  if (verify_checksums) {
    // Hashing the mapping reads the same bytes the trainer will, without a second open.
    const std::string actual = Sha256Hex(file.data(), file.size() * sizeof(uint16_t));
    if (actual != sha256) {
      return absl::DataLossError(absl::StrCat("token file ", file.path(), " has sha256 ", actual,
                                              " but ", meta_path, " says ", sha256));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckLongerThanBlock(const TokenFile& file, int block_size) {
  if (static_cast<int64_t>(file.size()) <= block_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.block_size (", block_size, ") is longer than the data: ", file.path(),
                     " holds ", file.size(), " tokens, and a window needs block_size + 1"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenDataset> OpenTokenDataset(const std::string& dir, int vocab_size,
                                              int block_size, bool verify_checksums) {
  // meta.json first: a vocab mismatch it reveals explains the problem better than the first
  // out-of-range id the file scan would stop at.
  const std::string meta_path = JoinPath(dir, "meta.json");
  std::optional<Meta> meta;
  if (PathExists(meta_path)) {
    SHOAL_ASSIGN_OR_RETURN(meta, ReadMeta(meta_path));
    if (meta->vocab_size > vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(meta_path, " says the data was tokenized with vocab_size ", meta->vocab_size,
                       ", more than the model's vocab_size ", vocab_size));
    }
  }

  TokenDataset dataset;
  SHOAL_ASSIGN_OR_RETURN(dataset.train, TokenFile::Open(JoinPath(dir, "train.bin"), vocab_size));
  SHOAL_ASSIGN_OR_RETURN(dataset.val, TokenFile::Open(JoinPath(dir, "val.bin"), vocab_size));
  if (meta) {
    SHOAL_RETURN_IF_ERROR(CheckAgainstMeta(*dataset.train, meta_path, meta->train_tokens,
                                           meta->train_sha256, verify_checksums));
    SHOAL_RETURN_IF_ERROR(CheckAgainstMeta(*dataset.val, meta_path, meta->val_tokens,
                                           meta->val_sha256, verify_checksums));
  }
  SHOAL_RETURN_IF_ERROR(CheckLongerThanBlock(*dataset.train, block_size));
  SHOAL_RETURN_IF_ERROR(CheckLongerThanBlock(*dataset.val, block_size));
  return dataset;
}

}  // namespace shoal::runtime
