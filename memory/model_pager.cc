#include "memory/model_pager.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/process_memory.h"
#include "memory/eviction.h"

namespace shoal::memory {
namespace {

// Chunk capacities are multiples of this many elements: whole pages (so a chunk's home can be
// released and protected on its own) and whole gradient-norm blocks (so a chunk's block sums are
// the buffer's).
constexpr int64_t kCapacityQuantum = kNormBlockElements;
static_assert(kNormBlockElements * 4 % 4096 == 0, "a block must be whole pages");


// Bytes of budget per element of chunk capacity that the smallest working set needs when a piece
// spans `k` chunks: its k parameter and k gradient chunks pinned during backward, the next
// piece's first parameter and gradient chunks prefetched (4 bytes per element each), and 2
// chunks of AdamW moments (8 bytes per element each).
int64_t WorkingSetBytesPerElement(int k) { return 4 * (2 * k + 2) + 2 * 8; }

int64_t RoundUp(int64_t v, int64_t q) { return (v + q - 1) / q * q; }

// Farthest-next-use over `trace` repeated twice from empty at `capacity` chunks: the second
// repetition is the steady state every plan figure is about.
absl::StatusOr<SimulationResult> SimulateTwoSteps(const std::vector<int>& trace,
                                                          int capacity) {
  SHOAL_ASSIGN_OR_RETURN(NextUseTable table, NextUseTable::Build(trace));
  FarthestNextUsePolicy policy(&table);
  SimulationOptions so;
  so.capacity_chunks = capacity;
  so.iterations = 2;
  return SimulateTrace(trace, so, policy);
}

// Loads (zero fills included) in the simulation's second step.
int64_t SecondStepLoads(const SimulationResult& sim, size_t trace_length) {
  int64_t loads = 0;
  for (const SimulationEvent& e : sim.events) {
    loads += e.moment >= static_cast<int64_t>(trace_length);
  }
  return loads;
}

std::string MiB(int64_t bytes) {
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / (1 << 20));
}

}  // namespace

ModelPager::ModelPager(ModelPagerOptions options)
    : options_(std::move(options)),
      depth_(options_.prefetch_depth > 0 ? options_.prefetch_depth : 4) {}

ModelPager::~ModelPager() = default;

ChunkLayout ModelPager::Layout(const std::vector<ChunkGroup>& groups) {
  TORCH_CHECK(!groups.empty(), "model pager: no tensors to page");
  int64_t largest_group = 0, largest_tensor = 0, total = 0;
  for (const ChunkGroup& g : groups) {
    const int64_t span = GroupSpan(g);
    total += span;
    largest_group = std::max(largest_group, span);
    for (const ChunkTensor& t : g) largest_tensor = std::max(largest_tensor, t.numel);
  }
  const int64_t budget = options_.budget_bytes;
  // Candidates: from chunks that hold the largest tensor (a piece then spans several chunks:
  // PatrickStar's rule bent as ProTrain does for large blocks) up to what the budget allows (at
  // most half the model, beyond which chunking buys nothing), about 48 of them, plus the span of
  // the largest piece (one chunk per piece).
  const int64_t smallest = RoundUp(largest_tensor, kCapacityQuantum);
  const int64_t largest = std::max(
      smallest, std::min(budget / WorkingSetBytesPerElement(1) / kCapacityQuantum *
                             kCapacityQuantum,
                         RoundUp(std::max(total / 2, largest_group), kCapacityQuantum)));
  std::vector<int64_t> candidates = {RoundUp(largest_group, kCapacityQuantum)};
  const int64_t step =
      std::max<int64_t>(kCapacityQuantum, RoundUp((largest - smallest) / 48, kCapacityQuantum));
  for (int64_t c = smallest; c <= largest; c += step) candidates.push_back(c);
  ChunkLayoutOptions lo;
  lo.split_oversize_groups = true;
  std::optional<ChunkLayout> best;
  int best_span = 0;
  int64_t need_smallest = 0;  // the least working set of any candidate, for the error
  for (int64_t capacity : candidates) {
    absl::StatusOr<ChunkLayout> layout = ChunkLayout::Build(groups, capacity, lo);
    if (!layout.ok()) continue;
    // Chunks the widest piece spans.
    std::vector<std::pair<int, int>> range(groups.size(), {INT32_MAX, -1});
    for (const ChunkLayout::Placement& t : layout->tensors()) {
      range[t.group].first = std::min(range[t.group].first, t.chunk);
      range[t.group].second = std::max(range[t.group].second, t.chunk);
    }
    int span = 1;
    for (const auto& [lo_chunk, hi_chunk] : range) span = std::max(span, hi_chunk - lo_chunk + 1);
    const int64_t need = WorkingSetBytesPerElement(span) * capacity;
    if (need_smallest == 0 || need < need_smallest) need_smallest = need;
    if (need > budget) continue;
    // The least waste; ties to the larger capacity (fewer, larger transfers).
    if (!best || layout->FillRatio() > best->FillRatio() ||
        (layout->FillRatio() == best->FillRatio() && capacity > best->capacity())) {
      best = *std::move(layout);
      best_span = span;
    }
  }
  TORCH_CHECK(best.has_value(), "memory.host_budget leaves ", budget,
              " bytes for the paged states, but the smallest working set of any chunk size is ",
              need_smallest, " bytes (the chunks of the widest piece pinned, the next one "
              "prefetched, two chunks of AdamW moments; chunks hold at least the largest tensor, ",
              largest_tensor, " elements); raise memory.host_budget by ",
              need_smallest - budget, " bytes");
  capacity_ = best->capacity();
  num_chunks_ = best->num_chunks();
  fill_ratio_ = best->FillRatio();
  piece_span_ = best_span;
  // The split: a quarter to the moments (at least their 2 chunks), in whole moment chunks; the
  // parameters and gradients the rest (at least their pinned and prefetched chunks).
  const int64_t moment_chunk = 8 * capacity_;
  moment_budget_ = std::max(2 * moment_chunk, budget / 4 / moment_chunk * moment_chunk);
  moment_budget_ = std::min(moment_budget_, num_chunks_ * moment_chunk);
  paged_budget_ = std::min(budget - moment_budget_, 2 * num_chunks_ * 4 * capacity_);
  return *std::move(best);
}

void ModelPager::Attach(FlatBuffer* params, FlatBuffer* grads,
                        std::vector<std::vector<int>> piece_entries) {
  TORCH_CHECK(capacity_ > 0, "model pager: Attach before Layout");
  TORCH_CHECK(params->mapped() && grads->mapped() &&
                  params->numel() == num_chunks_ * capacity_ && grads->numel() == params->numel(),
              "model pager: the buffers are not the mapped chunk layout");
  params_ = params;
  grads_ = grads;
  params_storage_ = params->flat();
  grads_storage_ = grads->flat();
  piece_chunks_.assign(piece_entries.size(), {});
  users_.assign(num_chunks_, 0);
  for (size_t p = 0; p < piece_entries.size(); ++p) {
    std::vector<int>& chunks = piece_chunks_[p];
    for (int e : piece_entries[p]) {
      chunks.push_back(static_cast<int>(params->entries().at(e).offset / capacity_));
    }
    std::sort(chunks.begin(), chunks.end());
    chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
    for (int c : chunks) ++users_[c];
  }
  remaining_ = users_;
  block_sums_.assign(num_chunks_ * capacity_ / kNormBlockElements, 0.0);

  const std::string dir = options_.disk_directory + "/paged";
  const absl::Status made = MakeDirs(dir);
  TORCH_CHECK(made.ok(), "memory.disk_path: ", made.ToString());
  TieredChunkStoreOptions o;
  o.num_chunks = 2 * num_chunks_;
  o.chunk_bytes = capacity_ * static_cast<int64_t>(sizeof(float));
  o.host_budget_bytes = paged_budget_;
  o.disk_directory = dir;
  o.disk_budget_bytes = options_.disk_budget_bytes;
  o.disk_worker = options_.worker;
  o.disk_backend = options_.disk_backend;
  o.allocation_observer = options_.allocation_observer;
  for (int c = 0; c < num_chunks_; ++c) {
    o.homes.push_back(params->flat().data_ptr<float>() + c * capacity_);
  }
  for (int c = 0; c < num_chunks_; ++c) {
    o.homes.push_back(grads->flat().data_ptr<float>() + c * capacity_);
  }
  absl::StatusOr<std::unique_ptr<TieredChunkStore>> store =
      TieredChunkStore::Create(o);
  TORCH_CHECK(store.ok(), "model pager: ", store.status().ToString());
  store_ = std::move(*store);
}

void ModelPager::AcquireChunk(int id) {
  read_chunk_ = -1;  // the chunk may change from now on
  if (steps_begun_ == 1) {
    if (!warmup_started_) {
      warmup_started_ = true;
      warmup_start_ = std::chrono::steady_clock::now();
      warmup_stats_ = store_->stats();
      if (moment_store_ != nullptr) warmup_moments_ = moment_store_->stats();
      last_recorded_.assign(2 * num_chunks_, -1);
    }
    last_recorded_[id] = static_cast<int64_t>(recording_.size());
    recording_.push_back(id);
    recording_dirty_.push_back(0);
    recording_discard_.push_back(0);
  }
  absl::StatusOr<float*> got = store_->Acquire(id);
  TORCH_CHECK(got.ok(), "model pager: ", got.status().ToString());
  if (steps_begun_ == 1) SampleWarmup();
  if (trace_.empty()) return;
  // Where this access is in the trace: the next position of `id` from where the last one left
  // off (an access outside the step's pattern, such as an evaluation, resynchronises).
  const std::vector<int64_t>& at = positions_[id];
  if (at.empty()) return;
  auto it = std::lower_bound(at.begin(), at.end(), next_);
  const int64_t pos = it != at.end() ? *it : at.front();
  next_ = (pos + 1) % static_cast<int64_t>(trace_.size());
  PrefetchAhead();
}

void ModelPager::PrefetchAhead() {
  const int64_t n = static_cast<int64_t>(trace_.size());
  for (int k = 0; k < depth_ && k < n; ++k) {
    const int id = trace_[(next_ + k) % n];
    const absl::Status hinted = store_->Prefetch(id);
    TORCH_CHECK(hinted.ok(), "model pager: ", hinted.ToString());
  }
}

void ModelPager::ReleaseChunk(int id, bool dirty) {
  const absl::Status released = store_->Release(id, dirty);
  TORCH_CHECK(released.ok(), "model pager: ", released.ToString());
  if (steps_begun_ == 1 && warmup_started_ && last_recorded_[id] >= 0) {
    recording_dirty_[last_recorded_[id]] |= dirty;
    SampleWarmup();
  }
}

void ModelPager::SampleWarmup() {
  int64_t chunks = store_->stats().resident_bytes;
  if (moment_store_ != nullptr) chunks += moment_store_->stats().resident_bytes;
  non_chunk_peak_ = std::max(non_chunk_peak_, ResidentBytes() - chunks);
}

ModelPager::Transfers ModelPager::SimulatedTransfers(const SimulationResult& sim) const {
  // Replays the simulated two steps of the trace, tracking which chunks are dirty and which have
  // a disk copy: in the second step, a dirty chunk evicted is a write-back and a chunk loaded from
  // its disk copy a read (the rest are zero fills). Parameters are on disk from the start;
  // gradients start every step discarded (ZeroGrads).
  Transfers out;
  const int64_t n = static_cast<int64_t>(trace_.size());
  std::vector<char> dirty(2 * num_chunks_, 0), on_disk(2 * num_chunks_, 0);
  std::fill(on_disk.begin(), on_disk.begin() + num_chunks_, 1);
  size_t e = 0;
  for (int64_t t = 0; t < 2 * n; ++t) {
    if (t % n == 0) {
      std::fill(dirty.begin() + num_chunks_, dirty.end(), 0);
      std::fill(on_disk.begin() + num_chunks_, on_disk.end(), 0);
    }
    for (; e < sim.events.size() && sim.events[e].moment == t; ++e) {
      const SimulationEvent& ev = sim.events[e];
      if (ev.evicted >= 0 && dirty[ev.evicted]) {
        out.write_backs += t >= n;
        dirty[ev.evicted] = 0;
        on_disk[ev.evicted] = 1;
      }
      out.reads += t >= n && on_disk[ev.loaded];
    }
    const int64_t pos = t % n;
    if (recording_dirty_[pos]) dirty[trace_[pos]] = 1;
    if (recording_discard_[pos]) {
      dirty[trace_[pos]] = 0;
      on_disk[trace_[pos]] = 0;
    }
  }
  return out;
}

void ModelPager::PlanFromWarmup(const Transfers& transfers) {
  const bool refine = plan_.has_value();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - warmup_start_).count();
  const TieredChunkStoreStats st = store_->stats();
  double waited = st.acquire_wait_seconds - warmup_stats_.acquire_wait_seconds;
  int64_t moved = st.bytes_read - warmup_stats_.bytes_read + st.bytes_written -
                  warmup_stats_.bytes_written;
  const int64_t chunk_bytes = capacity_ * static_cast<int64_t>(sizeof(float));
  if (moment_store_ != nullptr) {
    const TieredChunkStoreStats ms = moment_store_->stats();
    waited += ms.acquire_wait_seconds - warmup_moments_.acquire_wait_seconds;
    moved += ms.bytes_read - warmup_moments_.bytes_read + ms.bytes_written -
             warmup_moments_.bytes_written;
  }
  profile_.compute_seconds = std::max(0.0, elapsed - waited);
  if (refine) {
    // The first traced step: its compute, without the warm-up's first touches and allocations,
    // is the steady state's. The bandwidth and memory stay the warm-up's (this step's waits are
    // what prefetch did not hide, no measure of the disk).
    absl::StatusOr<MemoryPlanEstimate> plan = PlanFromProfile(profile_);
    if (!plan.ok()) return;
    plan_ = *plan;
    if (options_.prefetch_depth <= 0) depth_ = plan_->prefetch_depth;
    SHOAL_LOG(Info) << absl::StrFormat(
        "memory plan refined from the first traced step: compute %.3f s -> %s",
        profile_.compute_seconds, plan_->Describe());
    return;
  }
  int64_t moment_loads = 0;
  if (moment_store_ != nullptr) {
    // The optimizer sweeps its chunks once per step; every one it loads is dirty when evicted.
    // In parameter-chunk units (a moment chunk holds m and v: twice the bytes).
    std::vector<int> sweep(moment_store_->num_chunks());
    for (size_t c = 0; c < sweep.size(); ++c) sweep[c] = static_cast<int>(c);
    absl::StatusOr<SimulationResult> sim =
        SimulateTwoSteps(sweep, moment_store_->capacity_chunks());
    if (sim.ok()) moment_loads = SecondStepLoads(*sim, sweep.size());
  }
  profile_.accesses = static_cast<int64_t>(trace_.size());
  profile_.chunk_bytes = chunk_bytes;
  profile_.loads_per_step = transfers.reads + 2 * moment_loads;
  profile_.write_backs_per_step = transfers.write_backs + 2 * moment_loads;
  profile_.capacity_chunks = store_->capacity_chunks();
  profile_.pinned_chunks = std::min(2 * piece_span_, profile_.capacity_chunks);
  profile_.chunk_budget_bytes = paged_budget_ + moment_budget_;
  profile_.non_chunk_peak_bytes = non_chunk_peak_;
  if (moved <= 0 || waited <= 0) {
    SHOAL_LOG(Info) << "memory plan: the warm-up step moved too little chunk data to time the "
                       "disk; prefetch depth stays "
                    << depth_;
    return;
  }
  // What the warm-up waited for: demand loads and the write-backs they queued behind, so an
  // effective bandwidth of the disk tier as training uses it, for reads and writes alike.
  profile_.read_bytes_per_s = moved / waited;
  profile_.write_bytes_per_s = profile_.read_bytes_per_s;
  absl::StatusOr<MemoryPlanEstimate> plan = PlanFromProfile(profile_);
  if (!plan.ok()) {
    SHOAL_LOG(Warning) << "memory plan: " << plan.status().message();
    return;
  }
  plan_ = *plan;
  if (options_.prefetch_depth <= 0) depth_ = plan_->prefetch_depth;
  SHOAL_LOG(Info) << absl::StrFormat(
      "memory plan from the warm-up step: compute %.3f s over %d chunk accesses, disk %.0f MB/s "
      "as waited for, memory outside chunks up to %s; per step %d loads and %d write-backs "
      "(chunk-sized) -> %s%s",
      profile_.compute_seconds, profile_.accesses, profile_.read_bytes_per_s / 1e6,
      MiB(non_chunk_peak_), profile_.loads_per_step, profile_.write_backs_per_step,
      plan_->Describe(),
      options_.prefetch_depth > 0 ? absl::StrCat(" (prefetch depth fixed at ", depth_, ")") : "");
}

void ModelPager::Begin(int piece, Pass pass) {
  for (int c : piece_chunks_.at(piece)) {
    AcquireChunk(c);
    if (pass == Pass::kBackward) AcquireChunk(num_chunks_ + c);
  }
}

void ModelPager::End(int piece, Pass pass) {
  std::vector<int> final_chunks;
  for (int c : piece_chunks_.at(piece)) {
    ReleaseChunk(c, pass == Pass::kWrite);
    if (pass != Pass::kBackward) continue;
    if (last_micro_batch_ && --remaining_[c] == 0) {
      SumSquaresOf(c);
      final_chunks.push_back(c);
    }
    ReleaseChunk(num_chunks_ + c, /*dirty=*/true);
  }
  if (on_final_) {
    for (int c : final_chunks) on_final_(c);
  }
}

void ModelPager::SumSquaresOf(int chunk) {
  // Resident: the caller still holds the chunk's gradients.
  const float* g = grads_storage_.data_ptr<float>() + chunk * capacity_;
  const int64_t blocks = capacity_ / kNormBlockElements;
  double* out = block_sums_.data() + chunk * blocks;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      out[b] = BlockSumSquares(g + b * kNormBlockElements,
                                         kNormBlockElements);
    }
  });
}

double ModelPager::DecayGradSumSquares() const {
  double total = 0;
  for (double s : block_sums_) total += s;  // in buffer order, as GlobalSumSquares adds them
  return total;
}

void ModelPager::ZeroGrads() {
  for (int c = 0; c < num_chunks_; ++c) {
    const absl::Status dropped = store_->Discard(num_chunks_ + c);
    TORCH_CHECK(dropped.ok(), "model pager: ", dropped.ToString());
  }
}

void ModelPager::BeginStep() {
  const auto now = std::chrono::steady_clock::now();
  if (steps_begun_ >= 2) {
    steady_seconds_ += std::chrono::duration<double>(now - last_step_begin_).count();
    ++steady_steps_;
  }
  last_step_begin_ = now;
  ++steps_begun_;
  if (steps_begun_ == 3 && plan_.has_value()) PlanFromWarmup({});  // refined by step 2
  if (steps_begun_ != 2 || recording_.empty()) return;
  // The warm-up step is over: its accesses are every later step's.
  const absl::Status traced = store_->SetTrace(recording_);
  TORCH_CHECK(traced.ok(), "model pager: ", traced.ToString());
  trace_ = std::move(recording_);
  loads_at_trace_ = store_->stats().loads + store_->stats().zero_fills;
  positions_.assign(2 * num_chunks_, {});
  for (size_t t = 0; t < trace_.size(); ++t) {
    positions_[trace_[t]].push_back(static_cast<int64_t>(t));
  }
  next_ = 0;
  // The plan's cost: farthest-next-use over this trace, in steady state (the second of two
  // simulated steps), with the store's capacity.
  absl::StatusOr<SimulationResult> sim =
      SimulateTwoSteps(trace_, store_->capacity_chunks());
  if (!sim.ok()) return;
  predicted_loads_per_step_ = SecondStepLoads(*sim, trace_.size());
  SHOAL_LOG(Info) << absl::StrFormat(
      "model pager: warm-up step traced (%d chunk accesses); with %d of %d chunks in RAM, "
      "farthest-next-use over the trace predicts %d loads or zero fills per step (up to %s "
      "read); eviction and prefetch follow the trace from now on",
      trace_.size(), store_->capacity_chunks(), 2 * num_chunks_, predicted_loads_per_step_,
      MiB(predicted_loads_per_step_ * capacity_ * static_cast<int64_t>(sizeof(float))));
  PlanFromWarmup(SimulatedTransfers(*sim));
  // Step 2's own measurements start here, for the refinement when step 3 begins.
  warmup_start_ = std::chrono::steady_clock::now();
  warmup_stats_ = store_->stats();
  if (moment_store_ != nullptr) warmup_moments_ = moment_store_->stats();
}

double ModelPager::measured_loads_per_step() const {
  // Steps since the trace was installed: those begun after it, the last one ended or ending.
  const int steps = steps_begun_ - 1;
  if (trace_.empty() || steps < 1) return -1;
  const TieredChunkStoreStats st = store_->stats();
  return static_cast<double>(st.loads + st.zero_fills - loads_at_trace_) / steps;
}

absl::Status ModelPager::ReadParams(int64_t first, int64_t count, float* out) {
  if (first < 0 || count < 0 || first + count > num_chunks_ * capacity_) {
    return absl::OutOfRangeError(absl::StrCat("model pager: parameters [", first, ", ",
                                              first + count, ") are outside the ",
                                              num_chunks_ * capacity_, " paged elements"));
  }
  // A checkpoint reads between steps, when the contents are final; any acquisition (a step, a
  // load of parameters) drops the buffered chunk, so it is never stale.
  while (count > 0) {
    const int c = static_cast<int>(first / capacity_);
    if (c != read_chunk_) {
      read_buffer_.resize(capacity_);
      SHOAL_RETURN_IF_ERROR(store_->Read(c, absl::MakeSpan(read_buffer_)));
      read_chunk_ = c;
    }
    const int64_t at = first - c * capacity_;
    const int64_t n = std::min(count, capacity_ - at);
    std::memcpy(out, read_buffer_.data() + at, n * sizeof(float));
    out += n;
    first += n;
    count -= n;
  }
  return absl::OkStatus();
}

void ModelPager::BeginMicroBatch(bool last) {
  last_micro_batch_ = last;
  if (last) remaining_ = users_;
}

int ModelPager::ParamChunk(int64_t begin) const {
  TORCH_CHECK(begin % capacity_ == 0 && begin / capacity_ < num_chunks_,
              "model pager: range at ", begin, " is not a chunk of ", capacity_, " elements");
  return static_cast<int>(begin / capacity_);
}

void ModelPager::Prefetch(int group, int64_t begin, int64_t count) {
  (void)count;
  if (!Paged(group)) return;
  const int c = ParamChunk(begin);
  for (int id : {c, num_chunks_ + c}) {
    const absl::Status hinted = store_->Prefetch(id);
    TORCH_CHECK(hinted.ok(), "model pager: ", hinted.ToString());
  }
}

void ModelPager::Acquire(int group, int64_t begin, int64_t count) {
  (void)count;
  TORCH_CHECK(Paged(group), "model pager: group ", group, " is not paged");
  const int c = ParamChunk(begin);
  AcquireChunk(c);
  AcquireChunk(num_chunks_ + c);
}

void ModelPager::Release(int group, int64_t begin, int64_t count) {
  (void)count;
  TORCH_CHECK(Paged(group), "model pager: group ", group, " is not paged");
  const int c = ParamChunk(begin);
  ReleaseChunk(c, /*dirty=*/true);
  // Consumed: the next ZeroGrad would zero them anyway, so they are never written back.
  ReleaseChunk(num_chunks_ + c, /*dirty=*/false);
  const absl::Status dropped = store_->Discard(num_chunks_ + c);
  TORCH_CHECK(dropped.ok(), "model pager: ", dropped.ToString());
  if (steps_begun_ == 1 && warmup_started_ && last_recorded_[num_chunks_ + c] >= 0) {
    recording_discard_[last_recorded_[num_chunks_ + c]] = 1;
  }
}

std::string ModelPager::Describe() const {
  const int64_t chunk_bytes = capacity_ * static_cast<int64_t>(sizeof(float));
  return absl::StrFormat(
      "paged states: the 2-D weights' parameters and gradients in 2 x %d chunks of %s (fill "
      "%.1f%%, a piece spans up to %d), up to %d of them in RAM (%s), AdamW moments up to %d of "
      "%d chunks in RAM (%s); the rest on disk under %s/paged; %s",
      num_chunks_, MiB(chunk_bytes), 100 * fill_ratio_, piece_span_,
      static_cast<int>(paged_budget_ / chunk_bytes), MiB(paged_budget_),
      static_cast<int>(moment_budget_ / (2 * chunk_bytes)), num_chunks_, MiB(moment_budget_),
      options_.disk_directory,
      trace_.empty() ? "eviction by lowest id until the warm-up step's trace is recorded"
                     : "farthest-next-use eviction and prefetch from the warm-up trace");
}

}  // namespace shoal::memory
