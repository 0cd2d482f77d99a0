// `shoal worker --join HOST:PORT`: a swarm's peer (serves one pipeline stage) or, with --trainer, a
// trainer (reads the data and drives micro-batches through the stages). docs/swarm.md has the
// design; this is the process around the pieces:
//
//   SwarmLink      the worker's tie to the coordinator: Join (the job and, for a peer, its stage
//                  and sync source come back), heartbeats on a thread (the coordinator declaring
//                  the worker dead ends it), the roster watched on another (Await blocks until a
//                  roster satisfies a condition), Leave.
//   RunSwarmPeer   serves SwarmPeer (runtime/swarm_peer.h) on --listen before joining (the
//                  coordinator dials it), builds its stage, syncs it (init at step 0, or a donor's
//                  snapshot), then per step: waits for its stage's reduction plan, sums the
//                  accumulation over the plan's peers (and the tied wte over the first and the last
//                  stage's) with a PeerGroup, reports, and applies the decision. A plan that
//                  changes (a peer fenced) restores the accumulation and reduces again.
//   RunSwarmTrainer  leases micro-batches of the open step, routes each forward through the
//                  stages and back (StageRouter per stage, StageClient calls), reports a peer whose
//                  call failed (the coordinator fences it) and gives the lease back, logs every
//                  applied step (loss, lr, tokens/s, ETA), and at the end pulls every stage's state
//                  into a checkpoint in the usual format.
//
// Exit codes: 0 done (the job finished, or drained and left), 2 refused (a bad flag or file, a
// coordinator that refuses the worker: the message names why), 1 anything else.
#ifndef SHOAL_LAUNCH_SWARM_WORKER_H_
#define SHOAL_LAUNCH_SWARM_WORKER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/coordinator_client.h"
#include "proto/coordinator.pb.h"

namespace shoal::launch {

struct SwarmWorkerOptions {
  std::string coordinator;      // HOST:PORT
  std::string token;            // the job's token (read from --token-file); empty: none
  std::string tls_ca_file;      // TLS to the coordinator and the peers
  std::string tls_cert_file;    // a peer's own certificate and key (TLS only)
  std::string tls_key_file;
  std::string name;             // optional stable id
  bool trainer = false;
  // Peer: where SwarmPeer listens, and the address others dial (empty: the listen host and the
  // bound port).
  std::string listen = "127.0.0.1:0";
  std::string advertise;
  double grace_s = 25;          // SIGTERM: how long to stay for the stage's round
  int catchup_steps = 4;        // steps kept in the stage's catch-up log
  // Forwards whose activations a peer keeps for their backward (runtime::SwarmStageOptions):
  // at least the micro-batches its stage's trainers have in flight, or backwards recompute.
  int cache_slots = 32;
  // A peer slowed on purpose (tests and benchmarks: several peers sharing one machine's cores
  // as several devices): its compute takes `throttle` times as long, and from `slow_after_s`
  // seconds after it starts (>= 0; -1: never) `slow_factor` times that again.
  double throttle = 1;
  double slow_after_s = -1;
  double slow_factor = 1;
  // Trainer:
  std::string data_dir;         // empty: the job's data.dir
  std::string out_dir;          // empty: the job's train.out_dir (metrics.jsonl, checkpoints)
  int in_flight = 8;            // micro-batches leased and run at a time
  absl::Duration join_timeout = absl::Seconds(60);
  absl::Duration call_timeout = absl::Seconds(30);
};

// The worker's tie to the coordinator (see the top of the file). Thread-safe.
class SwarmLink {
 public:
  // Joins (retrying an unreachable coordinator until options.join_timeout). The coordinator's
  // refusal comes back as its status.
  static absl::StatusOr<std::unique_ptr<SwarmLink>> Join(const SwarmWorkerOptions& options,
                                                         const v1::JoinRequest& request);
  ~SwarmLink();  // Close("exiting")

  const std::string& id() const { return joined_.worker_id(); }
  const v1::SwarmJobInfo& job() const { return joined_.swarm(); }
  comm::CoordinatorClient& client() { return *client_; }

  // The first roster for which `done` holds, waiting at most `timeout`, or until the link is
  // lost (the coordinator declared this worker dead or gone: kFailedPrecondition) or `stop` is
  // set (kCancelled). kDeadlineExceeded after `timeout`.
  absl::StatusOr<v1::SwarmRoster> Await(const std::function<bool(const v1::SwarmRoster&)>& done,
                                        absl::Duration timeout, const std::atomic<bool>* stop);
  // Has every Await look at its `stop` now (set it first) rather than within 100 ms.
  void Wake();
  v1::SwarmRoster latest() const;
  // Stats for the next heartbeat.
  void SetStats(const v1::StepStats& stats);
  bool drain_requested() const;
  // Stops the threads and leaves (best effort). Idempotent.
  void Close(const std::string& reason);

  struct Impl;

 private:
  SwarmLink() = default;
  v1::JoinResponse joined_;
  std::unique_ptr<comm::CoordinatorClient> client_;
  std::unique_ptr<Impl> impl_;
};

// The two roles; `stop` is set by SIGTERM / SIGINT (a peer drains, a trainer finishes its leases
// and leaves). Return the process's exit code.
int RunSwarmPeer(const SwarmWorkerOptions& options, std::atomic<bool>* stop);
int RunSwarmTrainer(const SwarmWorkerOptions& options, std::atomic<bool>* stop);

// The peak GFLOP/s of the hardware computing `roster`'s stages, MFU's denominator: each host
// (SwarmPeerEntry.host) counted once, at the highest peak its SERVING or DRAINING peers reported
// when they joined (DeviceProfile.peak_gflops, the figure mesh mode's MFU divides by; peers on
// one host share its cores, as mesh ranks on one node do: run_report.h). A peer with no host
// counts as a host of its own; one with no rate (not finite, or <= 0) counts nothing. 0 when no
// peer counts.
double SwarmPeakGflops(const v1::SwarmRoster& roster);

// 2 for what the user can fix (a flag, a file, a refusal that names the value), 1 otherwise; the
// message goes to stderr as "shoal worker: error: ...".
int WorkerFail(const absl::Status& status);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_SWARM_WORKER_H_
