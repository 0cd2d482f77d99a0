// The swarm step's exactly-once ledger: which peer accumulated which micro-batch at which stage.
//
// A swarm step (ALGORITHMS.md §2, SWARM_LESSONS.md) is M micro-batches with global ids
// step * M + i, i in [0, M), pushed through S stages by trainers that pick any peer of each stage.
// Peers come and go during the step. For the step to equal one process with grad_accum = M, every
// micro-batch must be accumulated exactly once at every stage: never lost with a dead peer, never
// twice because a trainer retried. The coordinator keeps this ledger for the open step:
//
//   OpenStep      fixes the step, M and each stage's round roster (the peers whose accumulations
//                 may count this round); every (stage, id) is needed.
//   Lease         hands a trainer micro-batches to run, each with the stages it must accumulate
//                 at: all of them for a fresh micro-batch; for a *replay*, only those whose
//                 accumulation was lost (the trainer runs the forward through every stage and the
//                 backward down to the lowest needed stage, accumulating only where needed). One
//                 holder per id at a time; replays are handed out before untouched ids.
//   Commit        records, for one leased id, which peer accumulated it at some of its needed
//                 stages (a backward may commit stage by stage, top down). The lease ends once
//                 every stage it named is committed.
//   FencePeer     a dead or evicted peer: everything it held is needed again at its stage, and
//                 its id is refused in commits for the rest of the step.
//   TrainerDied / Release
//                 the trainer's leased ids go back to the pool; what it committed stays.
//   Close         succeeds only when every (stage, id) is held by exactly one live peer of the
//                 stage's round roster, and returns per stage, per peer, the ids it holds.
//
// What the peers must do for exactly-once to hold: accumulate each micro-batch so that it can be
// dropped, and contribute at the step's end exactly the ids Close assigns them (a peer may have
// accumulated an id whose trainer died before committing it; that work is not in the ledger and
// is re-leased to someone else). Contributions are then scaled by what Close returns.
//
// Refused calls leave the ledger as it was. Error codes: kInvalidArgument (a malformed argument,
// a peer outside the stage's round roster), kOutOfRange (an id of another step), kAlreadyExists
// (an accumulation already recorded: a duplicate), kFailedPrecondition (the call does not fit the
// state: no open step, an id not leased to this trainer, a stage the lease does not need, a
// fenced peer, a step that cannot close), kNotFound (an unknown peer to fence).
//
// Pure: no clock, no I/O, no proto. Thread-safe; no call blocks.
#ifndef SHOAL_SCHEDULER_SWARM_LEDGER_H_
#define SHOAL_SCHEDULER_SWARM_LEDGER_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace shoal::scheduler {

// One micro-batch handed to a trainer.
struct SwarmLease {
  int64_t id = 0;           // global id, step * M + i
  std::vector<int> stages;  // where to accumulate it, ascending; every stage unless a replay
  bool replay = false;      // some stage's accumulation already stands: accumulate only at `stages`
};

// What a closed step's peers hold.
struct SwarmStepHoldings {
  int64_t step = 0;
  int micro_batches = 0;  // M
  // stages[s][peer]: the ids `peer` accumulated at stage s, ascending; every live (not fenced)
  // peer of the stage's round roster appears, possibly with none.
  std::vector<std::map<std::string, std::vector<int64_t>>> stages;
};

struct SwarmLedgerCounters {
  int64_t leases = 0;                // micro-batches leased
  int64_t replays = 0;               // of them, replays (fewer stages than all)
  int64_t commits = 0;               // Commit calls accepted
  int64_t accumulations = 0;         // (stage, id) records they made
  int64_t duplicates_refused = 0;    // Commit calls refused with kAlreadyExists
  int64_t commits_refused = 0;       // Commit calls refused for any other reason
  int64_t fences = 0;                // peers fenced
  int64_t accumulations_fenced = 0;  // records dropped by fences (each one needed again)
  int64_t released = 0;              // leases returned by Release or TrainerDied
  // (stage, id) still needed at a stage none of whose round-roster peers is live: work this
  // round can no longer place (the step must be reopened with a new roster). Stays 0 while every
  // stage keeps a live peer.
  int64_t lost = 0;
};

class SwarmLedger {
 public:
  SwarmLedger() = default;
  SwarmLedger(const SwarmLedger&) = delete;
  SwarmLedger& operator=(const SwarmLedger&) = delete;

  // Opens `step` (>= 0) of `micro_batches` (M >= 1) micro-batches over rosters.size() stages
  // (>= 1), rosters[s] being stage s's round roster: non-empty, no empty id, and no peer listed
  // twice or in two stages (fencing names a peer alone). Whatever the ledger held is discarded.
  // The step must be above the last one opened, or equal to it while that one is not closed
  // (reopening an unfinished step with a new roster: every accumulation is needed again, and the
  // peers must drop theirs for it). kInvalidArgument naming the bad value, kFailedPrecondition
  // for a step going backwards or one already closed.
  absl::Status OpenStep(int64_t step, int micro_batches,
                        const std::vector<std::vector<std::string>>& rosters);

  // Up to `max_leases` (>= 1) micro-batches for `trainer` (non-empty), replays first, then by
  // id; empty when none is free (all held, leased or done). kFailedPrecondition when no step is
  // open or a stage has no live peer left (no micro-batch can pass it); kInvalidArgument for bad
  // arguments.
  absl::StatusOr<std::vector<SwarmLease>> Lease(const std::string& trainer, int max_leases);

  // `trainer` reports that micro-batch `id` was accumulated at stage s by peer peers[s], for each
  // entry of `peers` (non-empty). All or nothing. Refused (see the top of the file for the codes)
  // when: no step is open; the id is outside the step (kOutOfRange); a stage is out of range; any
  // named (stage, id) is recorded already (kAlreadyExists: a duplicate, counted as such, checked
  // before the lease so that a commit retried after its lease ended reads as a duplicate); the id
  // is not leased to `trainer`; a stage is not among those its lease still needs; a peer is not in
  // that stage's round roster (kInvalidArgument) or was fenced (kFailedPrecondition).
  absl::Status Commit(const std::string& trainer, int64_t id,
                      const std::map<int, std::string>& peers);

  // `trainer` gives back its lease of `id` (it cannot run it); what it committed stays.
  // kFailedPrecondition when the id is not leased to it or no step is open; kOutOfRange for an
  // id outside the step.
  absl::Status Release(const std::string& trainer, int64_t id);

  // `peer` is dead or evicted: every (stage, id) it held is needed again at its stage (those ids
  // become replays), and commits naming it are refused until the next OpenStep. Returns how many
  // accumulations were dropped; fencing a fenced peer again returns 0. kNotFound when no stage's
  // round roster has the peer; kFailedPrecondition when no step is open.
  absl::StatusOr<int64_t> FencePeer(const std::string& peer);

  // The trainer is gone: its leased ids are released for re-lease. Returns how many; 0 for an
  // unknown trainer or when no step is open.
  int64_t TrainerDied(const std::string& trainer);

  // When every (stage, id) is held by exactly one live peer of the stage's round roster: the
  // holdings, and the step is closed (a second Close returns them again; Lease, Commit, Release
  // and FencePeer are then refused until the next OpenStep). Otherwise kFailedPrecondition listing
  // what is missing, and nothing changes. kInternal if the ledger's own records disagree (a bug).
  absl::StatusOr<SwarmStepHoldings> Close();

  // The peer holding (stage, id), if any (nullopt also for arguments outside the step).
  std::optional<std::string> Holder(int stage, int64_t id) const;
  // (stage, id) pairs not yet held; 0 means Close would succeed.
  int64_t Missing() const;
  std::optional<int64_t> step() const;  // the open or closed step; nullopt before OpenStep
  bool closed() const;
  // Cumulative over the ledger's life (not reset by OpenStep), except `lost`, which is computed
  // for the current step.
  SwarmLedgerCounters counters() const;

 private:
  struct Peer {
    std::string id;
    int stage = 0;
    bool fenced = false;
    std::set<int> held;  // micro-batch indices i (not global ids) it holds at its stage
  };
  struct Slot {
    std::string trainer;         // the lease's holder; empty when not leased
    std::vector<int> remaining;  // stages the lease still needs committed, ascending
    int needed = 0;              // stages with no record
  };
  enum class Phase { kNone, kOpen, kClosed };

  absl::Status CheckOpen(const char* what) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The index i of global id `id`, or kOutOfRange.
  absl::StatusOr<int> IndexOf(int64_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int& HolderAt(int stage, int i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return holder_[static_cast<size_t>(stage) * micro_batches_ + i];
  }
  int HolderAt(int stage, int i) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return holder_[static_cast<size_t>(stage) * micro_batches_ + i];
  }
  // Commit's checks and record, without the refusal counters.
  absl::Status CommitLocked(const std::string& trainer, int64_t id,
                            const std::map<int, std::string>& peers)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndLease(int i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The first stage none of whose round-roster peers is live, or -1.
  int DeadStage() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string MissingSummary() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kNone;
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  int micro_batches_ ABSL_GUARDED_BY(mu_) = 0;
  int stages_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Peer> peers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> peer_index_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<int>> stage_peers_ ABSL_GUARDED_BY(mu_);  // indices into peers_
  std::vector<int> holder_ ABSL_GUARDED_BY(mu_);  // [stage * M + i] -> peer index, -1 if none
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);  // [i]
  std::map<std::string, std::set<int>> leases_ ABSL_GUARDED_BY(mu_);  // trainer -> indices
  int64_t missing_ ABSL_GUARDED_BY(mu_) = 0;
  SwarmLedgerCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_LEDGER_H_
