// Where a worker keeps its model states and activations, planned from byte counts and measured
// rates alone (issue 7): the pure decisions behind memory.host_budget, memory.disk_path and
// memory.activation_budget. No LibTorch, no files: the caller (the trainer's step engine) opens
// what a plan asks for.
//
// States. fp32 AdamW holds 16 bytes per parameter: the parameter and its gradient (8, "resident"
// below) and two moments (8). With a host budget and a disk tier:
//   - everything fits: nothing moves;
//   - the parameters and gradients fit with two chunks of moments: the moments beyond the budget
//     go to the disk tier (MomentOffloadPlan);
//   - otherwise the decay group (every 2-D weight and both embeddings) is paged chunk by chunk
//     (memory/model_pager.h), its moments following its chunks.
//
// Activations. Per micro-batch a block keeping its activations holds `keep_bytes`, one that
// recomputes (or offloads) them holds its output, `output_bytes` (common/gpt_arithmetic.h gives
// both). The first blocks give theirs up until the rest fit: their activations would wait
// longest, and offloading them leaves the most compute to hide the writes behind. They offload
// when asked to ("always"), or under "auto" when a write and a read of one block on the measured
// disk take less than recomputing its forward at the measured GEMM peak; else they recompute.
// Blocks are alike, so they all make the same choice.
#ifndef SHOAL_MEMORY_STATE_PLAN_H_
#define SHOAL_MEMORY_STATE_PLAN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace shoal::memory {

// --- Model states -------------------------------------------------------------------------------

// The budget the states live in.
struct StateBudget {
  int64_t host_bytes = 0;  // memory.host_budget; 0: not set (everything stays in RAM)
  bool has_disk = false;   // memory.disk_path is set: a disk tier may take what does not fit
};

enum class StatePlacement {
  kInRam,             // everything fits, or there is nowhere else to go
  kMomentsOffloaded,  // parameters and gradients in RAM, the moments partly on disk
  kPaged,             // the decay group's parameters, gradients and moments paged
};

// Before the model exists, from its element counts: the decay group (pageable) and the rest.
StatePlacement PlaceStates(const StateBudget& budget, int64_t decay_elements,
                           int64_t other_elements);

// Paged: the budget for the decay group's parameters, gradients and moments together (what
// ModelPagerOptions::budget_bytes takes): the host budget less the other group's parameters and
// gradients, which stay in RAM (with 64 elements of alignment slack).
int64_t PagedStateBudget(const StateBudget& budget, int64_t other_elements);

// The moments' share of RAM when the parameters and gradients stay there.
struct MomentOffloadPlan {
  int64_t chunk_elements = 0;     // per moment chunk (m and v: 8 bytes per element)
  int64_t host_budget_bytes = 0;  // 0: no offload, every moment in RAM
};
// About 32 chunks over `elements`, 16-aligned, within [4096, 2^20]: fine enough that a small
// budget still holds several of them.
int64_t MomentChunkElements(int64_t elements);
// `resident_bytes`: the parameters' and gradients' buffers as allocated; `elements`: the
// parameters. No offload when nothing is set or everything fits; kInvalidArgument naming
// memory.host_budget when it cannot hold the parameters, the gradients and two moment chunks.
absl::StatusOr<MomentOffloadPlan> PlanMomentOffload(const StateBudget& budget,
                                                    int64_t resident_bytes, int64_t elements);

// --- Activations --------------------------------------------------------------------------------

struct ActivationBudget {
  int n_layer = 0;
  double budget_bytes = 0;   // memory.activation_budget, per micro-batch
  double keep_bytes = 0;     // one block keeping its activations, per micro-batch
  double output_bytes = 0;   // one block keeping only its output
};

// How many blocks keep their activations within `room` bytes (the rest keep their outputs),
// in [0, n_layer].
int BlocksKept(const ActivationBudget& budget, double room);

// The measurements "auto" decides by. A disk that could not be measured has bandwidth 0 and a
// `disk_problem`.
struct ActivationRates {
  double disk_bytes_per_s = 0;  // the offload tier's, one direction
  double slot_bytes = 0;        // one block's packed activations
  double staging_bytes = 0;     // the offloader's staging buffers, which the budget counts
  double gemm_flops_per_s = 0;  // the GEMM peak
  double block_forward_flops = 0;  // one block's forward over one micro-batch
  std::string disk_problem;     // why the disk could not be measured, if it could not
};

struct ActivationChoice {
  int kept = 0;             // blocks [n_layer - kept, n_layer) keep; the first ones give up
  bool offload = false;     // those offload (else they recompute)
  double peak_bytes = 0;    // held per micro-batch, staging buffers included
  double offload_seconds = 0;    // a write and a read of one block
  double recompute_seconds = 0;  // one block's forward at the GEMM peak
};
// `mode`: "auto", "never" or "always". `rates` only matter when some block gives up and the mode
// is not "never"; with "always" the caller has made sure the disk works.
ActivationChoice ChooseActivations(const ActivationBudget& budget, const std::string& mode,
                                   const ActivationRates& rates);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_STATE_PLAN_H_
