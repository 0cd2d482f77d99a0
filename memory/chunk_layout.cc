#include "memory/chunk_layout.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace shoal::memory {
namespace {

int64_t RoundUp(int64_t n) {
  return (n + kChunkAlignElements - 1) / kChunkAlignElements * kChunkAlignElements;
}

// a_used / a_space < b_used / b_space, exactly. Products of two element counts overflow int64 for
// models of a few billion elements, so compare in 128 bits.
bool FillLess(int64_t a_used, int64_t a_space, int64_t b_used, int64_t b_space) {
  return static_cast<__int128>(a_used) * b_space < static_cast<__int128>(b_used) * a_space;
}

absl::Status CheckCapacity(int64_t capacity, absl::string_view what) {
  if (capacity <= 0 || capacity % kChunkAlignElements != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", capacity, " is not a positive multiple of ", kChunkAlignElements,
                     " elements (chunks placed back to back must keep 64-byte alignment)"));
  }
  return absl::OkStatus();
}

// The largest group's span, the largest tensor and the whole model packed into one unbounded
// chunk; names for error messages.
struct GroupStats {
  int64_t largest_group_span = 0;
  std::string largest_group_first;
  int64_t largest_tensor = 0;
  std::string largest_tensor_name;
  int64_t packed_total = 0;
};

GroupStats ComputeStats(const std::vector<ChunkGroup>& groups) {
  GroupStats s;
  for (const ChunkGroup& g : groups) {
    const int64_t span = GroupSpan(g);
    if (span > s.largest_group_span || s.largest_group_first.empty()) {
      s.largest_group_span = span;
      s.largest_group_first = g.empty() ? "" : g.front().name;
    }
    for (const ChunkTensor& t : g) {
      if (t.numel > s.largest_tensor || s.largest_tensor_name.empty()) {
        s.largest_tensor = t.numel;
        s.largest_tensor_name = t.name;
      }
    }
    s.packed_total = RoundUp(s.packed_total) + span;
  }
  return s;
}

}  // namespace

int64_t GroupSpan(const ChunkGroup& group) {
  int64_t end = 0;
  for (size_t i = 0; i < group.size(); ++i) {
    end = (i == 0 ? 0 : RoundUp(end)) + group[i].numel;
  }
  return end;
}

absl::StatusOr<ChunkLayout> ChunkLayout::Build(const std::vector<ChunkGroup>& groups,
                                               int64_t capacity,
                                               const ChunkLayoutOptions& options) {
  if (absl::Status s = CheckCapacity(capacity, "chunk capacity"); !s.ok()) return s;
  if (groups.empty()) return absl::InvalidArgumentError("chunk layout: no tensor groups given");

  ChunkLayout layout;
  layout.capacity_ = capacity;
  layout.num_groups_ = static_cast<int>(groups.size());
  absl::flat_hash_set<absl::string_view> names;

  // The current chunk is chunks_.back(). `closed` forbids appending to it: it belongs to a split
  // group, and the point of splitting is to give that group chunks of its own.
  bool closed = false;
  auto open_chunk = [&layout](bool split) {
    Chunk c;
    c.first_tensor = static_cast<int>(layout.tensors_.size());
    c.split_group = split;
    layout.chunks_.push_back(c);
  };
  auto place = [&layout](const ChunkTensor& t, int group, int64_t offset) {
    Chunk& c = layout.chunks_.back();
    layout.tensors_.push_back(
        Placement{t.name, group, static_cast<int>(layout.chunks_.size()) - 1, offset, t.numel});
    c.used = offset + t.numel;
    c.payload += t.numel;
    ++c.num_tensors;
  };

  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const ChunkGroup& group = groups[gi];
    if (group.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk layout: group ", gi, " is empty"));
    }
    for (const ChunkTensor& t : group) {
      if (t.numel < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk layout: tensor '", t.name, "' has negative numel ", t.numel));
      }
      if (!names.insert(t.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk layout: duplicate tensor name '", t.name, "'"));
      }
      if (t.numel > capacity) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk layout: tensor '", t.name, "' (", t.numel,
                         " elements) is larger than the chunk capacity of ", capacity,
                         " elements"));
      }
    }
    const int group_index = static_cast<int>(gi);
    const int64_t span = GroupSpan(group);

    if (span <= capacity) {
      // The whole group goes into the current chunk if it fits, else into a new one.
      int64_t start = 0;
      if (!layout.chunks_.empty() && !closed &&
          RoundUp(layout.chunks_.back().used) + span <= capacity) {
        start = RoundUp(layout.chunks_.back().used);
      } else {
        open_chunk(/*split=*/false);
      }
      closed = false;
      int64_t offset = start;
      for (const ChunkTensor& t : group) {
        place(t, group_index, offset);
        offset = RoundUp(offset + t.numel);
      }
      continue;
    }

    if (!options.split_oversize_groups) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk layout: group ", gi, " (first tensor '", group.front().name, "', ",
          group.size(), " tensors) spans ", span, " elements, more than the chunk capacity of ",
          capacity, " elements; a group must not straddle chunks (raise the capacity, split the "
          "group, or set split_oversize_groups)"));
    }
    // Oversize group: dedicated chunks, filled tensor by tensor. Every tensor fits one chunk
    // (checked above), so this terminates with each chunk holding at least one tensor.
    open_chunk(/*split=*/true);
    int64_t offset = 0;
    for (const ChunkTensor& t : group) {
      if (offset + t.numel > capacity) {
        open_chunk(/*split=*/true);
        offset = 0;
      }
      place(t, group_index, offset);
      offset = RoundUp(offset + t.numel);
    }
    closed = true;
  }

  layout.index_.reserve(layout.tensors_.size());
  for (size_t i = 0; i < layout.tensors_.size(); ++i) {
    layout.index_.emplace(layout.tensors_[i].name, static_cast<int>(i));
  }
  return layout;
}

int ChunkLayout::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

int64_t ChunkLayout::TotalUsed() const {
  int64_t total = 0;
  for (const Chunk& c : chunks_) total += c.used;
  return total;
}

double ChunkLayout::FillRatio() const {
  if (chunks_.empty()) return 0;
  return static_cast<double>(TotalUsed()) /
         (static_cast<double>(chunks_.size()) * static_cast<double>(capacity_));
}

double ChunkLayout::ChunkFill(int chunk) const {
  return static_cast<double>(chunks_.at(chunk).used) / static_cast<double>(capacity_);
}

std::string ChunkLayout::DebugString() const {
  std::string out = absl::StrFormat("%d chunks of %d elements, fill %.1f%%\n", num_chunks(),
                                    capacity_, 100.0 * FillRatio());
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const Chunk& c = chunks_[i];
    absl::StrAppendFormat(&out, "chunk %d: %d/%d elements (%.1f%%)%s, tensors %s .. %s\n", i,
                          c.used, capacity_, 100.0 * ChunkFill(static_cast<int>(i)),
                          c.split_group ? " [split group]" : "", tensors_[c.first_tensor].name,
                          tensors_[c.first_tensor + c.num_tensors - 1].name);
  }
  return out;
}

absl::StatusOr<ChunkSizeSearchResult> SearchChunkSize(const std::vector<ChunkGroup>& groups,
                                                      const ChunkSizeSearchOptions& options) {
  if (options.resident_budget_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk size search: resident_budget_bytes must be > 0, got ",
        options.resident_budget_bytes));
  }
  if (options.min_resident_chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk size search: min_resident_chunks must be >= 1, got ", options.min_resident_chunks));
  }
  if (options.bytes_per_element < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk size search: bytes_per_element must be >= 1, got ", options.bytes_per_element));
  }
  if (groups.empty()) return absl::InvalidArgumentError("chunk size search: no tensor groups given");

  // The budget constraint as a capacity bound: min_resident * capacity * bytes <= budget.
  const int64_t budget_capacity =
      options.resident_budget_bytes / (options.bytes_per_element * options.min_resident_chunks);
  const GroupStats stats = ComputeStats(groups);
  const bool split = options.layout.split_oversize_groups;

  // Bad groups (names, sizes, empty) are bad at every capacity: report them once, as such, rather
  // than as a table of invalid candidates. A capacity holding the whole model accepts any valid
  // input.
  {
    absl::StatusOr<ChunkLayout> whole = ChunkLayout::Build(
        groups, std::max(kChunkAlignElements, RoundUp(stats.packed_total)), options.layout);
    if (!whole.ok()) return whole.status();
  }

  std::vector<int64_t> caps;
  const bool has_range = options.step != 0 || options.min_capacity != 0 || options.max_capacity != 0;
  if (!options.candidates.empty() && has_range) {
    return absl::InvalidArgumentError(
        "chunk size search: give either candidates or min_capacity/max_capacity/step, not both");
  }
  if (!options.candidates.empty()) {
    for (int64_t c : options.candidates) {
      if (absl::Status s = CheckCapacity(c, "chunk size search: candidate"); !s.ok()) return s;
      caps.push_back(c);
    }
  } else if (has_range) {
    if (absl::Status s = CheckCapacity(options.min_capacity, "chunk size search: min_capacity");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckCapacity(options.step, "chunk size search: step"); !s.ok()) return s;
    if (options.max_capacity < options.min_capacity) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk size search: max_capacity ", options.max_capacity, " < min_capacity ",
          options.min_capacity));
    }
    for (int64_t c = options.min_capacity; c <= options.max_capacity; c += options.step) {
      caps.push_back(c);
    }
  } else {
    if (options.default_grid_steps < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk size search: default_grid_steps must be >= 1, got ", options.default_grid_steps));
    }
    const int64_t lo =
        std::max(kChunkAlignElements, RoundUp(split ? stats.largest_tensor : stats.largest_group_span));
    int64_t hi = RoundUp((stats.packed_total + 1) / 2);
    hi = std::min(hi, budget_capacity / kChunkAlignElements * kChunkAlignElements);
    hi = std::max(hi, lo);
    for (int i = 0; i <= options.default_grid_steps; ++i) {
      caps.push_back(RoundUp(lo + static_cast<int64_t>(static_cast<__int128>(hi - lo) * i /
                                                       options.default_grid_steps)));
    }
  }
  std::sort(caps.begin(), caps.end());
  caps.erase(std::unique(caps.begin(), caps.end()), caps.end());

  ChunkSizeSearchResult result;
  int best = -1;
  int64_t best_used = 0, best_space = 0, best_cap = 0;
  for (int64_t cap : caps) {
    ChunkSizeCandidate row;
    row.capacity = cap;
    absl::StatusOr<ChunkLayout> layout = ChunkLayout::Build(groups, cap, options.layout);
    if (!layout.ok()) {
      // The groups were validated above, so the only failure left is "does not fit".
      row.invalid_reason = std::string(layout.status().message());
      result.candidates.push_back(std::move(row));
      continue;
    }
    int64_t max_used = 0;
    for (const ChunkLayout::Chunk& c : layout->chunks()) max_used = std::max(max_used, c.used);
    row.num_chunks = layout->num_chunks();
    row.fill_ratio = layout->FillRatio();
    row.tight_capacity = std::max(kChunkAlignElements, RoundUp(max_used));
    row.tight_fill_ratio = static_cast<double>(layout->TotalUsed()) /
                           (static_cast<double>(row.num_chunks) * row.tight_capacity);
    if (cap > budget_capacity) {
      row.invalid_reason = absl::StrCat(
          options.min_resident_chunks, " chunks x ", cap, " elements x ",
          options.bytes_per_element, " B = ",
          static_cast<int64_t>(options.min_resident_chunks) * cap * options.bytes_per_element,
          " B exceed the resident budget of ", options.resident_budget_bytes, " B");
      result.candidates.push_back(std::move(row));
      continue;
    }
    row.valid = true;
    const int64_t eff_cap = options.tighten ? row.tight_capacity : cap;
    const int64_t used = layout->TotalUsed();
    const int64_t space = static_cast<int64_t>(row.num_chunks) * eff_cap;
    // Candidates arrive in ascending capacity, but tightening can map a larger grid point to a
    // smaller capacity: break ties on the effective capacity explicitly.
    if (best < 0 || FillLess(best_used, best_space, used, space) ||
        (!FillLess(used, space, best_used, best_space) && eff_cap < best_cap)) {
      best = static_cast<int>(result.candidates.size());
      best_used = used;
      best_space = space;
      best_cap = eff_cap;
    }
    result.candidates.push_back(std::move(row));
  }

  if (best < 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "chunk size search: no valid chunk size among ", caps.size(), " candidates (", caps.front(),
        " .. ", caps.back(), " elements): a chunk must hold the largest ",
        split ? absl::StrCat("tensor ('", stats.largest_tensor_name, "', ", stats.largest_tensor)
              : absl::StrCat("group (first tensor '", stats.largest_group_first, "', ",
                             stats.largest_group_span),
        " elements) and min_resident_chunks=", options.min_resident_chunks,
        " chunks x capacity x bytes_per_element=", options.bytes_per_element,
        " B must fit resident_budget_bytes=", options.resident_budget_bytes,
        " B (capacity at most ", budget_capacity, " elements)"));
  }
  result.chosen = best;
  result.capacity = best_cap;
  absl::StatusOr<ChunkLayout> layout = ChunkLayout::Build(groups, best_cap, options.layout);
  if (!layout.ok()) return layout.status();  // cannot happen: the tight capacity holds the layout
  result.layout = *std::move(layout);
  return result;
}

std::string FormatChunkSizeTable(const ChunkSizeSearchResult& result) {
  std::string out = absl::StrFormat("%14s %7s %7s %14s %7s  %s\n", "capacity", "chunks", "fill",
                                    "tight_capacity", "fill", "valid");
  for (size_t i = 0; i < result.candidates.size(); ++i) {
    const ChunkSizeCandidate& c = result.candidates[i];
    const std::string mark = static_cast<int>(i) == result.chosen ? "  <- chosen" : "";
    if (c.num_chunks == 0) {
      absl::StrAppendFormat(&out, "%14d %7s %7s %14s %7s  no: %s\n", c.capacity, "-", "-", "-", "-",
                            c.invalid_reason);
      continue;
    }
    absl::StrAppendFormat(&out, "%14d %7d %6.1f%% %14d %6.1f%%  %s%s\n", c.capacity, c.num_chunks,
                          100.0 * c.fill_ratio, c.tight_capacity, 100.0 * c.tight_fill_ratio,
                          c.valid ? "yes" : absl::StrCat("no: ", c.invalid_reason), mark);
  }
  return out;
}

}  // namespace shoal::memory
