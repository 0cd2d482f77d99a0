#include "memory/cost_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace shoal::memory {

std::string MemoryPlanEstimate::Describe() const {
  return absl::StrFormat(
      "prefetch depth %d; chunk I/O %.3f s per step; predicted step %.3f s (%.3f s if all I/O "
      "hides behind compute, %.3f s if none does); predicted peak %.1f MiB",
      prefetch_depth, io_seconds, step_seconds, step_seconds_hidden, step_seconds_serial,
      peak_bytes / double(1 << 20));
}

absl::StatusOr<MemoryPlanEstimate> PlanFromProfile(const WarmupProfile& p) {
  auto bad = [](const char* field, double value) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory plan: warm-up profile field ", field, " is out of range: ", value));
  };
  if (!(p.compute_seconds >= 0)) return bad("compute_seconds", p.compute_seconds);
  if (p.accesses <= 0) return bad("accesses", p.accesses);
  if (!(p.read_bytes_per_s > 0)) return bad("read_bytes_per_s", p.read_bytes_per_s);
  if (!(p.write_bytes_per_s > 0)) return bad("write_bytes_per_s", p.write_bytes_per_s);
  if (p.chunk_bytes <= 0) return bad("chunk_bytes", p.chunk_bytes);
  if (p.loads_per_step < 0) return bad("loads_per_step", p.loads_per_step);
  if (p.write_backs_per_step < 0) return bad("write_backs_per_step", p.write_backs_per_step);
  if (p.pinned_chunks < 1) return bad("pinned_chunks", p.pinned_chunks);
  if (p.capacity_chunks < p.pinned_chunks) return bad("capacity_chunks", p.capacity_chunks);
  if (p.chunk_budget_bytes < 0) return bad("chunk_budget_bytes", p.chunk_budget_bytes);
  if (p.non_chunk_peak_bytes < 0) return bad("non_chunk_peak_bytes", p.non_chunk_peak_bytes);

  MemoryPlanEstimate e;
  const double load_s = p.chunk_bytes / p.read_bytes_per_s;
  const double per_access_s = p.compute_seconds / static_cast<double>(p.accesses);
  const int room = std::max(1, p.capacity_chunks - p.pinned_chunks);
  const double wanted =
      per_access_s > 0 ? std::ceil(load_s / per_access_s) + 1 : static_cast<double>(room);
  e.prefetch_depth = static_cast<int>(std::clamp(wanted, 1.0, static_cast<double>(room)));
  e.io_seconds = p.loads_per_step * load_s + p.write_backs_per_step * p.chunk_bytes /
                                                 p.write_bytes_per_s;
  e.step_seconds_hidden = std::max(p.compute_seconds, e.io_seconds);
  e.step_seconds_serial = p.compute_seconds + e.io_seconds;
  // The share of each load the depth can cover with compute: all of it when the depth wanted
  // fits, else depth / wanted of it.
  const double hidden = std::min(1.0, e.prefetch_depth / std::max(1.0, wanted));
  e.step_seconds =
      e.step_seconds_serial - hidden * (e.step_seconds_serial - e.step_seconds_hidden);
  e.peak_bytes = p.chunk_budget_bytes + p.non_chunk_peak_bytes;
  return e;
}

}  // namespace shoal::memory
