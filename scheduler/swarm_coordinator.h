// The coordinator of a swarm (`shoal coordinator --swarm`): the membership of peers and trainers
// (joins, heartbeats with leases, leaves, drains, deaths) around SwarmState (swarm_state.h), which
// keeps the stage pools, the rounds, the ledger and the decisions. The gRPC service
// (coordinator_service.h) calls it for every swarm call; it does no I/O itself except through
// `reachable` (a dial check of a peer's address). Thread-safe.
//
// Membership. A peer joins with the address it serves SwarmPeer on (checked: the coordinator must
// be able to dial it, else kFailedPrecondition with the hint `--advertise`) and the host bytes of
// its profile; SwarmState::AddPeer picks its stage and its sync source, which the JoinResponse
// carries with the job (its config as TOML, the stage splits, M, the codec). A trainer joins with
// its train.bin sha256, which must be the job's. A worker whose lease runs out (no heartbeat for
// lease_ms) is dead: a peer is fenced (RemovePeer kDead: its micro-batches become replays), a
// trainer's leases go back to the pool. ReportPeer (a trainer or peer whose call to a peer failed)
// dials the peer at once and fences it when it cannot be reached, so a killed peer is fenced
// within a dial's time of the first failed call, not a lease later. So does WatchEnded, when a
// peer's roster watch ends without a leave (a killed process's connection closes with it): the
// peer is fenced before any call to it has failed, so a peer that joins meanwhile is placed by a
// roster without it.
//
// The roster (v1::SwarmRoster) is SwarmState's snapshot with addresses, the open step's plans, the
// newest decisions (with the step's loss: the mean of the losses its last stage's peers committed,
// one per micro-batch) and the job's end: the job is finished once `total_steps` steps are
// applied (the learning-rate function gives no lr past them, so no step opens). Its version
// changes whenever something a worker acts on changed; WaitRoster blocks until then.
//
// Errors are SwarmState's (see there), and: kInvalidArgument for a malformed request (named
// field), kNotFound for an unknown worker, kFailedPrecondition for a worker that is dead or has
// left (join again), a role this coordinator does not serve, or an address it cannot dial.
#ifndef SHOAL_SCHEDULER_SWARM_COORDINATOR_H_
#define SHOAL_SCHEDULER_SWARM_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/coordinator.pb.h"
#include "scheduler/clock.h"
#include "scheduler/swarm_state.h"
#include "scheduler/validate.h"

namespace shoal::scheduler {

struct SwarmCoordinatorOptions {
  SwarmJob job;                   // stages, M, per-stage bytes, clip
  SwarmStateOptions state;        // learning_rate: the schedule; NaN past the last step
  v1::SwarmJobInfo info;          // what joiners get: config, splits, total_steps, codec, sha256
  int64_t lease_ms = 10000;
  int64_t heartbeat_interval_ms = 2000;
  int history_points = 2000;      // loss points kept for the status
  int roster_decisions = 8;       // decisions each roster carries
  bool log_events = false;        // log joins, leaves, deaths, fences and steps (a server)
  std::string version = "0.1.0";
  ValidationLimits limits;
  // Whether the coordinator can dial `address` (HOST:PORT) now. Null: every address can.
  std::function<bool(const std::string& address)> reachable;
  // The checkpoint the job starts from (its step is job.checkpoint_step), for the roster: peers
  // load their stage from it. Empty with job.checkpoint_step = -1 (from the init).
  std::string checkpoint_path;
  // Seconds between the rebalancer's checks (ALGORITHMS.md §2.8, SwarmState::Rebalance), in
  // [0, 86400]; 0: peers stay at the stage they joined.
  double rebalance_s = 0;
  // How a stage's peers combine their gradients (config swarm.sync): "fp32" (joiners get
  // info.config_toml: sums, AdamW), "demo" (they get demo_config_toml: DeMo payloads, each peer
  // clips its own gradient) or "auto", decided for each job when its first worker joins: "demo"
  // if that worker measured its link to the coordinator (its profile's net_gbps > 0) slower than
  // slow_link_gbps, "fp32" otherwise.
  std::string sync = "fp32";
  std::string demo_config_toml;   // info.config_toml with optim.name = "demo" ("demo", "auto")
  double slow_link_gbps = 0.125;  // "auto"'s threshold, GB/s (> 0)
};

class SwarmCoordinator {
 public:
  // kInvalidArgument for a bad job, info or options (named).
  static absl::StatusOr<std::unique_ptr<SwarmCoordinator>> Create(SwarmCoordinatorOptions options,
                                                                   const Clock* clock);
  ~SwarmCoordinator();
  SwarmCoordinator(const SwarmCoordinator&) = delete;
  SwarmCoordinator& operator=(const SwarmCoordinator&) = delete;

  absl::StatusOr<v1::JoinResponse> Join(const v1::JoinRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status Leave(const v1::LeaveRequest& request);
  // A serving peer stops taking new work and leaves once its stage no longer needs it.
  absl::Status Drain(const std::string& worker_id);

  // The roster at once if its version differs from `known_version`, else when it changes or after
  // `timeout`. kNotFound (unknown worker), kFailedPrecondition (dead or left).
  absl::StatusOr<v1::SwarmRoster> WaitRoster(const std::string& worker_id, uint64_t known_version,
                                             absl::Duration timeout);
  absl::StatusOr<v1::LeaseResponse> Lease(const v1::LeaseRequest& request);
  absl::Status Commit(const v1::CommitRequest& request);
  absl::StatusOr<v1::ReportPeerResponse> ReportPeer(const v1::ReportPeerRequest& request);
  // `worker_id`'s roster watch ended (the client went away; the service calls it). A live peer is
  // dialled and fenced when it cannot be reached; a live one that reconnects keeps its place.
  // Anything else (a trainer, a worker unknown, dead or gone) changes nothing. Whether it fenced.
  bool WatchEnded(const std::string& worker_id);
  absl::StatusOr<v1::PeerSyncedResponse> PeerSynced(const v1::PeerSyncedRequest& request);
  absl::StatusOr<v1::StageReportResponse> StageReport(const v1::StageReportRequest& request);
  // A trainer wrote every stage's state `step` to `path`: the newest checkpoint, which a
  // rollback goes back to and a stage nobody holds is synced from. kInvalidArgument (empty or
  // over-long path), SwarmState::CheckpointSaved's codes.
  absl::Status CheckpointSaved(const v1::CheckpointSavedRequest& request);

  // Marks workers whose lease ran out as dead. Returns how many.
  int ExpireLeases();
  // The rebalancer's check (SwarmState::Rebalance) when rebalance_s has passed since the last
  // one; the move it made, if any. Called with ExpireLeases by the server's sweeper.
  std::optional<SwarmMove> Rebalance();
  v1::ClusterStatus Status() const;
  v1::SwarmRoster Roster() const;
  void CountRejected();
  const SwarmCoordinatorOptions& options() const;

  struct Impl;

 private:
  explicit SwarmCoordinator(std::unique_ptr<Impl> impl);
  // Dials `address` (options.reachable, without the lock) and, when it cannot be reached, fences
  // `peer_id` if it is still live, logging `why`. Whether it could not be reached.
  bool FenceIfUnreachable(const std::string& peer_id, const std::string& address,
                          const std::string& why);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_COORDINATOR_H_
