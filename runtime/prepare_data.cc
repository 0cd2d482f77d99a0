#include "runtime/prepare_data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/progress.h"
#include "common/sha256.h"
#include "common/status.h"
#include "common/utf8.h"
#include "runtime/tokenizer.h"

// The token files are little-endian uint16; writing the in-memory ids verbatim is only right on a
// little-endian host, which is every machine shoal targets.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "shoal token files assume little-endian");

namespace shoal::runtime {
namespace {

constexpr absl::string_view kDocumentSeparator = "\n\n";
// Big enough to read at disk speed, small enough for the progress bar to move on a large file.
constexpr size_t kReadChunk = size_t{8} << 20;

struct InputFile {
  std::string path;
  uint64_t size;
};

bool IsHidden(const std::string& name) { return !name.empty() && name[0] == '.'; }

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return absl::StrCat(dir, name);
  return absl::StrCat(dir, "/", name);
}

// Appends the regular files under `dir` (recursively, hidden entries skipped) to `files`.
// Symlinks to files are followed; symlinks to folders are not, so a link cycle
// cannot make the walk endless. `skip_dir` (the output folder, if it lies inside an input) is not
// entered, so a rerun does not read its own previous outputs as text.
absl::Status WalkDirectory(const std::string& dir, const std::filesystem::path& skip_dir,
                           std::vector<InputFile>* files) {
  SHOAL_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(dir));
  for (const std::string& name : names) {
    if (IsHidden(name)) continue;
    const std::string path = JoinPath(dir, name);
    struct stat lst;
    if (::lstat(path.c_str(), &lst) != 0) continue;  // vanished while walking
    if (S_ISDIR(lst.st_mode)) {
      std::error_code ec;
      if (!skip_dir.empty() && std::filesystem::equivalent(path, skip_dir, ec)) continue;
      SHOAL_RETURN_IF_ERROR(WalkDirectory(path, skip_dir, files));
      continue;
    }
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) continue;  // dangling symlink
    if (S_ISREG(st.st_mode)) files->push_back({path, static_cast<uint64_t>(st.st_size)});
  }
  return absl::OkStatus();
}

// Expands the --input arguments into files: an explicit file is taken as is (even if hidden), a
// folder contributes its files in sorted order. Arguments keep their command-line order.
absl::StatusOr<std::vector<InputFile>> CollectInputs(const std::vector<std::string>& inputs,
                                                     const std::string& out_dir) {
  std::error_code ec;
  std::filesystem::path skip_dir;
  if (IsDirectory(out_dir)) skip_dir = std::filesystem::canonical(out_dir, ec);
  std::vector<InputFile> files;
  for (const std::string& input : inputs) {
    struct stat st;
    if (::stat(input.c_str(), &st) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--input ", input, ": ", std::strerror(errno)));
    }
    if (S_ISDIR(st.st_mode)) {
      std::vector<InputFile> found;
      SHOAL_RETURN_IF_ERROR(WalkDirectory(input, skip_dir, &found));
      // A depth-first walk is not path order: "a/x" comes before "a.txt" but sorts after it.
      std::sort(found.begin(), found.end(),
                [](const InputFile& a, const InputFile& b) { return a.path < b.path; });
      files.insert(files.end(), found.begin(), found.end());
    } else if (S_ISREG(st.st_mode)) {
      files.push_back({input, static_cast<uint64_t>(st.st_size)});
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--input ", input, " is neither a regular file nor a folder"));
    }
  }
  return files;
}

// Reads `file` whole, advancing `progress` (bytes over all inputs) as chunks arrive.
absl::StatusOr<std::string> ReadInput(const InputFile& file, uint64_t done_before,
                                      ProgressBar* progress) {
  int fd = ::open(file.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read input ", file.path, ": ", std::strerror(errno)));
  }
  std::string text;
  text.reserve(file.size);
  std::unique_ptr<char[]> buf(new char[kReadChunk]);
  while (true) {
    ssize_t got = ::read(fd, buf.get(), kReadChunk);
    if (got < 0) {
      if (errno == EINTR) continue;
      absl::Status s = absl::DataLossError(
          absl::StrCat("read error on ", file.path, ": ", std::strerror(errno)));
      ::close(fd);
      return s;
    }
    if (got == 0) break;
    text.append(buf.get(), static_cast<size_t>(got));
    if (progress != nullptr) progress->Update(done_before + text.size());
  }
  ::close(fd);
  return text;
}

absl::string_view AsBytes(const uint16_t* ids, size_t count) {
  return absl::string_view(reinterpret_cast<const char*>(ids), count * sizeof(uint16_t));
}

// One output of the run: its final path and what goes in it.
struct Output {
  std::string path;
  absl::string_view contents;
};

// Writes every output to a temporary sibling first, then renames them into place in order
// (meta.json last). A failure while writing (full disk, bad permissions) leaves the folder's
// previous contents untouched; each rename is atomic, and meta.json, which names the checksums of
// the .bin files, only appears once they are in place.
absl::Status WriteOutputs(const std::vector<Output>& outputs, const std::string& dir) {
  std::vector<std::string> temps;
  auto remove_temps = [&temps] {
    for (const std::string& t : temps) ::unlink(t.c_str());
  };
  for (const Output& out : outputs) {
    temps.push_back(absl::StrCat(out.path, ".tmp.", ::getpid()));
    absl::Status s = WriteFileSynced(temps.back(), out.contents);
    if (!s.ok()) {
      remove_temps();
      return s;
    }
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (::rename(temps[i].c_str(), outputs[i].path.c_str()) != 0) {
      absl::Status s = absl::InternalError(
          absl::StrCat("cannot rename onto ", outputs[i].path, ": ", std::strerror(errno)));
      remove_temps();
      return s;
    }
  }
  return FsyncDirectory(dir);
}

}  // namespace

absl::Status PrepareData(const PrepareDataOptions& options) {
  // Written as a negated range test so that NaN is rejected too.
  if (!(options.val_fraction > 0.0 && options.val_fraction <= 0.5)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--val-fraction must be in (0, 0.5], got ", options.val_fraction));
  }
  if (options.inputs.empty()) return absl::InvalidArgumentError("no --input given");
  if (options.out_dir.empty()) return absl::InvalidArgumentError("--out is empty");
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, MakeTokenizer(options.tokenizer));
  SHOAL_ASSIGN_OR_RETURN(std::vector<InputFile> files,
                         CollectInputs(options.inputs, options.out_dir));

  uint64_t total_bytes = 0;
  for (const InputFile& f : files) total_bytes += f.size;
  if (total_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the inputs hold no text (", files.size(),
                                                   " file(s), all empty): nothing to prepare"));
  }

  // The whole token stream is held in memory (2 bytes a token; a byte tokenizer makes one token
  // per input byte), since the train/val split point is only known once it is complete.
  std::vector<uint16_t> tokens;
  tokens.reserve(total_bytes + kDocumentSeparator.size() * files.size());
  std::optional<ProgressBar> progress;
  if (options.progress) progress.emplace("tokenizing", total_bytes, /*bytes=*/true);
  std::vector<std::string> sources;
  uint64_t done = 0;
  for (const InputFile& file : files) {
    SHOAL_ASSIGN_OR_RETURN(std::string text,
                           ReadInput(file, done, progress ? &*progress : nullptr));
    done += text.size();
    if (const size_t bad = FirstInvalidUtf8(text); bad != std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", file.path, " is not UTF-8 text: invalid byte 0x",
                       absl::Hex(static_cast<unsigned char>(text[bad]), absl::kZeroPad2),
                       " at byte offset ", bad));
    }
    // Empty files are not documents: they would only add a stray separator.
    if (text.empty()) continue;
    if (!sources.empty()) tokenizer->Encode(kDocumentSeparator, &tokens);
    tokenizer->Encode(text, &tokens);
    sources.push_back(file.path);
  }
  if (progress) progress->Finish();

  // val is the tail of the stream: floor(N * val_fraction) tokens.
  const size_t n = tokens.size();
  const auto n_val = static_cast<size_t>(std::floor(static_cast<double>(n) * options.val_fraction));
  const size_t n_train = n - n_val;
  if (n_val == 0 || n_train == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the inputs give only ", n, " tokens: --val-fraction ", options.val_fraction,
                     " would leave the ", n_val == 0 ? "val" : "train", " split empty"));
  }

  const std::string train_path = JoinPath(options.out_dir, "train.bin");
  const std::string val_path = JoinPath(options.out_dir, "val.bin");
  const std::string meta_path = JoinPath(options.out_dir, "meta.json");
  const absl::string_view train_bytes = AsBytes(tokens.data(), n_train);
  const absl::string_view val_bytes = AsBytes(tokens.data() + n_train, n_val);

  nlohmann::json meta = {
      {"format", "shoal-tokens-v1"},
      {"tokenizer", tokenizer->name()},
      {"vocab_size", tokenizer->vocab_size()},
      {"dtype", "uint16"},
      {"train_tokens", n_train},
      {"val_tokens", n_val},
      {"train_sha256", Sha256Hex(train_bytes.data(), train_bytes.size())},
      {"val_sha256", Sha256Hex(val_bytes.data(), val_bytes.size())},
      {"sources", sources},
  };
  const std::string meta_text = meta.dump(2) + "\n";

  SHOAL_RETURN_IF_ERROR(MakeDirs(options.out_dir));
  SHOAL_RETURN_IF_ERROR(WriteOutputs(
      {{train_path, train_bytes}, {val_path, val_bytes}, {meta_path, meta_text}}, options.out_dir));
  SHOAL_LOG(Info) << "prepare-data: " << sources.size() << " document(s), "
                  << FormatBytes(static_cast<double>(done)) << " -> " << n_train << " train + "
                  << n_val << " val tokens (" << tokenizer->name() << " tokenizer) in "
                  << options.out_dir;
  return absl::OkStatus();
}

}  // namespace shoal::runtime
