// The layout solver: devices (as they measured themselves) + the model + the global batch ->
// tensor x pipeline x data-parallel degrees, which devices form each tensor-parallel group and
// pipeline, an uneven split of the blocks over each pipeline's stages by measured speed, the
// micro-batch size and count (per replica: uneven replicas get uneven shares of the batch), a
// memory plan per device and the predicted step time and peak memory of every device.
//
// Pure and deterministic: the same inputs (in any order of `devices`) give the same layout, so
// the live coordinator and the simulator run the same code. The cost model is written down in
// docs/cost-model.md.
#ifndef SHOAL_SCHEDULER_LAYOUT_SOLVER_H_
#define SHOAL_SCHEDULER_LAYOUT_SOLVER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gpt_arithmetic.h"
#include "proto/coordinator.pb.h"

namespace shoal::scheduler {

struct SolverDevice {
  std::string id;              // worker id; ties are broken by it, so layouts are reproducible
  v1::DeviceProfile profile;
};

struct SolverOptions {
  // Fraction of a device's measured GEMM rate that a training step reaches (the model's MFU
  // against the measured peak); calibrated on this codebase's CPU trainer.
  double compute_efficiency = 0.6;
  // Stage times of one pipeline must lie within this fraction of each other wherever whole
  // blocks allow it (the properties test checks it).
  double balance_tolerance = 0.25;
  // Share of each tier's budget the plan may fill (the rest is headroom for the allocator,
  // buffers and the runtime itself).
  double memory_headroom = 0.9;
  // Allow model states to spill to the disk tier when RAM (or GPU memory) is short.
  bool allow_disk = true;
};

// The model's shape from its spec.
GptShape ShapeOf(const v1::ModelSpec& model);

// Bytes and FLOPs of the model's parts, from its shape (common/gpt_arithmetic.h; see
// docs/cost-model.md).
struct ModelCosts {
  double block_params = 0;             // parameters of one transformer block
  double embedding_params = 0;         // token + position embeddings (the head is tied)
  double final_params = 0;             // final LayerNorm
  double block_flops_per_token = 0;    // forward + backward of one block, per token
  double head_flops_per_token = 0;     // logits and their backward, per token
  double block_activation_bytes_per_token = 0;  // kept for backward, per block
  double state_bytes_per_param = 0;    // param + grad + optimizer bytes
};
ModelCosts ComputeModelCosts(const v1::ModelSpec& model);

// Min-max split of `n_layer` blocks over stages in order. `seconds_per_layer[i]` is stage i's
// time for one block (per step); `extra_seconds[i]` a fixed cost it carries besides (embedding on
// the first, head on the last); `max_layers[i]` its memory cap. Returns blocks per stage (each
// >= 1) minimising the slowest stage, or kResourceExhausted when the caps cannot hold the model.
absl::StatusOr<std::vector<int>> SplitLayers(int n_layer,
                                             const std::vector<double>& seconds_per_layer,
                                             const std::vector<double>& extra_seconds,
                                             const std::vector<int>& max_layers);

// Even split (the first stages take the remainder), for comparison: shoal::UniformSplit.
using ::shoal::UniformSplit;

// Step time of a synchronous 1F1B pipeline with `micro_batches` micro-batches whose stage i takes
// `stage_seconds_per_micro[i]` per micro-batch: (m - 1) * slowest + sum over stages.
double PipelineStepSeconds(const std::vector<double>& stage_seconds_per_micro, int micro_batches);

// With job.place_all (a launcher's fixed world), only layouts that use every device are weighed.
// Errors: kInvalidArgument for an empty device list or a job the solver cannot read (named
// field); kResourceExhausted when the model fits on no combination of the devices, with the
// shortfall in bytes in the message, or, with place_all, on none that uses them all (the message
// names the layout that would leave some out); kFailedPrecondition with place_all and an
// unusable device.
absl::StatusOr<v1::Layout> SolveLayout(const std::vector<SolverDevice>& devices,
                                       const v1::JobSpec& job, const SolverOptions& options = {});

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_LAYOUT_SOLVER_H_
