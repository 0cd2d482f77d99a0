// Pipeline schedules as data: for a pipeline of `stages` ranks and `micro_batches`
// micro-batches, the ordered list of actions each rank performs in one training step.
//
// A schedule is a plain value, built once by MakeSchedule and then only read. The executor walks
// `per_rank[rank]` front to back: Forward / Backward run the rank's model chunk on one
// micro-batch, Send* / Recv* become point-to-point transfers with `peer`, ReduceGrads is the
// data-parallel gradient sync of this rank's chunks, OptimizerStep ends the step. Everything here
// is pure computation (no communication, no tensors): no call blocks and every function is
// thread-safe. The schedules assume that a send does not wait for its recv (as Simulate does):
// an executor whose sends can block must post them asynchronously and complete them later.
//
// Model stages and ranks. The model is cut into `stages * virtual_stages` consecutive model
// stages. Model stage j = chunk * stages + rank lives on rank j % stages as its chunk
// j / stages (Megatron's interleaved layout); without interleaving (virtual_stages == 1) model
// stage j is rank j. Activations flow from model stage j to j + 1, gradients from j + 1 to j.
// Worked example, stages = 2, virtual_stages = 2: model stages 0, 1, 2, 3 live on ranks
// 0, 1, 0, 1 as chunks 0, 0, 1, 1; rank 1 chunk 0 sends its activations to rank 0 chunk 1.
//
// Schedules:
//  - kGPipe: every forward, then every backward in reverse micro-batch order. A rank holds the
//    activations of all m micro-batches at once.
//  - k1F1B (PipeDream-flush, Megatron's non-interleaved schedule): rank s runs
//    min(stages - s - 1, m) warm-up forwards, then alternates one forward and one backward, then
//    drains the remaining backwards. It holds at most min(stages - s, m) micro-batches.
//  - kInterleaved1F1B (Megatron's interleaved schedule): each rank holds virtual_stages >= 2
//    chunks and goes through them in groups of `stages` micro-batches; m must be a multiple of
//    stages. The bubble shrinks by about virtual_stages, for more point-to-point traffic.
#ifndef SHOAL_PARALLEL_PIPELINE_SCHEDULE_H_
#define SHOAL_PARALLEL_PIPELINE_SCHEDULE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace shoal::parallel {

enum class ScheduleKind { kGPipe, k1F1B, kInterleaved1F1B };

enum class ActionKind {
  kForward,         // run the chunk forward (model stage 0 reads the batch)
  kBackward,        // run the chunk backward (the last model stage starts from the loss)
  kSendActivation,  // forward output of (micro_batch, chunk) to the next model stage
  kRecvActivation,  // forward input of (micro_batch, chunk) from the previous model stage
  kSendGrad,        // input gradient of (micro_batch, chunk) to the previous model stage
  kRecvGrad,        // output gradient of (micro_batch, chunk) from the next model stage
  kReduceGrads,     // data-parallel gradient sync of this rank's chunks, after its last backward
  kOptimizerStep,   // the optimizer step, last action of every rank
};

// One step of a rank's program. For Send*/Recv*, `chunk` is this rank's chunk that produced
// (send) or will consume (recv) the tensor, and `peer` the other rank; the peer's chunk follows
// from the model stage numbering (PeerChunk). A transfer is identified across the two ranks by
// (kind of data, micro_batch, receiving model stage).
struct Action {
  ActionKind kind = ActionKind::kForward;
  int micro_batch = -1;  // -1 for kReduceGrads and kOptimizerStep
  int chunk = 0;         // virtual stage on this rank, 0 .. virtual_stages - 1
  int peer = -1;         // the other rank of a Send*/Recv*, -1 otherwise

  friend bool operator==(const Action& a, const Action& b) {
    return a.kind == b.kind && a.micro_batch == b.micro_batch && a.chunk == b.chunk &&
           a.peer == b.peer;
  }
};

struct PipelineSchedule {
  ScheduleKind kind = ScheduleKind::kGPipe;
  int stages = 0;                             // pipeline ranks, p
  int micro_batches = 0;                      // m
  int virtual_stages = 1;                     // chunks per rank, v (1 unless interleaved)
  std::vector<std::vector<Action>> per_rank;  // [rank] -> actions in execution order
};

// Builds the schedule. Returns kInvalidArgument naming the argument and its value when
// stages < 1, micro_batches < 1, virtual_stages is not 1 for kGPipe / k1F1B, stages < 2,
// virtual_stages < 2 or micro_batches % stages != 0 for kInterleaved1F1B, or the schedule would
// be unreasonably large (more than 2^24 compute actions).
absl::StatusOr<PipelineSchedule> MakeSchedule(ScheduleKind kind, int stages, int micro_batches,
                                              int virtual_stages = 1);

// The model stage that `chunk` of `rank` holds, as described above.
inline int ModelStage(const PipelineSchedule& s, int rank, int chunk) {
  return chunk * s.stages + rank;
}
// The chunk on `action.peer` that the transfer `action` of `rank` connects to.
// REQUIRES: `action` is a Send* / Recv* that passes Validate.
int PeerChunk(const PipelineSchedule& s, int rank, const Action& action);

// Checks the schedule's invariants; returns kInvalidArgument naming the first violation (rank,
// action index and action) when:
//  - the shape is wrong (per_rank.size() != stages, a field out of range, a peer that is not the
//    neighbouring model stage, a transfer where there is no neighbour);
//  - a send has no matching recv on its peer (same data kind, micro-batch, receiving model
//    stage) or a recv no matching send, or either is duplicated;
//  - a (micro-batch, chunk) is not run forward and backward exactly once each on its rank, its
//    backward precedes its forward, a RecvActivation / RecvGrad comes after the computation
//    that needs it, or a SendActivation / SendGrad before the computation that produces it;
//  - ReduceGrads is not exactly once after the last backward, or OptimizerStep not exactly
//    once and last.
// A valid schedule can still deadlock (ranks waiting on each other's recvs); Simulate finds that.
absl::Status Validate(const PipelineSchedule& schedule);

// Costs for Simulate, in any time unit. `forward` and `backward` have one entry per model stage
// (stages * virtual_stages): the time one micro-batch spends in that stage.
struct StageCosts {
  std::vector<double> forward;
  std::vector<double> backward;
  double p2p_latency = 0.0;  // from a send to the earliest matching recv completion
};

struct ScheduleSimulation {
  double makespan = 0.0;            // time when the last rank finishes
  std::vector<double> busy;         // [rank] -> time spent in Forward / Backward
  double bubble_fraction = 0.0;     // idle share: 1 - sum(busy) / (stages * makespan)
  std::vector<int> peak_in_flight;  // [rank] -> most (micro-batch, chunk) pairs whose forward
                                    // is done and backward is not, at any point
};

// Runs the schedule as discrete events: compute actions take their stage's cost, sends are
// buffered (never block, take no time), a recv blocks until its matching send has happened plus
// p2p_latency; ReduceGrads and OptimizerStep take no time. Does not call Validate, but needs
// in-range fields. Returns kInvalidArgument for a cost vector of the wrong size or a negative or
// non-finite cost or an out-of-range field, and kFailedPrecondition when the ranks deadlock
// (including a recv that no send ever matches), naming each stuck rank and the action it waits on.
absl::StatusOr<ScheduleSimulation> Simulate(const PipelineSchedule& schedule,
                                            const StageCosts& costs);

// Theory, for equal stage costs and no latency.
// 1F1B's (and GPipe's) bubble fraction: (p - 1) / (m + p - 1).
double BubbleFraction1F1B(int stages, int micro_batches);
// Most micro-batches (for interleaving: (micro-batch, chunk) pairs) rank `rank` holds
// activations for: GPipe m; 1F1B min(p - rank, m); interleaved
// min(2 (p - rank - 1) + (v - 1) p + 1, m v).
int PeakInFlightBound(ScheduleKind kind, int stages, int micro_batches, int rank,
                      int virtual_stages = 1);

std::string ToString(ScheduleKind kind);
std::string ToString(ActionKind kind);
// Compact: "F3", "B3", "F3.c1" (chunk 1), "SA3>1" (send activation to rank 1), "RG3<2",
// "Reduce", "Step".
std::string ToString(const Action& action);
// A header line and one line per rank.
std::string ToString(const PipelineSchedule& schedule);

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_PIPELINE_SCHEDULE_H_
