// PipelineExecutor: runs one rank's program of a PipelineSchedule (pipeline_schedule.h) over a
// pipeline group's point-to-point transfers.
//
// The executor owns no model. A StageCompute (implemented over the model by runtime/) runs this
// rank's model chunk forward and backward on one micro-batch; the executor walks
// `schedule.per_rank[group->rank()]` front to back, receives each input activation / output
// gradient from its neighbour before the computation that needs it, and posts each output
// activation / input gradient to its neighbour asynchronously (a copy is sent, so the stage may
// reuse its buffers at once; every send is waited on before RunStep returns). Rank r of the
// group is pipeline rank r (model stage r when virtual_stages == 1).
//
// Activation slots: the executor gives each (micro-batch, chunk) a slot of that chunk (a small
// integer) at its forward and frees it at its backward, lowest free slot first, so a chunk keeps
// activations only for the micro-batches in flight; a rank holds at most PeakInFlightBound of
// the schedule (GPipe m, 1F1B p - rank, interleaved as pipeline_schedule.h says) in all.
//
// Tags: a transfer is tagged by (data kind, micro-batch, receiving model stage), so transfers
// never match the wrong recv even when several are in flight; forward-only passes (RunForward)
// use their own data kind. Messages of one tag arrive in order, so successive steps may reuse
// tags.
//
// Errors: a failed or timed-out transfer returns its status naming the action ("recv activation
// of micro-batch 3 from pipeline rank 0: ..."); the group is then unusable (comm/backend.h). An
// exception from the StageCompute propagates (the trainer turns it into a status). Not
// thread-safe.
#ifndef SHOAL_PARALLEL_PIPELINE_EXECUTOR_H_
#define SHOAL_PARALLEL_PIPELINE_EXECUTOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "comm/backend.h"
#include "parallel/pipeline_schedule.h"

namespace shoal::parallel {

// This rank's model chunks (one per virtual stage; chunk c of pipeline rank r is model stage
// c * stages + r), as the executor drives them. Implemented by runtime/ over the model.
class StageCompute {
 public:
  virtual ~StageCompute() = default;
  // Forward of `micro_batch` through `chunk` into that chunk's activation slot `slot`. `input`:
  // the received activation, undefined on the first model stage (which reads its own tokens).
  // Returns the activation to send to the next model stage (float32, ActivationShape()), or an
  // undefined tensor on the last model stage (which keeps its loss). The returned tensor may be
  // overwritten by the next Forward.
  virtual at::Tensor Forward(int chunk, int micro_batch, int slot, const at::Tensor& input) = 0;
  // Backward of the forward in `chunk`'s `slot`. `grad_output`: the received gradient of the
  // chunk's output, undefined on the last model stage. Returns the gradient of the chunk's input
  // to send back (float32, ActivationShape()), or undefined on the first model stage.
  virtual at::Tensor Backward(int chunk, int micro_batch, int slot,
                              const at::Tensor& grad_output) = 0;
  // Shape of the activations exchanged between stages, e.g. (B, T, C); the same for every
  // micro-batch and stage boundary.
  virtual std::vector<int64_t> ActivationShape() const = 0;
};

struct PipelineExecutorOptions {
  comm::CollectiveOptions transfer;  // timeout of every send / recv
};

// Time one RunStep spent, by kind (seconds, wall clock on this rank).
struct PipelineStepTiming {
  double compute_s = 0;     // inside StageCompute::Forward / Backward
  double recv_wait_s = 0;   // blocked waiting for a recv to complete
  double send_wait_s = 0;   // waiting for posted sends at the end of the step
  double total_s = 0;       // the whole RunStep
};

class PipelineExecutor {
 public:
  // `group`: the pipeline group (size == schedule.stages; not owned, must outlive this object;
  // may be null when stages == 1). `schedule` is copied; any valid schedule runs, interleaved
  // ones included (Create checks Validate).
  static absl::StatusOr<std::unique_ptr<PipelineExecutor>> Create(
      comm::Backend* group, PipelineSchedule schedule, StageCompute* stage,
      PipelineExecutorOptions options = {});

  // One training step's forwards and backwards: walks this rank's actions up to and including
  // kReduceGrads, where it calls `reduce_grads` (the caller's gradient sync; may be null), and
  // returns at kOptimizerStep without stepping (the caller steps). All sends have completed
  // when it returns OK.
  absl::Status RunStep(const std::function<absl::Status()>& reduce_grads = nullptr);

  // Forward only (evaluation): micro-batches 0 .. micro_batches - 1 in order, each through this
  // rank's chunks in model-stage order, received, run forward in slot 0 of the chunk and passed
  // on. The last model stage's StageCompute keeps the losses.
  absl::Status RunForward(int micro_batches);

  // Timing of the last RunStep.
  const PipelineStepTiming& last_timing() const { return timing_; }
  // Most slots in use at once during the last RunStep.
  int peak_slots() const { return peak_slots_; }
  const PipelineSchedule& schedule() const { return schedule_; }

  ~PipelineExecutor();

 private:
  PipelineExecutor(comm::Backend* group, PipelineSchedule schedule, StageCompute* stage,
                   PipelineExecutorOptions options);
  struct Impl;
  comm::Backend* group_;
  PipelineSchedule schedule_;
  StageCompute* stage_;
  PipelineExecutorOptions options_;
  PipelineStepTiming timing_;
  int peak_slots_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_PIPELINE_EXECUTOR_H_
