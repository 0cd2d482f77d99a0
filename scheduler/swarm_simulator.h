// The swarm simulator behind `shoal simulate --swarm`: the coordinator's swarm policy, a real
// SwarmState (swarm_state.h), driven by virtual peers and trainers on a virtual clock.
//
// Every device of the devices file (simulator.h) is a peer. At time 0 they join in file order
// (AddPeer with their memory: the state picks the stage), report their throughput (ReportLoad)
// and sync their stage from the source the state names; preemptible devices then fail at the
// churn rate and are replaced settings.replace_after_s later, as in the mesh simulator. The
// model of time, all of it from the devices file and the job's shape (common/gpt_arithmetic.h):
//
//   compute     a hop of one micro-batch (mbs = max(1, global_batch / M) sequences of
//               block_size tokens) on stage s costs its FLOPs over the peer's fp32_gflops: the
//               forward a third of the stage's training FLOPs (its blocks, plus the head on the
//               last stage), the backward two thirds; the last stage runs both as one hop; a
//               backward on another peer than the forward runs the forward again first. A peer
//               runs one hop at a time, first come first served. Activations cost no time on the
//               wire (not modelled).
//   routing     a trainer sends each hop to the live SERVING round peer of the stage that would
//               finish it first (its queue plus the hop), ties to the most senior.
//   trainers    each runs in_flight micro-batches at once (as `shoal worker --trainer
//               --in-flight`), every one in its own lane: Lease(1), forward through every stage,
//               the backward down to the lowest stage the lease needs; the peer of each needed
//               stage Commits when its backward ends. An idle lane leases again whenever the
//               roster changes (a step opens, a fence turns accumulations into replays).
//   sync        a joiner downloads its stage's parameters and AdamW moments
//               (param_bytes + optimizer_bytes per parameter) at the slower of its and its
//               donor's net_gbps (from a checkpoint: its own); from the init it takes no time.
//               A sync overtaken by a step fetches the donor's newest state again; after 20 such
//               the peer gives up (launch/swarm_peer_role.cc) and its device joins again
//               settings.replace_after_s later.
//   reduction   once a stage holds all M micro-batches, its plan's P peers report together after
//               grad_bytes per parameter × 2(P-1)/P over the slowest plan peer's net_gbps (a
//               ring all-reduce) plus the file's simulation.round_s (the round's fixed cost: the
//               plan, the connections, the report, the next step's lease); the report that
//               completes the step returns the Apply, and the next step opens by itself.
//   stragglers  a group with slow_after_s computes slow_factor times slower from then on, and
//               its peers report the new throughput.
//   kills       with kill_every_s, a live preemptible peer drawn uniformly fails on that
//               schedule, as any failure (below).
//   rebalancing every rebalance_s the coordinator's check (SwarmState::Rebalance, the policy of
//               swarm_policy.h) may move a peer: it drains, then syncs its new stage as a joiner
//               does and reports its throughput there.
//   failures    a failed peer stops at once: its hops go to other peers, joiners syncing from it
//               ask for another donor (DonorFailed), and a reduction it is part of never ends.
//               The coordinator notices it settings.lease_s later (RemovePeer kDead): what it held
//               becomes replays and its stage gets a new plan; a stage left without a peer means
//               a rollback (RollBack), to the newest checkpoint (checkpoint_every) or the init.
//
// The peers' states are exact, so each stage's hash of state K is a fixed function of (stage, K)
// and every report of a stage agrees: the simulation shows the policy's timing, not drift.
//
// A pure function of the devices file, the options and the seed: no real clock, no I/O, no
// threads; two runs with the same inputs give the same rows. Not thread-safe: one simulation runs
// on the calling thread. Its table and JSON lines: swarm_simulator_output.h.
#ifndef SHOAL_SCHEDULER_SWARM_SIMULATOR_H_
#define SHOAL_SCHEDULER_SWARM_SIMULATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "scheduler/simulator.h"

namespace shoal::scheduler {

struct SwarmSimulationOptions {
  int stages = 0;                // S, in [1, n_layer]: the blocks split evenly (UniformSplit)
  int micro_batches = 8;         // M per step, in [1, 65536]
  int64_t steps = 1000;          // stop when the swarm's newest state is this step, in [1, 1e9]
  int trainers = 1;              // virtual trainers, in [1, 4096]
  int in_flight = 8;             // micro-batches each trainer runs at once (--in-flight), [1, 256]
  double churn_per_hour = 0;     // failures per preemptible device per virtual hour, [0, 3600]
  // > 0: besides, every kill_every_s one live peer of a preemptible group, drawn uniformly, fails
  // (a kill -9 on a schedule, as `shoal bench swarm` kills); 0: none. [0, 1e7].
  double kill_every_s = 0;
  int64_t checkpoint_every = 0;  // every stage saved after each this many steps (free); 0: none
  uint64_t seed = 1;             // of the failure times
  double report_every_s = 0;     // a row this often; 0: the file's simulation.report_every_s
  double rebalance_s = 0;        // the rebalancer's period (SwarmState::Rebalance); 0: never
};

// One line of the table: the state at time_s, rates over the interval since the previous row.
struct SwarmSimulationRow {
  double time_s = 0;
  int64_t steps = 0;         // the swarm's newest state: steps applied and kept
  int64_t applied = 0;       // Apply decisions so far (above `steps` after a rollback)
  double tokens_per_s = 0;   // tokens of the steps applied since the previous row, per second
  std::vector<int> serving;  // per stage: SERVING peers
  std::vector<int> syncing;  // per stage: SYNCING peers
  int64_t replays = 0;       // cumulative, as SwarmCounters
  int64_t fences = 0;
  int64_t joins = 0;
  int64_t deaths = 0;
  int64_t rollbacks = 0;
  std::string events;  // failures, joins, rollbacks since the previous row, "; "-separated
};

// When each step's Apply came out.
struct SwarmAppliedStep {
  int64_t step = 0;
  double time_s = 0;
};

struct SwarmSimulationSummary {
  double virtual_s = 0;
  int64_t steps = 0;             // the newest state at the end
  int64_t applied = 0;           // Apply decisions
  double tokens_per_step = 0;    // M × mbs × block_size
  double mean_tokens_per_s = 0;  // steps × tokens_per_step / virtual_s
  int64_t replays = 0;           // micro-batches leased again after a fence
  int64_t fences = 0;
  int64_t accumulations_fenced = 0;  // (stage, micro-batch) records dropped by fences
  int64_t duplicates = 0;            // commits refused as duplicates (0: exactly once)
  int64_t max_lost = 0;              // the ledger's `lost`, the most seen (0 unless a rollback)
  int64_t joins = 0;                 // AddPeer accepted, the initial peers included
  int64_t refused = 0;               // devices whose memory fits no stage
  int64_t deaths = 0;
  int64_t rollbacks = 0;
  int64_t moves = 0;        // moves the rebalancer made that completed (SwarmCounters::moves)
  int64_t stale_syncs = 0;  // syncs overtaken by a step (fetched again)
  double idle_s = 0;        // time with no step open (filling stages, rolling back)
  double utilisation = 0;   // peers' compute seconds / their seconds in the swarm
  bool finished = false;    // the steps were reached before settings.max_hours
};

struct SwarmSimulationResult {
  std::vector<SwarmSimulationRow> rows;
  std::vector<SwarmAppliedStep> applied;  // every Apply, in order
  SwarmSimulationSummary summary;
};

// kInvalidArgument naming the option (or the devices file's key: every group needs a net_gbps
// > 0 in a swarm) that is out of range; kResourceExhausted when a stage fits no device of the
// file; kInternal when the swarm state refuses a call the simulated peers make by its rules (a
// bug, named); kResourceExhausted also if the run exceeds 2e8 events.
absl::StatusOr<SwarmSimulationResult> SimulateSwarm(const ClusterSpec& spec,
                                                    const SwarmSimulationOptions& options);

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_SIMULATOR_H_
