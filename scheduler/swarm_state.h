// The coordinator's swarm mode as a state machine: stage pools and the roster, joins and the
// donors they sync from, leaves and deaths, the step's rounds, each stage's reduction and the
// decision that ends the step. The coordinator's membership code and gRPC service drive it, and so
// does `shoal simulate --swarm`; it does no I/O and reads no clock (nothing in it depends on time:
// a caller that times peers out calls RemovePeer). Thread-safe; no call blocks.
//
// Steps and states. A swarm step (ALGORITHMS.md §2, SWARM_LESSONS.md) is M micro-batches pushed
// through S stages. "State K" of a stage is its parameters and optimizer state after steps
// 0..K-1 were applied: what runs step K, and what step K's reports hash. next_step() is the newest
// state: the step that is open, or the next one to open. Every step is applied once by every
// peer of every stage with one global clip scale.
//
// Peers. Each peer serves one stage and is SYNCING (downloading the stage's state), SERVING, or
// DRAINING (taking no new work, still in its rounds, about to leave). The roster lists every
// stage's peers in order of joining (the "seniority" that breaks ties below); roster_version()
// increases on every change a trainer or peer must act on (membership, a state, a donor, a
// round, a reduction plan, a decision, a rollback), not on load reports, leases or commits.
//
// Joins. AddPeer picks the stage with ChooseStage (swarm_policy.h): the weakest one that fits the
// joiner's memory, empty stages first. Draining peers do not count as serving, so a stage whose
// last serving peer drains looks empty and the next joiner goes there first (its successor). The
// joiner syncs state next_step() from a donor: a SERVING peer of its stage (a DRAINING one only
// where the stage has none serving) with fewer than max_joiners_per_donor joiners syncing from it,
// the least loaded, ties to the one chosen longest ago. Every donor is at the newest state: joiners
// become serving when a round opens (serving peers are then exactly the round's), or, at the newest
// state, while the next round waits only for a trainer. When all donors are full the joiner waits
// (kWaitForDonor) and gets one as soon as one frees up; the roster says which. A stage with nobody
// holding its state syncs from the newest checkpoint (kCheckpoint) when that is next_step(), or
// from the model's init at step 0 (kInit).
//
// Syncing. PeerSynced(id, step, hash) claims state `step` == next_step() with parameter hash
// `hash`. It is checked against the stage's hash of that state where the stage has already agreed
// on one (its reduction this round); otherwise it is accepted and checked when the stage's peers
// agree on it later in the round, and a mismatch then sends the joiner back to syncing (a refused
// sync, counted). A synced joiner becomes SERVING when the next round opens (or while it waits for
// a trainer, see Rounds), never in the round in progress. A joiner that synced state K during round
// K enters round K+1 one step behind: before serving it applies step K's update (Decision(K), and
// its stage's reduced step-K gradient from its donor); its first report in round K+1 checks that it
// did.
//
// Rounds. A step opens by itself as soon as the previous one is applied (or at the start, or after
// a rollback), every stage has a SERVING peer (counting the synced joiners it admits), a trainer is
// alive, and the learning-rate schedule gives a finite lr >= 0 for it. Waiting for a trainer keeps
// a round from fixing its peers before anyone can feed it: a job's peers started together all serve
// its first step when the trainer comes after them. While a step waits only for a trainer, joiners
// synced at the newest state are SERVING already (not in a round). A round's roster per stage is
// the stage's SERVING and DRAINING peers at that moment; the ledger (swarm_ledger.h) then tracks
// every (stage, micro-batch). Trainers Lease micro-batches and route them to SERVING round peers
// (to a DRAINING one only where its stage's round has no SERVING peer: the round must finish); the
// peer that accumulated a micro-batch reports it with Commit, naming the trainer.
//
// Reductions. When every micro-batch is held at a stage, the stage gets a reduction plan: a plan
// number, its live round peers in roster order, and the ids each holds. Every plan peer sums its
// accumulation with the others' (out of place: each keeps its own) and sends StageReport with the
// plan, its ids, the sum of squares of the reduced gradient and the hash of its pre-step
// parameters (state K). Once all plan peers have reported, the stage agrees if every report has the
// same (hash, sum of squares). Otherwise the largest group of equal reports wins (a tie goes to
// the group holding the most senior peer) and each other peer has drifted: it is fenced in the
// ledger (its micro-batches become replays at its stage) and syncs again, or is evicted on its
// max_drifts-th drift (a draining peer is removed at once); the stage then collects and reduces
// again with a new plan. A fence in a stage that has not agreed yet (death, drift, eviction) also
// voids its plan. After a stage has agreed, a peer of it that dies is not fenced: its micro-batches
// are in the reduced gradient the stage's other peers hold.
//
// Decision. When every stage has agreed, the ledger closes (every (stage, id) exactly once) and
// the step's decision is Apply{step, clip_scale, lr}: clip_scale = min(1, grad_clip / (norm +
// 1e-6)) with norm = sqrt(sum over stages, in stage order, of the agreed sums of squares), 1 when
// grad_clip <= 0. This is parallel::ClipScale's formula (parallel/adamw.cc), written out again
// here because scheduler/ does not link parallel/. lr is the schedule's value for the step,
// computed when the step opens (the schedule lives in runtime/; the caller passes it in). The
// StageReport that completes the step returns the decision; Decision(step) returns it later, or
// says what is still missing. The next step then opens if it can.
//
// Leaves and deaths. RemovePeer fences a peer of the open round (see Reductions). A stage left with
// no peer holding its newest state (SERVING or DRAINING) needs a rollback when a round is open or
// the state is not the newest checkpoint's or init's: needs_rollback names the stage and the
// checkpoint. Leases, commits, reports and syncs are refused until the caller, having told the
// peers, calls RollBack. It drops the open round. When the checkpoint (or init, at step 0) is
// older than the newest state, every peer syncs from it and draining peers are let go; when it is
// the newest state (the lost round was its first), the peers keep what they hold and only the
// round restarts, once the lost stage has a peer again.
//
// Moves (the rebalancer, ALGORITHMS.md §2.8). MovePeer sends a SERVING peer to another stage: it
// drains first (DRAINING with moving_to: no new work, still in its round), and once leaving its
// stage loses nothing (the can_leave rule: another peer serves the stage, nobody syncs from it,
// its round is agreed or it holds nothing) it is a joiner of the new stage under the same id:
// SYNCING from a donor there, newest in seniority, serving from the next round as any joiner.
// Rebalance runs the policy's check (SwarmRebalancer) over the serving peers and makes its move.
// The caller decides when periods pass (the coordinator every --rebalance-s, the simulator on its
// virtual clock); nothing here reads a clock.
//
// Errors. Every input is checked before anything changes, and a refused call changes nothing.
//   kInvalidArgument    a malformed argument: an empty id or address, a negative number, a
//                       non-finite value, a report whose ids are not its plan's; a bad job
//   kNotFound           an unknown peer or trainer
//   kAlreadyExists      a peer or trainer id already in use, a second and different report for
//                       a plan, a micro-batch already accumulated at that stage (the ledger's)
//   kFailedPrecondition the call does not fit the state: no step open, a rollback pending, a
//                       peer not in the round or in the wrong state, a stale plan, a donor that
//                       is not the joiner's, a lease the trainer does not hold
//   kOutOfRange         a step that is not the one in question (a report for another step, a
//                       sync of a state that is not the newest, a checkpoint newer than the
//                       newest state, a decision never made or no longer kept), an id outside the
//                       open step
//   kDataLoss           a synced state whose hash differs from its stage's (both named)
//   kResourceExhausted  a joiner whose memory fits no stage
//   kUnavailable        Decision of the step in progress: not decided yet (what is missing)
//   kInternal           the state's own records disagree (a bug)
#ifndef SHOAL_SCHEDULER_SWARM_STATE_H_
#define SHOAL_SCHEDULER_SWARM_STATE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "scheduler/swarm_ledger.h"
#include "scheduler/swarm_policy.h"

namespace shoal::scheduler {

// The job, fixed for the swarm's life.
struct SwarmJob {
  int stages = 0;                    // S >= 1
  int micro_batches = 0;             // M >= 1 per step
  std::vector<int64_t> stage_bytes;  // S entries >= 0: what a peer needs to serve each stage
                                     // (SwarmStageBytes)
  double grad_clip = 1.0;            // the global gradient-norm clip; <= 0: off
  int64_t checkpoint_step = -1;      // the newest checkpoint's state at the start (>= 0: the swarm
                                     // starts there); -1: none, the swarm starts from init, step 0
  // DeMo: every peer reports the sum of squares of its own gradient (they differ within a stage,
  // and each peer clipped its own), so only the parameter hashes must agree, and the decision's
  // clip scale is 1.
  bool own_norms = false;
};

struct SwarmStateOptions {
  int max_joiners_per_donor = 2;   // joiners syncing from one donor at a time, >= 1
  int max_drifts = 2;              // the drift that evicts a peer, >= 1
  double default_throughput = 1;   // samples/s assumed for a serving peer before its first report
  int kept_decisions = 1024;       // decisions Decision() can still return, >= 1
  // Rebalance's rules (swarm_policy.h); period_s is the caller's period between checks.
  SwarmRebalanceOptions rebalance;
  // The learning rate of a step, called (under the state's lock: it must not call back) when the
  // step opens. Required.
  std::function<double(int64_t step)> learning_rate;
};

enum class SwarmPeerState { kSyncing, kServing, kDraining };
enum class SwarmSyncSource {
  kDonor,         // a peer of the stage at the newest state
  kWaitForDonor,  // every donor has max_joiners_per_donor joiners: one is assigned when it frees
  kCheckpoint,    // the newest checkpoint
  kInit,          // the model's init at step 0
};
enum class SwarmLeaveReason { kLeft, kDead, kEvicted };
// A stage in the open round: micro-batches still missing; held, with a plan to reduce; agreed.
enum class SwarmStagePhase { kCollecting, kReducing, kAgreed };

const char* SwarmPeerStateName(SwarmPeerState s);
const char* SwarmSyncSourceName(SwarmSyncSource s);
const char* SwarmStagePhaseName(SwarmStagePhase p);

// Where a joiner serves and where it syncs from.
struct SwarmJoin {
  int stage = 0;
  SwarmSyncSource source = SwarmSyncSource::kDonor;
  std::string donor;          // kDonor: the donor's id and address
  std::string donor_address;
  int64_t step = 0;           // the state to sync: next_step() now (kCheckpoint, kInit: theirs)
};

// What removing a peer did.
struct SwarmRemoval {
  int64_t dropped = 0;        // its accumulations fenced: (stage, id) needed again as replays
  bool needs_rollback = false;  // the swarm needs a rollback now (see Snapshot().rollback)
};

// How a stage of the open round is to be reduced.
struct SwarmReduction {
  int64_t step = 0;
  uint64_t plan = 0;               // unique over the state's life; StageReport names it
  std::vector<std::string> peers;  // the reduction's order: live round peers, by seniority
  std::map<std::string, std::vector<int64_t>> ids;  // peer -> ids it contributes, ascending
};

// One round peer's report after its stage's reduction.
struct SwarmStageReport {
  std::string peer;
  int64_t step = 0;
  uint64_t plan = 0;
  std::vector<int64_t> ids;  // the ids it contributed (any order): must be its plan's
  double sum_squares = 0;    // of the stage's reduced gradient, each model element counted once
  uint64_t param_hash = 0;   // of its pre-step parameters (state `step`)
};

// The end of a step: every peer applies it.
struct SwarmApply {
  int64_t step = 0;
  double clip_scale = 1;
  double lr = 0;
  double grad_norm = 0;                  // sqrt of the sum over stages of stage_sum_squares
  std::vector<double> stage_sum_squares;  // per stage, as agreed
  std::vector<uint64_t> stage_hashes;     // per stage, the agreed hash of state `step`
};

// A peer found to disagree with its stage, or whose sync was found wrong.
struct SwarmDrift {
  std::string peer;
  int stage = 0;
  int drifts = 0;        // its drifts so far, this one counted
  bool evicted = false;  // removed (max_drifts reached, or it was draining); else syncing again
  std::string message;   // names the peer, the step, both hashes and sums
};

struct SwarmReportOutcome {
  SwarmStagePhase stage_phase = SwarmStagePhase::kReducing;  // the reporter's stage, after it
  std::vector<SwarmDrift> drifted;     // peers this report's completion found drifting
  std::vector<std::string> syncs_refused;  // joiners whose claimed state was found wrong
  std::optional<SwarmApply> apply;     // when this report completed the step
};

struct SwarmPeerInfo {
  std::string id;
  std::string address;
  int stage = 0;
  SwarmPeerState state = SwarmPeerState::kSyncing;
  double throughput = 0;          // reported, samples/s (default_throughput until reported)
  bool throughput_reported = false;
  int64_t queue_length = 0;       // reported
  int64_t accumulated = 0;        // micro-batches it holds in the open step
  bool in_round = false;          // a live, unfenced peer of the open round
  int drifts = 0;
  int joiners = 0;                // joiners syncing from it now
  // SYNCING only:
  SwarmSyncSource source = SwarmSyncSource::kDonor;
  std::string donor;              // kDonor
  bool synced = false;            // PeerSynced accepted: serving from the next round
  int64_t synced_step = -1;
  bool verified = false;          // its claim was checked against the stage's agreed hash
  // DRAINING only: leaving now loses nothing (another peer serves its stage, nobody syncs from
  // it, and it holds no micro-batch its stage still needs from it).
  bool can_leave = false;
  int moving_to = -1;             // DRAINING for a move (MovePeer): the stage it goes to
};

struct SwarmStageInfo {
  int index = 0;
  int64_t bytes = 0;
  double capacity = 0;  // sum of its SERVING peers' throughputs
  std::vector<SwarmPeerInfo> peers;  // by seniority
  // The open round only:
  SwarmStagePhase phase = SwarmStagePhase::kCollecting;
  int64_t missing = 0;  // micro-batches not held at this stage
  std::optional<SwarmReduction> reduction;  // kReducing, kAgreed
  std::vector<std::string> reported;        // plan peers that reported
};

struct SwarmTrainerInfo {
  std::string id;
  bool alive = true;
};

struct SwarmRollback {
  int stage = 0;            // the (first) stage left with no peer holding its newest state
  int64_t from_step = 0;    // next_step() when it was lost
  int64_t to_step = 0;      // the newest checkpoint's step, or 0 (init)
  SwarmSyncSource source = SwarmSyncSource::kCheckpoint;  // kCheckpoint or kInit
  std::string reason;
};

struct SwarmCounters {
  int64_t joins = 0;
  int64_t leaves = 0;
  int64_t deaths = 0;
  int64_t evictions = 0;      // RemovePeer(kEvicted) and drift evictions
  int64_t drifts = 0;
  int64_t fences = 0;         // peers fenced in the ledger (deaths, drifts, evictions in a round)
  int64_t replays = 0;        // micro-batches leased as replays (the ledger's count)
  int64_t syncs_refused = 0;  // accepted syncs found wrong later
  int64_t moves = 0;          // stage moves completed (MovePeer: the peer left its old stage)
  int64_t rollbacks = 0;
  int64_t steps_applied = 0;
};

struct SwarmSnapshot {
  uint64_t roster_version = 0;
  std::optional<int64_t> open_step;
  double open_lr = 0;               // the open step's learning rate
  int64_t next_step = 0;
  int64_t checkpoint_step = -1;     // the newest checkpoint, -1 if none
  std::string waiting;              // no step open and no rollback pending: why
  std::optional<SwarmRollback> rollback;
  std::vector<SwarmStageInfo> stages;
  std::vector<SwarmTrainerInfo> trainers;  // by id: the live ones and the last 64 removed
  SwarmCounters counters;
  SwarmLedgerCounters ledger;       // summed over every round's ledger
};

class SwarmState {
 public:
  // kInvalidArgument naming the bad field of the job or options.
  static absl::StatusOr<std::unique_ptr<SwarmState>> Create(const SwarmJob& job,
                                                            SwarmStateOptions options);
  ~SwarmState();
  SwarmState(const SwarmState&) = delete;
  SwarmState& operator=(const SwarmState&) = delete;

  // --- Membership ---------------------------------------------------------------------------

  // A new peer: SYNCING at the stage ChooseStage picks, with its source. `link_bytes_per_s` is
  // its measured link (0: unknown), which the rebalancer's payback rule divides a stage's bytes
  // by. kInvalidArgument (empty id or address, negative bytes or link), kAlreadyExists (a peer
  // has this id), kResourceExhausted (no stage fits).
  absl::StatusOr<SwarmJoin> AddPeer(const std::string& id, const std::string& address,
                                    int64_t free_bytes, double link_bytes_per_s = 0);
  // The joiner could not sync from `donor`: another donor (the one it failed with least, then
  // the least loaded), or a wait. kNotFound, kFailedPrecondition (not syncing, or `donor` is not
  // its donor: the message names its donor).
  absl::StatusOr<SwarmJoin> DonorFailed(const std::string& joiner, const std::string& donor);
  // The joiner holds state `step` with parameter hash `hash` (see the top of the file). A repeat
  // of an accepted claim is OK. kNotFound, kFailedPrecondition (not syncing, already synced to
  // another claim, rollback pending), kOutOfRange (step is not next_step(): both named),
  // kDataLoss (hash differs from the stage's: both named).
  absl::Status PeerSynced(const std::string& id, int64_t step, uint64_t hash);
  // The peer is gone: left, dead or evicted. kNotFound, kInvalidArgument (reason).
  absl::StatusOr<SwarmRemoval> RemovePeer(const std::string& id, SwarmLeaveReason reason);
  // SERVING -> DRAINING (again: OK, nothing changes). kNotFound, kFailedPrecondition (syncing:
  // it holds nothing, remove it).
  absl::Status Drain(const std::string& id);
  // Moves a SERVING peer to stage `to` (see Moves at the top of the file). kNotFound,
  // kInvalidArgument (`to` is not a stage, or is the peer's own), kFailedPrecondition (not
  // serving, a rollback pending, or it is its stage's only serving peer), kResourceExhausted
  // (stage `to` does not fit the memory it joined with).
  absl::Status MovePeer(const std::string& id, int to);
  // One check of the rebalancer (swarm_policy.h, SwarmRebalancer) at `period` (increasing) over
  // the SERVING peers and their reported throughputs, and the move it makes, started as
  // MovePeer starts one (the policy has checked what MovePeer checks). No check while a peer syncs or drains (the pools are changing; the rebalancer's
  // memory starts again) or while no step can run. kInvalidArgument (options, a period that does
  // not increase).
  absl::StatusOr<std::optional<SwarmMove>> Rebalance(int64_t period);
  // The peer's measured throughput (samples/s, finite >= 0) and queue length (>= 0). Not a roster
  // change. kNotFound, kInvalidArgument.
  absl::Status ReportLoad(const std::string& id, double throughput, int64_t queue_length);

  // A trainer (again after RemoveTrainer: alive again). kInvalidArgument (empty), kAlreadyExists
  // (alive already).
  absl::Status AddTrainer(const std::string& id);
  // The trainer is gone: its leases go back to the pool (what it committed stays). Returns how
  // many. kNotFound (unknown or already removed).
  absl::StatusOr<int64_t> RemoveTrainer(const std::string& id);

  // --- The step -----------------------------------------------------------------------------

  // Up to `max_leases` micro-batches of the open step for the trainer (SwarmLedger::Lease).
  // kNotFound (unknown trainer), kFailedPrecondition (dead trainer, no step open, rollback
  // pending), kInvalidArgument.
  absl::StatusOr<std::vector<SwarmLease>> Lease(const std::string& trainer, int max_leases);
  // The trainer cannot run `id`: back to the pool (SwarmLedger::Release).
  absl::Status Release(const std::string& trainer, int64_t id);
  // Peer-originated: `peer` accumulated micro-batch `id` at its stage for `trainer`; the peer
  // keeps the accumulation only if this returns OK. kNotFound (peer, trainer), kFailedPrecondition
  // (no step open, rollback pending, peer not in the round or fenced, lease not the trainer's
  // or not needing this stage), kAlreadyExists (held already), kOutOfRange (id not in the step).
  absl::Status Commit(const std::string& peer, const std::string& trainer, int64_t id);
  // A plan peer's report (see Reductions). An identical repeat returns the stage's phase and
  // nothing else. kNotFound (peer), kOutOfRange (step is not the open one), kFailedPrecondition
  // (no step open, rollback pending, peer not in the plan, stale plan: the current one named),
  // kInvalidArgument (ids not its plan's, sum of squares not finite and >= 0), kAlreadyExists (a
  // different report for the plan), kInternal (the ledger refuses to close: a bug).
  absl::StatusOr<SwarmReportOutcome> StageReport(const SwarmStageReport& report);
  // The decision of `step`. kUnavailable (the step in progress or waiting to open, and what is
  // missing), kOutOfRange (never decided, rolled back, or no longer kept).
  absl::StatusOr<SwarmApply> Decision(int64_t step) const;

  // --- Checkpoints and rollback -------------------------------------------------------------

  // Every stage's state `step` is saved: the newest checkpoint. kOutOfRange (step above
  // next_step()), kFailedPrecondition (older than the newest checkpoint; the same is OK).
  absl::Status CheckpointSaved(int64_t step);
  // Carries out the pending rollback (see Leaves and deaths) and returns the step the swarm
  // restarts from. kFailedPrecondition when none is pending.
  absl::StatusOr<int64_t> RollBack();

  // --- Status -------------------------------------------------------------------------------

  SwarmSnapshot Snapshot() const;
  uint64_t roster_version() const;
  int64_t next_step() const;
  int64_t rollbacks() const;  // counters.rollbacks: the epoch a lease is valid in

 private:
  struct Impl;  // defined in swarm_state.cc
  explicit SwarmState(std::unique_ptr<Impl> impl);
  mutable absl::Mutex mu_;
  std::unique_ptr<Impl> impl_ ABSL_GUARDED_BY(mu_);
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_STATE_H_
