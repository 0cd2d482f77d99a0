#include "memory/state_plan.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace shoal::memory {

StatePlacement PlaceStates(const StateBudget& budget, int64_t decay_elements,
                           int64_t other_elements) {
  if (!budget.has_disk || budget.host_bytes <= 0) return StatePlacement::kInRam;
  const int64_t elements = decay_elements + other_elements;
  if (budget.host_bytes >= 16 * elements) return StatePlacement::kInRam;
  if (budget.host_bytes >= 8 * elements + 2 * 8 * MomentChunkElements(elements)) {
    return StatePlacement::kMomentsOffloaded;
  }
  return StatePlacement::kPaged;
}

int64_t PagedStateBudget(const StateBudget& budget, int64_t other_elements) {
  // The other group (biases and norm gains, a few per mille of the model) stays in RAM with its
  // gradients; its moments share the optimizer's store with the decay group's.
  return budget.host_bytes - 8 * (other_elements + 64);
}

int64_t MomentChunkElements(int64_t elements) {
  return std::clamp<int64_t>((elements / 32 + 15) / 16 * 16, 4096, int64_t{1} << 20);
}

absl::StatusOr<MomentOffloadPlan> PlanMomentOffload(const StateBudget& budget,
                                                    int64_t resident_bytes, int64_t elements) {
  MomentOffloadPlan plan;
  if (!budget.has_disk || budget.host_bytes <= 0) return plan;
  if (budget.host_bytes >= resident_bytes + 8 * elements) return plan;  // everything fits
  plan.chunk_elements = MomentChunkElements(elements);
  const int64_t chunk_bytes = 8 * plan.chunk_elements;
  if (budget.host_bytes - resident_bytes < 2 * chunk_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory.host_budget (", budget.host_bytes, " bytes) cannot hold the parameters and "
        "gradients (", resident_bytes, " bytes) plus two chunks of AdamW moments (",
        2 * chunk_bytes, " bytes); raise it to at least ", resident_bytes + 2 * chunk_bytes));
  }
  plan.host_budget_bytes = budget.host_bytes - resident_bytes;
  return plan;
}

int BlocksKept(const ActivationBudget& b, double room) {
  return static_cast<int>(std::clamp<int64_t>(
      static_cast<int64_t>(std::floor((room - b.n_layer * b.output_bytes) /
                                      (b.keep_bytes - b.output_bytes))),
      0, b.n_layer));
}

ActivationChoice ChooseActivations(const ActivationBudget& budget, const std::string& mode,
                                   const ActivationRates& rates) {
  ActivationChoice c;
  c.kept = BlocksKept(budget, budget.budget_bytes);
  if (c.kept < budget.n_layer && mode != "never" && rates.disk_bytes_per_s > 0) {
    c.offload_seconds = 2.0 * rates.slot_bytes / rates.disk_bytes_per_s;
    c.recompute_seconds = rates.block_forward_flops / rates.gemm_flops_per_s;
    c.offload = mode == "always" || c.offload_seconds < c.recompute_seconds;
    // Offloading holds its staging buffers too, which may cost a block its activations.
    if (c.offload) c.kept = BlocksKept(budget, budget.budget_bytes - rates.staging_bytes);
  }
  c.peak_bytes = c.kept * budget.keep_bytes + (budget.n_layer - c.kept) * budget.output_bytes +
                 (c.offload ? rates.staging_bytes : 0);
  return c;
}

}  // namespace shoal::memory
