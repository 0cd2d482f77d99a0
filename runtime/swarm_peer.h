// SwarmPeerServer: a swarm peer's gRPC endpoint (proto/swarm.proto's SwarmPeer service) over the
// stage it serves (runtime/swarm_stage.h). Trainers call Forward, Backward and ForwardBackward;
// the stage's PeerGroup frames arrive by Exchange and go to the process's ExchangeMailbox.
//
// GetStageState streams the stage's state between steps (runtime/swarm_sync.h) to a joiner;
// GetUpdates streams the stage's catch-up log (SwarmStage::UpdatesFrom), so a joiner whose
// snapshot the swarm has moved past takes the steps it missed instead of another snapshot.
//
// Every call is checked before any computation: the bearer token, the protocol version, the
// stage it means, the step (the one whose state the stage holds: a call for the next step waits
// up to 5 s for the step boundary, which usually is moments away), the call's numbers, and every
// tensor's declaration and pieces (comm/tensor_stream.h). A stage computes one call at a time (calls queue on a lock); the step
// boundary (the round's reduction and the update) runs under the same lock through WithStage, so
// no call sees half an update.
//
// Exactly once: an accumulating backward leaves its gradient pending in the stage, and the peer
// commits the micro-batch to the ledger (options.commit: the coordinator's ledger, or for a
// peer without one, null: every accumulation counts). Committed, it joins the stage's
// accumulation; refused, it is dropped and the call fails with the ledger's status, except for a
// duplicate (kAlreadyExists: a retried call whose first reply was lost), which is answered as
// the first one was.
#ifndef SHOAL_RUNTIME_SWARM_PEER_H_
#define SHOAL_RUNTIME_SWARM_PEER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "comm/peer_group.h"
#include "proto/swarm.pb.h"
#include "runtime/swarm_stage.h"

namespace shoal::runtime {

struct SwarmPeerOptions {
  std::string listen = "127.0.0.1:0";  // HOST:PORT; port 0 picks a free one
  std::string token;                   // the job's token; empty: no authentication
  std::string tls_cert_file;           // PEM pair: TLS only
  std::string tls_key_file;
  int64_t max_call_bytes = int64_t{1} << 30;  // the most tensor bytes one call may declare
  // GetStageState: the blocks the stage serves (for the manifest) and the chunk size, in
  // [1, 4 MiB].
  int first_layer = 0;
  int end_layer = 0;
  int state_chunk_bytes = 4 << 20;
  // Records an accumulated micro-batch (call.step, call.micro_batch, call.trainer_id) at this
  // peer's stage in the ledger, with its mean loss on the last stage (NaN elsewhere); null: keep
  // every accumulation.
  std::function<absl::Status(const v1::CallInfo& call, double loss)> commit;
  // The factor (>= 1) this peer's compute is slowed by now: after each forward or backward it
  // sleeps (factor - 1) times the compute's time, under the compute lock, counted as compute (a
  // slower device, for tests and benchmarks: `shoal worker --throttle / --slow-after`). Null: 1.
  std::function<double()> slowdown;
};

// What a peer computed since it was last asked.
struct SwarmPeerLoad {
  // Sequences' worth of training work done here: a forward-backward counts 1 a sequence, a
  // forward 1/3.5 and a backward 2.5/3.5 (the router's weights, parallel/swarm_router.h), so a peer that only ran
  // forwards reports its rate too.
  double samples = 0;
  double compute_s = 0;   // seconds computing, forwards included
  double commit_s = 0;    // of those, seconds waiting for the ledger's record of a micro-batch
};

class SwarmPeerServer {
 public:
  // `stage` (not owned) outlives the server; null: none yet (a joiner serves its port before it
  // knows its stage, so the coordinator can dial it): every call but Exchange is refused
  // (FAILED_PRECONDITION) until Attach. kInvalidArgument / kNotFound for bad TLS files,
  // kUnavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<SwarmPeerServer>> Start(
      SwarmStage* stage, std::shared_ptr<comm::ExchangeMailbox> mailbox,
      const SwarmPeerOptions& options);
  ~SwarmPeerServer();  // Shutdown()

  int port() const;
  std::string address() const;  // the listen host with the bound port
  // Stops serving: calls in progress get at most a second. Idempotent.
  void Shutdown();

  // Serves `stage` (not owned; outlives the server) from now on, blocks [first_layer, end_layer)
  // in its snapshots' manifest.
  void Attach(SwarmStage* stage, int first_layer, int end_layer);

  // The work done since the last call (the peer's throughput for the coordinator's roster).
  SwarmPeerLoad TakeLoad();

  // Runs `fn` on the stage while no call computes (kFailedPrecondition without one).
  absl::Status WithStage(const std::function<absl::Status(SwarmStage&)>& fn);

  struct Impl;

 private:
  explicit SwarmPeerServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The round at the step boundary: the stage's accumulation summed over `stage_group` (the
// stage's round roster, in its fixed order), and the tied wte's gradient over `tied_group` (the
// peers of the first and the last stage; null for the other stages, or when one stage holds
// the whole model) from each peer's own accumulation, so the two copies end equal to the
// embedding's plus the head's. Out of place: on failure the accumulation is as it was, and the
// round can run again on new groups.
absl::Status ReduceRound(SwarmStage& stage, comm::Backend* stage_group, comm::Backend* tied_group);

// The same sums without touching the stage: `own` is a copy of the stage's accumulation
// (Gradients(), same order and layout), and the result is new tensors laid out alike. A peer
// keeps its accumulation as it is (its own micro-batches, and any replay added after a failed
// or voided round) and applies the sums only once the step is decided. kInvalidArgument for
// buffers not laid out as the stage's; the groups' errors.
absl::StatusOr<std::vector<at::Tensor>> SumOverRound(const SwarmStage& stage,
                                                      const std::vector<at::Tensor>& own,
                                                      comm::Backend* stage_group,
                                                      comm::Backend* tied_group);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_SWARM_PEER_H_
