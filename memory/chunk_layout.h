// ChunkLayout: where every model-state tensor lives when states are kept in fixed-size chunks
// (PatrickStar, ALGORITHMS.md §3.2; ProTrain §4.2), and SearchChunkSize, which picks the chunk
// capacity that wastes the least (§3.8; ProTrain App. B.1).
//
// This is bookkeeping only: nothing is allocated and no ATen is involved. A chunk manager later
// allocates `num_chunks()` buffers of `capacity()` elements and makes each tensor a view at
// (chunk, offset), exactly as FlatBuffer does today for one big buffer.
//
// Input: tensors in first-use order, grouped. A group is a list of tensors that must be resident
// together and so must not straddle two chunks (one transformer block's parameters, or the
// embeddings). Packing rule, as PatrickStar's preprocess hook: a group goes into the current
// (last) chunk if it fits entirely, otherwise a new chunk is opened. Inside a chunk, tensors are
// contiguous in input order, each at an offset aligned to 16 elements (64 bytes of float32, the
// same rule as FlatBuffer), so a view never shares a cache line with its neighbour.
//
// A ChunkLayout is an immutable value: thread-compatible, safe to read from any thread.
#ifndef SHOAL_MEMORY_CHUNK_LAYOUT_H_
#define SHOAL_MEMORY_CHUNK_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace shoal::memory {

// Offsets and capacities are multiples of this many elements (64 bytes of float32).
inline constexpr int64_t kChunkAlignElements = 16;

// One tensor to place. Names must be unique across all groups.
struct ChunkTensor {
  std::string name;
  int64_t numel = 0;  // >= 0
};

// Tensors that must share a chunk, in first-use order. Must not be empty.
using ChunkGroup = std::vector<ChunkTensor>;

struct ChunkLayoutOptions {
  // By default a group larger than the capacity is an error (PatrickStar's rule). With this set,
  // such a group is instead split at tensor boundaries over consecutive chunks of its own
  // (ProTrain-style large blocks): it starts a fresh chunk, fills chunks tensor by tensor, and the
  // next group starts a fresh chunk again, so those chunks hold nothing else. The group is then
  // resident only when all its chunks are, which the eviction policy must know. A single tensor
  // larger than the capacity is an error either way.
  bool split_oversize_groups = false;
};

class ChunkLayout {
 public:
  // Where one tensor lives.
  struct Placement {
    std::string name;
    int group = 0;       // index into the input groups
    int chunk = 0;       // index of its chunk
    int64_t offset = 0;  // in elements from the chunk's start, a multiple of kChunkAlignElements
    int64_t numel = 0;
  };

  struct Chunk {
    // Elements from the chunk's start to the end of its last tensor (alignment padding between
    // tensors included; the tail after the last tensor is not): what the chunk actually uses.
    int64_t used = 0;
    // Sum of its tensors' numel (used minus internal alignment padding).
    int64_t payload = 0;
    int first_tensor = 0;  // index into tensors()
    int num_tensors = 0;
    // True when the chunk holds part of a group split by split_oversize_groups.
    bool split_group = false;
  };

  // Packs `groups` (in order) into chunks of `capacity` elements.
  // Errors (kInvalidArgument, naming the offender): capacity not a positive multiple of
  // kChunkAlignElements; no groups; an empty group; a negative numel; a duplicate name; a group
  // larger than the capacity (unless options.split_oversize_groups) naming its first tensor, its
  // size and the capacity; a single tensor larger than the capacity.
  static absl::StatusOr<ChunkLayout> Build(const std::vector<ChunkGroup>& groups, int64_t capacity,
                                           const ChunkLayoutOptions& options = {});

  int64_t capacity() const { return capacity_; }
  int num_chunks() const { return static_cast<int>(chunks_.size()); }
  int num_groups() const { return num_groups_; }
  // Every tensor, in input order (which is also chunk order, then offset order).
  const std::vector<Placement>& tensors() const { return tensors_; }
  const std::vector<Chunk>& chunks() const { return chunks_; }

  // Index into tensors() of `name`, or -1.
  int Find(absl::string_view name) const;

  // Sum over chunks of Chunk::used.
  int64_t TotalUsed() const;
  // TotalUsed() / (num_chunks() * capacity()): 1 means no waste. In (0, 1] unless every tensor is
  // empty.
  double FillRatio() const;
  // chunks()[chunk].used / capacity(). REQUIRES: 0 <= chunk < num_chunks().
  double ChunkFill(int chunk) const;

  // One line per chunk ("chunk 3: 1234/2048 elements (60.3%), tensors h.2.ln_1.w .. h.2.mlp.b"),
  // for logs and benches.
  std::string DebugString() const;

 private:
  int64_t capacity_ = 0;
  int num_groups_ = 0;
  std::vector<Placement> tensors_;
  std::vector<Chunk> chunks_;
  absl::flat_hash_map<std::string, int> index_;  // name -> index into tensors_
};

// Elements a group spans when placed at a chunk offset that is a multiple of kChunkAlignElements:
// from its first tensor's start to its last tensor's end. The same wherever it is placed.
int64_t GroupSpan(const ChunkGroup& group);

struct ChunkSizeSearchOptions {
  // Candidate capacities, in elements. Exactly one way of giving them:
  //  * `candidates`: an explicit list (each a positive multiple of kChunkAlignElements), or
  //  * `min_capacity`, `max_capacity`, `step` (all multiples of kChunkAlignElements, step > 0):
  //    min, min + step, ... <= max, or
  //  * neither: the default grid. It runs from the smallest capacity that can hold the largest
  //    group (the largest tensor with split_oversize_groups) up to the smaller of half the packed
  //    model (below that, every chunk must be resident for a whole iteration anyway, so chunking
  //    buys nothing) and the largest capacity the budget allows, in `default_grid_steps` equal
  //    steps rounded up to kChunkAlignElements. With `tighten` (below) a coarse grid is enough:
  //    each grid point is shrunk to the best capacity giving the same layout.
  std::vector<int64_t> candidates;
  int64_t min_capacity = 0;
  int64_t max_capacity = 0;
  int64_t step = 0;
  int default_grid_steps = 16;

  // The working-set constraint (PatrickStar §3.8 (a)): at least `min_resident_chunks` chunks must
  // fit in `resident_budget_bytes` at once, each costing capacity * bytes_per_element bytes
  // (4 for a float32 chunk; 14 if every parameter element drags its fp16 copy, fp32 master and
  // two Adam moments along, as PatrickStar counts).
  int64_t resident_budget_bytes = 0;
  int min_resident_chunks = 2;
  int64_t bytes_per_element = 4;

  // Shrink each candidate to its layout's fullest chunk (rounded up to kChunkAlignElements). The
  // greedy packing is then exactly the same (every group that fitted still fits, every group that
  // did not fit still does not), so the fill ratio can only rise and the budget still holds.
  bool tighten = true;

  ChunkLayoutOptions layout;
};

// One row of the search's table.
struct ChunkSizeCandidate {
  int64_t capacity = 0;        // as given / generated
  bool valid = false;
  std::string invalid_reason;  // empty when valid
  // Filled when the layout could be built (even if the budget rules the candidate out):
  int num_chunks = 0;
  double fill_ratio = 0;        // at `capacity`
  int64_t tight_capacity = 0;   // fullest chunk rounded up to kChunkAlignElements
  double tight_fill_ratio = 0;  // at `tight_capacity` (same layout)
};

struct ChunkSizeSearchResult {
  int64_t capacity = 0;  // the chosen capacity (tight_capacity of the winner when tightening)
  ChunkLayout layout;    // the layout at `capacity`
  int chosen = 0;        // index of the winning row in `candidates`
  std::vector<ChunkSizeCandidate> candidates;  // ascending capacity
};

// Builds the layout for every candidate and returns the valid one with the best fill ratio (least
// waste; compared exactly, as fractions), ties to the smaller capacity. Every candidate is reported
// with its chunk count and fill ratio, so a bench can print the table.
// Errors: kInvalidArgument for bad options (naming the field) or bad groups (as
// ChunkLayout::Build); kResourceExhausted when no candidate is valid, naming the budget constraint
// and the largest group.
absl::StatusOr<ChunkSizeSearchResult> SearchChunkSize(const std::vector<ChunkGroup>& groups,
                                                      const ChunkSizeSearchOptions& options);

// The search's table, one row per candidate plus a header, the winner marked; for logs and benches.
std::string FormatChunkSizeTable(const ChunkSizeSearchResult& result);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_CHUNK_LAYOUT_H_
