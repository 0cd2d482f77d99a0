// A joiner's copy of a stage: the state a donor peer holds at a step boundary (parameters, AdamW's
// moments or the donor's DeMo residual, and the step count), as proto/swarm.proto's GetStageState
// streams it: a manifest listing every tensor's place in one byte stream, then CRC32C-checked
// chunks, resumable from any chunk boundary. SnapshotOf and LoadSnapshot are the two ends;
// FetchStageState is the joiner's call, which checks every chunk, resumes after a broken transfer
// from the last good chunk (refusing a donor whose snapshot changed meanwhile), and gives up after
// `attempts` failures, naming the donor and the last error. LoadSnapshot checks the manifest
// against the stage (every tensor, shapes, contiguous offsets, sizes) before anything changes.
#ifndef SHOAL_RUNTIME_SWARM_SYNC_H_
#define SHOAL_RUNTIME_SWARM_SYNC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/swarm.pb.h"
#include "runtime/swarm_stage.h"

namespace shoal::runtime {

struct StageSnapshot {
  v1::StageStateManifest manifest;  // chunk_bytes left 0: the server sets it
  std::string bytes;                // manifest.total_bytes() bytes
};

// The stage's state now (call it between steps). `first_layer`/`end_layer` go in the manifest.
StageSnapshot SnapshotOf(const SwarmStage& stage, int first_layer, int end_layer);
// Loads a snapshot into `stage`. kDataLoss naming what does not fit; nothing changes then.
absl::Status LoadSnapshot(SwarmStage& stage, const StageSnapshot& snapshot);

struct FetchOptions {
  std::string token;
  std::string tls_ca_file;
  absl::Duration timeout = absl::Minutes(5);  // per attempt
  int attempts = 3;                            // tries, each resuming where the last one stopped
};

// Pulls stage `stage`'s state at `step` (-1: the donor's newest) from the peer at `address`.
absl::StatusOr<StageSnapshot> FetchStageState(const std::string& address, int stage, int64_t step,
                                              const FetchOptions& options);

// ---- The catch-up log on the wire (GetUpdates). ----

// One step of the log as it travels: proto/swarm.proto's header and its payload bytes.
struct EncodedUpdate {
  v1::StepUpdateHeader header;
  std::string bytes;
};
EncodedUpdate EncodeUpdate(const StepUpdate& update);
// Back into a StepUpdate for `stage`: the kind must be the stage's optimizer's, the sizes its
// layout's (kDataLoss naming what differs).
absl::StatusOr<StepUpdate> DecodeUpdate(const SwarmStage& stage, const EncodedUpdate& encoded);

// Pulls steps [from_step, to_step] (to_step 0: every newer one) of stage `stage`'s log from the
// peer at `address`, checking every chunk's CRC32C. kOutOfRange when the peer's log does not
// reach back to from_step (the caller fetches a snapshot instead); an empty list when the peer
// is not past from_step - 1.
absl::StatusOr<std::vector<EncodedUpdate>> FetchUpdates(const std::string& address, int stage,
                                                        int64_t from_step, int64_t to_step,
                                                        const FetchOptions& options);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_SWARM_SYNC_H_
