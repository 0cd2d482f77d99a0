// File helpers with the crash-safety shoal relies on: a file or directory written through these
// calls either appears whole under its final name or not at all. Blocking; thread-compatible.
#ifndef SHOAL_COMMON_FILE_UTIL_H_
#define SHOAL_COMMON_FILE_UTIL_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace shoal {

// Whole file as bytes. kNotFound if it does not exist, kDataLoss on a read error.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `contents` to `path` and fsyncs it (no rename). kInternal names the path on failure.
absl::Status WriteFileSynced(const std::string& path, absl::string_view contents);
// The same with the contents given as consecutive parts, written one after the other (a large
// file never has to be assembled in memory first).
absl::Status WriteFileSynced(const std::string& path, const std::vector<absl::string_view>& parts);
// The same for contents produced piece by piece: `produce` calls the writer it is given for
// each piece, in order (the file is created first, fsynced after). A piece's write error or
// `produce`'s own error is returned; the partial file is then left for the caller to remove.
absl::Status WriteFileSyncedStreaming(
    const std::string& path,
    const std::function<absl::Status(const std::function<absl::Status(absl::string_view)>&)>&
        produce);

// Writes `path` atomically: a temporary sibling, fsync, rename, fsync of the directory.
// A crash at any point leaves either the old file or the new one.
absl::Status WriteFileAtomic(const std::string& path, absl::string_view contents);

// fsyncs a directory so that renames and creations inside it are durable.
absl::Status FsyncDirectory(const std::string& dir);

// Creates `dir` and its parents (like mkdir -p).
absl::Status MakeDirs(const std::string& dir);

// Removes a file or a directory tree; missing is not an error.
absl::Status RemoveAll(const std::string& path);

bool PathExists(const std::string& path);
bool IsDirectory(const std::string& path);

// Names (not paths) of the entries of `dir`, sorted. kNotFound if `dir` is missing.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir);

// Parent directory of `path` ("." for a bare name).
std::string DirName(const std::string& path);

// The running binary's path (/proc/self/exe), or "shoal" if it cannot be read: for re-running
// this binary as a child (benchmarks, the launcher).
std::string SelfExecutablePath();

}  // namespace shoal

#endif  // SHOAL_COMMON_FILE_UTIL_H_
