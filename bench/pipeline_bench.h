// The body of `shoal bench pipeline` inside one rank: the pipeline executor on a synthetic stage
// whose forward and backward take a fixed time, to measure the schedules' bubble against theory.
//
// Every rank of the pipeline group calls RunPipelineBench with the same options; rank r is
// pipeline rank r (for interleaved 1F1B it holds `virtual_stages` chunks, model stages
// r, r + p, ...). For each schedule it builds a PipelineExecutor, runs one warm-up step and
// `steps` timed steps (all ranks start each step together, after a barrier), then gathers every
// rank's per-step timings to every rank with one AllGather. Transfers are real: each one carries
// an activation of `activation_shape` float32 values.
//
// Each rank computes the same in total whatever the schedule: a chunk of an interleaved schedule
// takes forward_ms / virtual_stages and backward_ms / virtual_stages per micro-batch, as a rank's
// layers split into that many chunks would.
//
// Work kinds: kSleep sleeps for the stage time, so every rank behaves as if it had its own
// device (a 2-core machine cannot run 4 ranks of real compute side by side); kGemm runs a
// single-threaded matmul loop calibrated on this rank to about the same time, so the figure
// includes the ranks' contention for cores.
//
// Blocks for the whole benchmark; not thread-safe.
#ifndef SHOAL_BENCH_PIPELINE_BENCH_H_
#define SHOAL_BENCH_PIPELINE_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "parallel/pipeline_schedule.h"

namespace shoal::bench {

enum class PipelineBenchWork { kSleep, kGemm };

struct PipelineBenchOptions {
  std::vector<parallel::ScheduleKind> schedules = {parallel::ScheduleKind::k1F1B};  // in this order
  int micro_batches = 8;                                        // m, per step
  double forward_ms = 20;   // one micro-batch's forward on one rank (all its chunks together)
  double backward_ms = 40;  // one micro-batch's backward on one rank (all its chunks together)
  int virtual_stages = 2;   // chunks per rank for kInterleaved1F1B; the others run one
  PipelineBenchWork work = PipelineBenchWork::kSleep;
  int steps = 5;            // timed steps, after one warm-up step
  std::vector<int64_t> activation_shape = {4, 64, 128};  // one transfer: 128 KiB of float32
  comm::CollectiveOptions transfer;  // timeout of every send / recv and collective
};

// kInvalidArgument naming the field and its value when micro_batches, steps or a time is out of
// range (m in [1, 4096], steps in [1, 10000], times finite in [0, 60000] ms, virtual_stages in
// [2, 64] when an interleaved schedule is asked for), no schedule is given, or the activation
// shape has a dimension < 1.
absl::Status ValidatePipelineBenchOptions(const PipelineBenchOptions& options);

// What an interleaved schedule needs of the stage count that only the group knows:
// kInvalidArgument naming the numbers when it has an interleaved schedule and stages < 2 or
// micro_batches % stages != 0; OK otherwise.
absl::Status CheckPipelineBenchStages(const PipelineBenchOptions& options, int stages);

// One (schedule, stages, m) measurement.
struct PipelineBenchCase {
  parallel::ScheduleKind schedule = parallel::ScheduleKind::k1F1B;
  int stages = 0;
  int micro_batches = 0;
  int virtual_stages = 1;  // chunks per rank: options.virtual_stages if interleaved, else 1
  // 1 - sum over ranks of compute_s / (stages * max over ranks of total_s), mean over steps.
  double bubble_measured = 0;
  // (p - 1) / (m + p - 1) (BubbleFraction1F1B); interleaved: (p - 1) / (v m + p - 1).
  double bubble_theory = 0;
  double step_s = 0;            // max over ranks of total_s, mean over steps
  double compute_s = 0;         // mean over ranks and steps of one rank's compute time
  std::vector<int> peak_slots;  // [rank] -> most slots in use in any timed step
  std::vector<int> peak_bound;  // [rank] -> PeakInFlightBound
};

// Runs the benchmark on this rank. `group`: the pipeline group (its size is the number of
// stages; may be null for a single stage). Returns the cases (the same on every rank), or the
// first failure: an invalid option or one that does not fit the stage count (kInvalidArgument,
// before anything runs), a failed transfer or collective (its status, naming it).
absl::StatusOr<std::vector<PipelineBenchCase>> RunPipelineBench(
    comm::Backend* group, const PipelineBenchOptions& options);

// The table `shoal bench pipeline` prints: one row per case.
std::string FormatPipelineBenchTable(const std::vector<PipelineBenchCase>& cases);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_PIPELINE_BENCH_H_
