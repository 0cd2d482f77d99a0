// Checkpoints: one directory per step under a root, `<root>/step_00000010/`, holding
//   model.safetensors      the weights, names like "blocks.0.attn.qkv.weight"
//   optimizer.safetensors  optimizer state, names like "exp_avg.blocks.0.attn.qkv.weight"
//   manifest.json          {"format": "shoal-checkpoint-v1", "step": 10, "config": "<TOML>",
//                           "rng": {...}, "data": {...}, "extra": {...},
//                           "files": {"model.safetensors": {"sha256": "..", "bytes": N}, ...}}
// A checkpoint is written into "<root>/.tmp-step_00000010-<pid>", every file fsynced, then
// renamed into place and the root fsynced: a crash at any point leaves the previous checkpoints
// intact, and a half-written one is never mistaken for a valid one. Blocking; not thread-safe.
#ifndef SHOAL_RUNTIME_CHECKPOINT_H_
#define SHOAL_RUNTIME_CHECKPOINT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/safetensors.h"

namespace shoal::runtime {

struct CheckpointState {
  int64_t step = 0;                 // optimizer steps completed
  std::string config_toml;          // the run's config, for the record and for checks
  nlohmann::json rng;               // RNG / sampler state needed for a bit-exact resume
  nlohmann::json data;              // data position (next step, dataset identity)
  nlohmann::json extra;             // anything else the trainer wants back (e.g. metrics)
  NamedTensors model;               // weights
  NamedTensors optimizer;           // optimizer state
  // Save only: when not empty, written instead of `model` / `optimizer`, piece by piece, for
  // states that are never all in RAM (paged). Load always fills the tensors.
  std::vector<TensorSource> model_stream;
  std::vector<TensorSource> optimizer_stream;
};

class CheckpointStore {
 public:
  // `root` is created on first Save. `keep` newest checkpoints survive a Save (0: keep all).
  CheckpointStore(std::string root, int keep);

  // Writes the checkpoint for state.step atomically, then prunes the oldest step directories
  // beyond `keep` (never the one just written, even when newer steps exist; a failed prune is
  // logged, not returned). Returns the final directory path. An existing checkpoint of the same
  // step is replaced atomically. Before writing, removes stale "<root>/.tmp-*" directories: those
  // whose writer pid is no longer alive, or is this process. kInvalidArgument for a step outside
  // [0, 99999999]; kInternal for I/O errors (the temporary is removed, nothing else changes).
  absl::StatusOr<std::string> Save(const CheckpointState& state);

  // Loads and verifies one checkpoint directory (manifest format, every file's size and
  // sha256, safetensors structure). kNotFound if `step_dir` does not exist; kDataLoss naming
  // the file at fault for anything missing or corrupt inside it (including a manifest whose
  // step disagrees with a step_XXXXXXXX directory name). Tensors come back sorted by name.
  static absl::StatusOr<CheckpointState> Load(const std::string& step_dir);

  // Newest checkpoint that loads and verifies; invalid ones are skipped, and for each one a
  // line "<dir>: <reason>" is appended to `skipped`. std::nullopt when there is none.
  absl::StatusOr<std::optional<CheckpointState>> LoadLatest(std::vector<std::string>* skipped) const;

  // Paths "<root>/step_XXXXXXXX" (exactly 8 digits, directories only) currently under root,
  // valid or not, oldest first. Empty when root does not exist yet.
  absl::StatusOr<std::vector<std::string>> ListStepDirs() const;

  const std::string& root() const { return root_; }

 private:
  std::string root_;
  int keep_;
};

struct Config;

// Whether a run of `config` can continue `state` (found at `where`): the same [model], the same
// optim.name, a step within train.steps. kFailedPrecondition naming what differs.
absl::Status CheckResumable(const CheckpointState& state, const Config& config,
                            const std::string& where);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_CHECKPOINT_H_
