#include "runtime/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "common/status.h"
#include "runtime/config.h"

namespace shoal::runtime {
namespace {

constexpr char kFormat[] = "shoal-checkpoint-v1";
constexpr char kModelFile[] = "model.safetensors";
constexpr char kOptimizerFile[] = "optimizer.safetensors";
constexpr char kManifestFile[] = "manifest.json";
constexpr char kStepPrefix[] = "step_";
constexpr char kTmpPrefix[] = ".tmp-";
constexpr int64_t kMaxStep = 99'999'999;  // step_%08d stays 8 digits wide

std::string StepDirName(int64_t step) {
  return absl::StrFormat("step_%08d", step);
}

std::string Join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : absl::StrCat(dir, "/", name);
}

std::string BaseName(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// The step of "step_00000010", or -1 for any other name.
int64_t ParseStepDirName(const std::string& name) {
  const size_t prefix = sizeof(kStepPrefix) - 1;
  if (name.size() != prefix + 8 || !absl::StartsWith(name, kStepPrefix)) return -1;
  int64_t step = 0;
  for (size_t i = prefix; i < name.size(); ++i) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(name[i]))) return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

absl::Status ErrnoError(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// A ".tmp-<anything>-<pid>" directory is stale when its writer is gone (or is this process,
// whose earlier Save failed half-way). A live writer's directory is left alone.
bool IsStaleTmp(const std::string& name) {
  const size_t dash = name.find_last_of('-');
  int pid = 0;
  if (dash == std::string::npos || !absl::SimpleAtoi(name.substr(dash + 1), &pid) || pid <= 0) {
    return true;  // not one of ours in a form we recognise: nobody will ever finish it
  }
  if (pid == ::getpid()) return true;
  return ::kill(pid, 0) != 0 && errno == ESRCH;
}

// Moves `from` onto `to`, which may exist (a checkpoint of the same step being replaced).
// renameat2(RENAME_EXCHANGE) swaps the two atomically, so some complete checkpoint of the step
// exists at `to` at every instant; the old one ends up at `from` and is removed. Filesystems
// without RENAME_EXCHANGE get the two-rename fallback (old moved aside, new moved in).
absl::Status RenameReplacing(const std::string& from, const std::string& to,
                             const std::string& aside) {
  if (!PathExists(to)) {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return ErrnoError(absl::StrCat("cannot rename ", from, " to ", to));
    }
    return absl::OkStatus();
  }
#ifdef RENAME_EXCHANGE
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) {
    return RemoveAll(from);
  }
#endif
  if (::rename(to.c_str(), aside.c_str()) != 0) {
    return ErrnoError(absl::StrCat("cannot move ", to, " aside to ", aside));
  }
  if (::rename(from.c_str(), to.c_str()) != 0) {
    absl::Status s = ErrnoError(absl::StrCat("cannot rename ", from, " to ", to));
    ::rename(aside.c_str(), to.c_str());  // put the old one back
    return s;
  }
  return RemoveAll(aside);
}

absl::StatusOr<uint64_t> FileSize(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return ErrnoError(absl::StrCat("cannot stat ", path));
  }
  return static_cast<uint64_t>(st.st_size);
}

absl::Status WriteCheckpointFiles(const std::string& dir, const CheckpointState& state) {
  const std::map<std::string, std::string> metadata = {{"format", kFormat},
                                                       {"step", absl::StrCat(state.step)}};
  SHOAL_RETURN_IF_ERROR(state.model_stream.empty()
                            ? WriteSafetensors(Join(dir, kModelFile), state.model, metadata)
                            : WriteSafetensors(Join(dir, kModelFile), state.model_stream, metadata));
  SHOAL_RETURN_IF_ERROR(
      state.optimizer_stream.empty()
          ? WriteSafetensors(Join(dir, kOptimizerFile), state.optimizer, metadata)
          : WriteSafetensors(Join(dir, kOptimizerFile), state.optimizer_stream, metadata));

  nlohmann::ordered_json manifest;
  manifest["format"] = kFormat;
  manifest["step"] = state.step;
  manifest["config"] = state.config_toml;
  manifest["rng"] = state.rng;
  manifest["data"] = state.data;
  manifest["extra"] = state.extra;
  manifest["files"] = nlohmann::ordered_json::object();
  for (const char* name : {kModelFile, kOptimizerFile}) {
    const std::string path = Join(dir, name);
    // Hash what is on disk, not what we meant to write.
    SHOAL_ASSIGN_OR_RETURN(const std::string sha256, Sha256File(path));
    SHOAL_ASSIGN_OR_RETURN(const uint64_t bytes, FileSize(path));
    manifest["files"][name] = {{"sha256", sha256}, {"bytes", bytes}};
  }
  std::string text;
  try {
    text = manifest.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot encode the manifest of step ", state.step, ": ", e.what()));
  }
  SHOAL_RETURN_IF_ERROR(WriteFileSynced(Join(dir, kManifestFile), text));
  return FsyncDirectory(dir);
}

// Returns the member `key` of the manifest or kDataLoss naming it.
absl::StatusOr<const nlohmann::json*> Member(const nlohmann::json& object, const char* key,
                                             const std::string& manifest_path) {
  auto it = object.find(key);
  if (it == object.end()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": missing \"", key, "\""));
  }
  return &*it;
}

absl::StatusOr<NamedTensors> ReadTensors(const std::string& path) {
  SHOAL_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  NamedTensors tensors;
  tensors.reserve(file.tensors.size());
  for (auto& [name, tensor] : file.tensors) tensors.emplace_back(name, std::move(tensor));
  return tensors;
}

}  // namespace

CheckpointStore::CheckpointStore(std::string root, int keep)
    : root_(std::move(root)), keep_(keep) {}

absl::StatusOr<std::string> CheckpointStore::Save(const CheckpointState& state) {
  if (root_.empty()) return absl::InvalidArgumentError("checkpoint root is empty");
  if (state.step < 0 || state.step > kMaxStep) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint step ", state.step, " is outside [0, ", kMaxStep, "]"));
  }
  SHOAL_RETURN_IF_ERROR(MakeDirs(root_));

  // Leftovers of writers that crashed (or of our own failed Save) are never loaded, but they
  // hold disk space: clear them before adding more.
  SHOAL_ASSIGN_OR_RETURN(const std::vector<std::string> names, ListDirectory(root_));
  for (const std::string& name : names) {
    if (absl::StartsWith(name, kTmpPrefix) && IsStaleTmp(name)) {
      SHOAL_LOG(Info) << "removing stale checkpoint temporary " << Join(root_, name);
      SHOAL_RETURN_IF_ERROR(RemoveAll(Join(root_, name)));
    }
  }

  const std::string step_name = StepDirName(state.step);
  const std::string pid = absl::StrCat(::getpid());
  const std::string tmp = Join(root_, absl::StrCat(kTmpPrefix, step_name, "-", pid));
  const std::string aside = Join(root_, absl::StrCat(kTmpPrefix, "old-", step_name, "-", pid));
  const std::string final_dir = Join(root_, step_name);

  SHOAL_RETURN_IF_ERROR(RemoveAll(tmp));
  SHOAL_RETURN_IF_ERROR(MakeDirs(tmp));
  absl::Status s = WriteCheckpointFiles(tmp, state);
  if (s.ok()) s = RenameReplacing(tmp, final_dir, aside);
  if (s.ok()) s = FsyncDirectory(root_);
  if (!s.ok()) {
    RemoveAll(tmp).IgnoreError();  // best effort; a later Save clears it too
    return absl::Status(s.code(), absl::StrCat("saving checkpoint ", final_dir, ": ", s.message()));
  }
  SHOAL_LOG(Info) << "saved checkpoint " << final_dir;

  // The checkpoint is durable; failing to prune old ones is worth a warning, not an error.
  if (keep_ > 0) {
    absl::StatusOr<std::vector<std::string>> dirs = ListStepDirs();
    if (!dirs.ok()) {
      SHOAL_LOG(Warning) << "cannot prune checkpoints under " << root_ << ": " << dirs.status();
      return final_dir;
    }
    // Oldest first; the one just written is never pruned, even when newer steps exist.
    int64_t excess = static_cast<int64_t>(dirs->size()) - keep_;
    for (const std::string& dir : *dirs) {
      if (excess <= 0) break;
      if (dir == final_dir) continue;
      absl::Status removed = RemoveAll(dir);
      if (!removed.ok()) {
        SHOAL_LOG(Warning) << "cannot prune checkpoint " << dir << ": " << removed;
      } else {
        SHOAL_LOG(Info) << "pruned checkpoint " << dir;
      }
      --excess;
    }
    FsyncDirectory(root_).IgnoreError();
  }
  return final_dir;
}

absl::StatusOr<CheckpointState> CheckpointStore::Load(const std::string& step_dir) {
  if (!IsDirectory(step_dir)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", step_dir, " not found"));
  }
  const std::string manifest_path = Join(step_dir, kManifestFile);
  if (!PathExists(manifest_path)) {
    // The directory exists but is incomplete: its contents are lost, not merely elsewhere.
    return absl::DataLossError(absl::StrCat(manifest_path, ": missing"));
  }
  SHOAL_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(manifest_path));
  const nlohmann::json manifest = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": not valid JSON"));
  }
  if (!manifest.is_object()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": not a JSON object"));
  }

  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* format, Member(manifest, "format", manifest_path));
  if (!format->is_string() || format->get<std::string>() != kFormat) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": format is ", format->dump(),
                                            ", expected \"", kFormat, "\""));
  }
  CheckpointState state;
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* step, Member(manifest, "step", manifest_path));
  if (!step->is_number_integer() || step->get<int64_t>() < 0) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": \"step\" is not a non-negative integer"));
  }
  state.step = step->get<int64_t>();
  const int64_t dir_step = ParseStepDirName(BaseName(step_dir));
  if (dir_step >= 0 && dir_step != state.step) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": step ", state.step,
                                            " does not match the directory name"));
  }
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* config, Member(manifest, "config", manifest_path));
  if (!config->is_string()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": \"config\" is not a string"));
  }
  state.config_toml = config->get<std::string>();
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* rng, Member(manifest, "rng", manifest_path));
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* data, Member(manifest, "data", manifest_path));
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* extra, Member(manifest, "extra", manifest_path));
  state.rng = *rng;
  state.data = *data;
  state.extra = *extra;

  // Every listed file must be there with the recorded size and hash; both tensor files must
  // be listed. The size check is cheap and catches truncation before hashing.
  SHOAL_ASSIGN_OR_RETURN(const nlohmann::json* files, Member(manifest, "files", manifest_path));
  if (!files->is_object()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": \"files\" is not an object"));
  }
  for (const char* required : {kModelFile, kOptimizerFile}) {
    if (!files->contains(required)) {
      return absl::DataLossError(absl::StrCat(manifest_path, ": \"files\" does not list ", required));
    }
  }
  for (const auto& [name, info] : files->items()) {
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
      return absl::DataLossError(absl::StrCat(manifest_path, ": bad file name '", name, "'"));
    }
    const std::string path = Join(step_dir, name);
    if (!info.is_object() || !info.contains("sha256") || !info["sha256"].is_string() ||
        !info.contains("bytes") || !info["bytes"].is_number_unsigned()) {
      return absl::DataLossError(
          absl::StrCat(manifest_path, ": entry for ", name, " needs \"sha256\" and \"bytes\""));
    }
    absl::StatusOr<uint64_t> size = FileSize(path);
    if (!size.ok()) return absl::DataLossError(size.status().message());
    const uint64_t expected_size = info["bytes"].get<uint64_t>();
    if (*size != expected_size) {
      return absl::DataLossError(absl::StrCat(path, ": ", *size, " bytes, manifest says ",
                                              expected_size));
    }
    SHOAL_ASSIGN_OR_RETURN(const std::string sha256, Sha256File(path));
    if (sha256 != info["sha256"].get<std::string>()) {
      return absl::DataLossError(absl::StrCat(path, ": sha256 ", sha256, " does not match ",
                                              info["sha256"].get<std::string>()));
    }
  }

  SHOAL_ASSIGN_OR_RETURN(state.model, ReadTensors(Join(step_dir, kModelFile)));
  SHOAL_ASSIGN_OR_RETURN(state.optimizer, ReadTensors(Join(step_dir, kOptimizerFile)));
  return state;
}

absl::StatusOr<std::optional<CheckpointState>> CheckpointStore::LoadLatest(
    std::vector<std::string>* skipped) const {
  SHOAL_ASSIGN_OR_RETURN(const std::vector<std::string> dirs, ListStepDirs());
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    absl::StatusOr<CheckpointState> state = Load(*it);
    if (state.ok()) return std::optional<CheckpointState>(*std::move(state));
    SHOAL_LOG(Warning) << "skipping checkpoint " << *it << ": " << state.status().message();
    if (skipped != nullptr) skipped->push_back(absl::StrCat(*it, ": ", state.status().message()));
  }
  return std::optional<CheckpointState>();
}

absl::StatusOr<std::vector<std::string>> CheckpointStore::ListStepDirs() const {
  if (!PathExists(root_)) return std::vector<std::string>();  // nothing saved yet
  SHOAL_ASSIGN_OR_RETURN(const std::vector<std::string> names, ListDirectory(root_));
  // Names are fixed-width, so ListDirectory's sorted order is step order.
  std::vector<std::string> dirs;
  for (const std::string& name : names) {
    const std::string path = Join(root_, name);
    if (ParseStepDirName(name) >= 0 && IsDirectory(path)) dirs.push_back(path);
  }
  return dirs;
}

absl::Status CheckResumable(const CheckpointState& state, const Config& config,
                            const std::string& where) {
  SHOAL_ASSIGN_OR_RETURN(Config saved, ParseConfig(state.config_toml, "checkpoint manifest"));
  const ModelConfig& a = saved.model;
  const ModelConfig& b = config.model;
  if (a.n_layer != b.n_layer || a.n_head != b.n_head || a.n_embd != b.n_embd ||
      a.block_size != b.block_size || a.vocab_size != b.vocab_size) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint step ", state.step, " under ",
                                                      where, " is of another model ([model] "
                                                      "differs from ", config.source, ")"));
  }
  if (saved.optim.name != config.optim.name) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint step ", state.step, " under ", where, " was trained with optim.name = \"",
        saved.optim.name, "\", this run has \"", config.optim.name,
        "\": switching optimizers on resume is not supported"));
  }
  if (state.step > config.train.steps) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint is at step ", state.step, " but train.steps is ", config.train.steps));
  }
  return absl::OkStatus();
}

}  // namespace shoal::runtime
