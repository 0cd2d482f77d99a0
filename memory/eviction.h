// Which chunk to evict when a chunk must be made resident and the fast tier is full
// (ALGORITHMS.md §3.5; issue 7: "evicted by the farthest-next-use rule").
//
// Training repeats the same access pattern every iteration, so the order in which chunks are
// accessed, recorded once during a warm-up iteration, tells the future: the chunk whose next use
// is farthest away is the one to evict (Belady's OPT, optimal for demand paging). The pieces:
//  * NextUseTable: the recorded trace (chunk ids by moment) and "when is chunk c next used after
//    moment t", wrapping into the next iteration.
//  * EvictionPolicy: picks a victim among the evictable residents. FarthestNextUsePolicy is the
//    rule shoal uses; LeastRecentlyUsedPolicy is there for comparison.
//  * ResidentSet: the chunks resident in a tier of fixed capacity (in chunks: chunks are
//    equal-sized), with pins for chunks in use, which are never evicted.
//  * SimulateTrace: runs a trace for K iterations against a capacity, counting loads and
//    evictions, so policies can be compared and checked against a brute-force optimum.
//
// Plain C++ and abseil, no tensors: the chunk manager owns the payloads and asks these classes
// only "which one?". None of the classes is thread-safe; a chunk manager serialises calls.
#ifndef SHOAL_MEMORY_EVICTION_H_
#define SHOAL_MEMORY_EVICTION_H_

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace shoal::memory {

// The next use of a chunk absent from the trace.
inline constexpr int64_t kNeverUsed = std::numeric_limits<int64_t>::max();

// One iteration's access trace, repeated every iteration. Moments are positions in the trace,
// 0 .. length()-1; moment t accesses chunk trace[t].
class NextUseTable {
 public:
  // Errors: kInvalidArgument for an empty trace or a negative chunk id (naming the moment).
  static absl::StatusOr<NextUseTable> Build(absl::Span<const int> trace);

  int64_t length() const { return static_cast<int64_t>(trace_.size()); }
  const std::vector<int>& trace() const { return trace_; }

  // The first moment after `moment` at which `chunk` is accessed: a t' > moment in this
  // iteration, else length() + (its first moment) in the next iteration, else kNeverUsed.
  // O(log accesses of `chunk`). REQUIRES: 0 <= moment < length().
  int64_t NextUse(int chunk, int64_t moment) const;
  // First moment `chunk` is accessed in an iteration, or kNeverUsed.
  int64_t FirstUse(int chunk) const;

 private:
  std::vector<int> trace_;
  absl::flat_hash_map<int, std::vector<int64_t>> moments_;  // chunk -> ascending moments
};

// Chooses the chunk to evict. The caller passes only evictable chunks (resident, not pinned, not
// the one being loaded); the policy never sees the others.
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual absl::string_view name() const = 0;
  // `chunk` was used (hit or after its load). Called once per access, in trace order.
  virtual void OnAccess(int /*chunk*/) {}
  // The victim among `candidates` at `moment` (position in the iteration's trace).
  // Errors: kFailedPrecondition if `candidates` is empty.
  virtual absl::StatusOr<int> ChooseVictim(absl::Span<const int> candidates,
                                           int64_t moment) const = 0;
};

// Belady/OPT with the recorded trace: evict the chunk used farthest in the future (a chunk the
// trace never uses first); ties to the lower chunk id, as PatrickStar.
class FarthestNextUsePolicy final : public EvictionPolicy {
 public:
  // `table` must outlive the policy.
  explicit FarthestNextUsePolicy(const NextUseTable* table) : table_(table) {}
  absl::string_view name() const override { return "farthest-next-use"; }
  absl::StatusOr<int> ChooseVictim(absl::Span<const int> candidates,
                                   int64_t moment) const override;

 private:
  const NextUseTable* table_;
};

// Evict the chunk whose last use is oldest (never used first); ties to the lower chunk id. Needs
// no trace; here for comparison.
class LeastRecentlyUsedPolicy final : public EvictionPolicy {
 public:
  absl::string_view name() const override { return "least-recently-used"; }
  void OnAccess(int chunk) override { last_use_[chunk] = ++clock_; }
  absl::StatusOr<int> ChooseVictim(absl::Span<const int> candidates,
                                   int64_t moment) const override;

 private:
  int64_t clock_ = 0;
  absl::flat_hash_map<int, int64_t> last_use_;
};

// The chunks resident in one tier holding at most `capacity` chunks. A pinned chunk (in use now;
// pins nest) is never chosen as a victim.
class ResidentSet {
 public:
  // Errors: kInvalidArgument if capacity < 1.
  static absl::StatusOr<ResidentSet> Create(int capacity);

  int capacity() const { return capacity_; }
  int size() const { return static_cast<int>(pins_.size()); }
  bool Contains(int chunk) const { return pins_.contains(chunk); }
  bool IsPinned(int chunk) const;
  // Residents that are not pinned: a load into a full set needs at least one.
  int NumEvictable() const;
  // Resident chunks in ascending id order.
  std::vector<int> Residents() const;

  // Makes `chunk` resident; a no-op returning nullopt if it already is. When the set is full,
  // evicts the victim `policy` picks among the unpinned residents at `moment` and returns it.
  // Errors: kResourceExhausted (naming the chunk, the capacity and the pinned chunks) if the set
  // is full and every resident is pinned; the set is then unchanged, never over capacity.
  // kInternal if the policy names a chunk that is not an evictable resident (a policy bug).
  absl::StatusOr<std::optional<int>> Load(int chunk, int64_t moment, const EvictionPolicy& policy);

  // Errors: kFailedPrecondition if `chunk` is not resident (Pin) or not pinned (Unpin).
  absl::Status Pin(int chunk);
  absl::Status Unpin(int chunk);

 private:
  explicit ResidentSet(int capacity) : capacity_(capacity) {}
  int capacity_;
  absl::flat_hash_map<int, int> pins_;  // resident chunk -> pin count
};

struct SimulationOptions {
  int capacity_chunks = 1;  // resident set capacity, >= 1
  int iterations = 1;       // the trace is repeated this many times, >= 1
  // Chunks pinned from their first load to the end of the run (persistent chunks).
  std::vector<int> pinned;
  // After each access, load the next access's chunk ahead of its use (while the current one is
  // still pinned). Skipped when nothing is evictable; the chunk is then loaded on demand.
  bool prefetch_next = false;
};

struct SimulationEvent {
  int64_t moment = 0;  // absolute: iteration * trace length + position
  int loaded = 0;
  int evicted = -1;    // -1: nothing evicted (the set had room)
};

struct SimulationResult {
  int64_t loads = 0;         // chunks made resident (misses), prefetched or on demand
  int64_t evictions = 0;
  int64_t demand_loads = 0;  // loads at the moment of use: a compute stall each
  std::vector<SimulationEvent> events;  // every load, in order
};

// Runs `trace` `iterations` times from an empty resident set. At each moment the accessed chunk
// is pinned while in use, loaded if absent (evicting per `policy` when full), then unpinned
// (unless in options.pinned). `policy.OnAccess` is called at every access.
// Errors: kInvalidArgument for bad options or trace; kResourceExhausted when a load finds every
// resident pinned (naming the moment).
absl::StatusOr<SimulationResult> SimulateTrace(absl::Span<const int> trace,
                                               const SimulationOptions& options,
                                               EvictionPolicy& policy);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_EVICTION_H_
