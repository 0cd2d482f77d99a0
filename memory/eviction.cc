#include "memory/eviction.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace shoal::memory {

absl::StatusOr<NextUseTable> NextUseTable::Build(absl::Span<const int> trace) {
  if (trace.empty()) return absl::InvalidArgumentError("next-use table: empty access trace");
  NextUseTable table;
  table.trace_.assign(trace.begin(), trace.end());
  for (size_t t = 0; t < trace.size(); ++t) {
    if (trace[t] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "next-use table: negative chunk id ", trace[t], " at moment ", t));
    }
    // Appending in trace order keeps every list sorted, which NextUse's binary search needs.
    table.moments_[trace[t]].push_back(static_cast<int64_t>(t));
  }
  return table;
}

int64_t NextUseTable::NextUse(int chunk, int64_t moment) const {
  auto it = moments_.find(chunk);
  if (it == moments_.end()) return kNeverUsed;
  const std::vector<int64_t>& m = it->second;
  auto next = std::upper_bound(m.begin(), m.end(), moment);
  // Not used again this iteration: the trace repeats, so its next use is its first use in the
  // next iteration, after every use still to come in this one.
  return next != m.end() ? *next : length() + m.front();
}

int64_t NextUseTable::FirstUse(int chunk) const {
  auto it = moments_.find(chunk);
  return it == moments_.end() ? kNeverUsed : it->second.front();
}

absl::StatusOr<int> FarthestNextUsePolicy::ChooseVictim(absl::Span<const int> candidates,
                                                        int64_t moment) const {
  if (candidates.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("farthest-next-use: no evictable chunk at moment ", moment));
  }
  int victim = candidates[0];
  int64_t victim_next = table_->NextUse(victim, moment);
  for (int c : candidates.subspan(1)) {
    const int64_t next = table_->NextUse(c, moment);
    if (next > victim_next || (next == victim_next && c < victim)) {
      victim = c;
      victim_next = next;
    }
  }
  return victim;
}

absl::StatusOr<int> LeastRecentlyUsedPolicy::ChooseVictim(absl::Span<const int> candidates,
                                                          int64_t moment) const {
  if (candidates.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("least-recently-used: no evictable chunk at moment ", moment));
  }
  auto last_use = [this](int c) {
    auto it = last_use_.find(c);
    return it == last_use_.end() ? int64_t{0} : it->second;
  };
  int victim = candidates[0];
  int64_t victim_last = last_use(victim);
  for (int c : candidates.subspan(1)) {
    const int64_t last = last_use(c);
    if (last < victim_last || (last == victim_last && c < victim)) {
      victim = c;
      victim_last = last;
    }
  }
  return victim;
}

absl::StatusOr<ResidentSet> ResidentSet::Create(int capacity) {
  if (capacity < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("resident set: capacity must be >= 1 chunk, got ", capacity));
  }
  return ResidentSet(capacity);
}

bool ResidentSet::IsPinned(int chunk) const {
  auto it = pins_.find(chunk);
  return it != pins_.end() && it->second > 0;
}

int ResidentSet::NumEvictable() const {
  int n = 0;
  for (const auto& [chunk, pins] : pins_) n += pins == 0 ? 1 : 0;
  return n;
}

std::vector<int> ResidentSet::Residents() const {
  std::vector<int> out;
  out.reserve(pins_.size());
  for (const auto& [chunk, pins] : pins_) out.push_back(chunk);
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<std::optional<int>> ResidentSet::Load(int chunk, int64_t moment,
                                                     const EvictionPolicy& policy) {
  if (Contains(chunk)) return std::nullopt;
  std::optional<int> evicted;
  if (size() >= capacity_) {
    // Sorted, so that a policy's tie-break by id does not depend on hash order.
    std::vector<int> candidates;
    std::vector<int> pinned;
    for (int c : Residents()) (IsPinned(c) ? pinned : candidates).push_back(c);
    if (candidates.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "resident set: cannot load chunk ", chunk, " at moment ", moment, ": all ", capacity_,
          " slots hold pinned chunks [", absl::StrJoin(pinned, ", "), "]"));
    }
    absl::StatusOr<int> victim = policy.ChooseVictim(candidates, moment);
    if (!victim.ok()) return victim.status();
    if (!Contains(*victim) || IsPinned(*victim)) {
      return absl::InternalError(absl::StrCat("resident set: policy ", policy.name(),
                                              " chose chunk ", *victim,
                                              ", which is not an evictable resident"));
    }
    pins_.erase(*victim);
    evicted = *victim;
  }
  pins_.emplace(chunk, 0);
  return evicted;
}

absl::Status ResidentSet::Pin(int chunk) {
  auto it = pins_.find(chunk);
  if (it == pins_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("resident set: cannot pin chunk ", chunk, ": not resident"));
  }
  ++it->second;
  return absl::OkStatus();
}

absl::Status ResidentSet::Unpin(int chunk) {
  auto it = pins_.find(chunk);
  if (it == pins_.end() || it->second == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("resident set: cannot unpin chunk ", chunk, ": not pinned"));
  }
  --it->second;
  return absl::OkStatus();
}

absl::StatusOr<SimulationResult> SimulateTrace(absl::Span<const int> trace,
                                               const SimulationOptions& options,
                                               EvictionPolicy& policy) {
  if (options.iterations < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("simulation: iterations must be >= 1, got ", options.iterations));
  }
  if (trace.empty()) return absl::InvalidArgumentError("simulation: empty access trace");
  for (size_t t = 0; t < trace.size(); ++t) {
    if (trace[t] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("simulation: negative chunk id ", trace[t], " at moment ", t));
    }
  }
  absl::StatusOr<ResidentSet> created = ResidentSet::Create(options.capacity_chunks);
  if (!created.ok()) return created.status();
  ResidentSet set = *std::move(created);
  auto always_pinned = [&options](int c) {
    return std::find(options.pinned.begin(), options.pinned.end(), c) != options.pinned.end();
  };

  SimulationResult result;
  const int64_t n = static_cast<int64_t>(trace.size());
  const int64_t total = n * options.iterations;
  // Loads `chunk` (absent) at absolute moment `now`, recording the event.
  auto load = [&](int chunk, int64_t now) -> absl::Status {
    absl::StatusOr<std::optional<int>> evicted = set.Load(chunk, now % n, policy);
    if (!evicted.ok()) return evicted.status();
    ++result.loads;
    if (evicted->has_value()) ++result.evictions;
    result.events.push_back(SimulationEvent{now, chunk, evicted->value_or(-1)});
    // A persistent chunk stays pinned from its first load on.
    if (always_pinned(chunk)) return set.Pin(chunk);
    return absl::OkStatus();
  };

  for (int64_t now = 0; now < total; ++now) {
    const int chunk = trace[now % n];
    if (!set.Contains(chunk)) {
      if (absl::Status s = load(chunk, now); !s.ok()) return s;
      ++result.demand_loads;
    }
    policy.OnAccess(chunk);
    if (options.prefetch_next && now + 1 < total) {
      const int next = trace[(now + 1) % n];
      if (!set.Contains(next)) {
        // The chunk in use now must survive its own compute: pin it while the next one loads.
        if (absl::Status s = set.Pin(chunk); !s.ok()) return s;
        absl::Status loaded = absl::OkStatus();
        if (set.size() < set.capacity() || set.NumEvictable() > 0) loaded = load(next, now);
        if (absl::Status s = set.Unpin(chunk); !s.ok()) return s;
        if (!loaded.ok()) return loaded;
      }
    }
  }
  return result;
}

}  // namespace shoal::memory
