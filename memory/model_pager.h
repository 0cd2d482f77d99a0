// ModelPager: the chunk manager for a model whose states do not fit the host budget (issue 7;
// ALGORITHMS.md §3, §4). The decay group (every 2-D weight and the embeddings: nearly all of the
// parameters) is laid out in equal chunks, one group of tensors per piece, in first-use order
// (SearchChunkSize picks the capacity with the best fill ratio). Its parameters and gradients live
// in one TieredChunkStore in fixed-home mode: a chunk is resident at its own address in
// the model's mapped flat buffers, so every parameter stays a view at a fixed offset, or it is on
// the disk tier and its pages are released and protected. Chunk ids: parameters 0..n-1, their
// gradients n..2n-1. The AdamW moments of the same ranges go through the optimizer's own store
// (MomentOffload with `residency` = this pager), chunk for chunk.
//
// The model calls Begin/End around every piece's pass: Begin acquires the piece's parameter
// chunk (and, for backward, its gradient chunk), End releases them (parameters dirty when
// written, gradients dirty after backward). The first step is the warm-up: its sequence of
// acquisitions (forward, backward and the optimizer's sweep) is recorded and becomes the store's
// trace from the second step on, which drives farthest-next-use eviction and the prefetch of the
// next `prefetch_depth` chunks of the trace on the store's I/O threads while the current piece
// computes. Gradients consumed by the optimizer are discarded (no write-back of data about to be
// zeroed), and ZeroGrad discards them all.
//
// The global gradient norm needs every gradient, but they are never all in RAM: during the last
// micro-batch's backward, once a chunk's gradients are final (the last piece using it has run),
// its kNormBlockElements-element block sums are taken while it is resident; the sum over the
// blocks in order is then exactly what parallel::GlobalL2Norm computes over the buffer.
//
// Chunk size and budget split (within `budget_bytes` for the decay group's states): a chunk
// holds at least the largest tensor; a piece larger than a chunk spans several (ProTrain's large
// blocks), all resident while it runs. A capacity is valid when the budget holds the working set:
// the widest piece's k parameter and k gradient chunks pinned, the next piece's prefetched, and 2
// moment chunks (m and v: 8 bytes per element), i.e. (8k + 24) bytes per element of capacity;
// among valid ones the best fill ratio wins. The moments then get a quarter of the budget (at
// least their 2 chunks), the parameters and gradients the rest, since they are used three and
// two times per step against the moments' once.
//
// Not thread-safe: one caller thread (the trainer's); I/O runs on the store's threads.
#ifndef SHOAL_MEMORY_MODEL_PAGER_H_
#define SHOAL_MEMORY_MODEL_PAGER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include "memory/chunk_layout.h"
#include "memory/cost_model.h"
#include "memory/disk_tier.h"
#include "memory/tiered_store.h"
#include "memory/flat_buffer.h"
#include "memory/state_paging.h"

namespace shoal::memory {

struct ModelPagerOptions {
  // For the decay group's parameters, gradients and AdamW moments together.
  int64_t budget_bytes = 0;
  std::string disk_directory;     // memory.disk_path; the store's file goes in <it>/paged
  int64_t disk_budget_bytes = 0;  // 0: what the slots need
  int worker = 0;                 // names the disk file
  // Chunks of the trace made resident ahead of use; 0: chosen by the memory plan from what the
  // warm-up step measured (memory/cost_model.h), 4 until then.
  int prefetch_depth = 0;
  DiskIoBackend disk_backend = DiskIoBackend::kAuto;
  // Called on the caller's thread for every chunk made resident (+bytes) or released (-bytes),
  // parameters and gradients alike: what a test or a memory profiler counts independently.
  std::function<void(int64_t delta_bytes)> allocation_observer;
};

class ModelPager final : public StatePager, public RangeResidency {
 public:
  // Nothing happens until the model calls Layout and Attach. Those throw c10::Error naming the
  // cause: a budget that cannot hold the chunks the largest piece needs (naming both), a disk
  // tier that cannot be made.
  explicit ModelPager(ModelPagerOptions options);
  ~ModelPager() override;

  // StatePager.
  ChunkLayout Layout(const std::vector<ChunkGroup>& groups) override;
  void Attach(FlatBuffer* params, FlatBuffer* grads,
              std::vector<std::vector<int>> piece_entries) override;
  void Begin(int piece, Pass pass) override;
  void End(int piece, Pass pass) override;
  void ZeroGrads() override;

  // RangeResidency (group 0: the decay group, the only one paged).
  bool Paged(int group) const override { return group == 0; }
  void Prefetch(int group, int64_t begin, int64_t count) override;
  void Acquire(int group, int64_t begin, int64_t count) override;
  void Release(int group, int64_t begin, int64_t count) override;

  // The trainer's step structure. BeginStep: a step starts (the second one installs the trace
  // recorded during the first). BeginMicroBatch: `last` is the step's last micro-batch, whose
  // backward finalises the gradients and takes their block sums.
  void BeginStep();
  void BeginMicroBatch(bool last);
  // Sum of squares of the decay gradients over kNormBlockElements-element blocks in buffer
  // order, as GlobalSumSquares would take it. Valid after the last micro-batch's backward.
  double DecayGradSumSquares() const;

  // After Layout.
  int64_t chunk_elements() const { return capacity_; }
  int num_chunks() const { return num_chunks_; }
  double fill_ratio() const { return fill_ratio_; }
  int64_t paged_budget_bytes() const { return paged_budget_; }   // parameters and gradients
  int64_t moment_budget_bytes() const { return moment_budget_; } // for the optimizer's store
  // After Attach.
  const TieredChunkStore& store() const { return *store_; }
  bool traced() const { return !trace_.empty(); }
  // From the warm-up trace (-1 before it): chunk loads (or zero fills) per steady-state step that
  // farthest-next-use needs with the store's capacity, by simulation.
  int64_t predicted_loads_per_step() const { return predicted_loads_per_step_; }
  // What the steps since the warm-up did (evaluations in between included), for comparison; -1
  // before the second step has ended.
  double measured_loads_per_step() const;
  // One line: the plan (chunks, fill, what stays resident, where the rest goes).
  std::string Describe() const;

  // Called once per step for each parameter chunk whose gradients the last micro-batch's
  // backward has just finalised (its block sums taken, the piece's pins released), while the
  // chunk is most likely still resident: an optimizer that steps the chunk there runs inside
  // backward and spares the reload of its parameters and gradients (the order allows it only
  // without clipping by the global norm, which needs every gradient first). Null: none.
  void SetOnGradientsFinal(std::function<void(int chunk)> on_final) {
    on_final_ = std::move(on_final);
  }

  // Copies elements [first, first + count) of the paged parameters into `out`, chunk by chunk
  // through the store (from RAM where resident, else from disk), without making anything
  // resident or touching the trace: what a checkpoint streams from. One chunk is buffered.
  // Not const: it keeps the buffered chunk, which any acquisition drops.
  absl::Status ReadParams(int64_t first, int64_t count, float* out);

  // The optimizer's moment store (not owned; null: none), whose resident chunks the warm-up's
  // "non-chunk memory" excludes and whose transfers the plan counts. Set once it exists.
  void SetMomentStore(const TieredChunkStore* store) { moment_store_ = store; }
  // The memory plan from the warm-up step's measurements (PlanFromProfile): set when the
  // second step begins; nullopt before, or if the warm-up measured no disk traffic to time.
  const std::optional<MemoryPlanEstimate>& plan() const { return plan_; }
  const WarmupProfile& warmup_profile() const { return profile_; }
  int prefetch_depth() const { return depth_; }
  // Mean wall time from one step's start to the next's, over the steps after the warm-up (what
  // the plan's step time predicts; evaluations in between included); -1 before there is one.
  double measured_step_seconds() const {
    return steady_steps_ > 0 ? steady_seconds_ / steady_steps_ : -1;
  }

 private:
  int ParamChunk(int64_t begin) const;
  void AcquireChunk(int id);
  void ReleaseChunk(int id, bool dirty);
  void PrefetchAhead();
  void SumSquaresOf(int chunk);
  // Warm-up profiling: the memory outside chunks at this moment, and the plan at its end.
  void SampleWarmup();
  struct Transfers {
    int64_t reads = 0;        // chunk loads from disk per steady-state step
    int64_t write_backs = 0;  // dirty chunks written to disk per steady-state step
  };
  Transfers SimulatedTransfers(const SimulationResult& sim) const;
  // `transfers`: the simulated steady state's (the first plan only; a refinement keeps them).
  void PlanFromWarmup(const Transfers& transfers);

  ModelPagerOptions options_;
  int64_t capacity_ = 0;
  int num_chunks_ = 0;
  double fill_ratio_ = 0;
  int piece_span_ = 1;  // chunks the widest piece spans
  int64_t paged_budget_ = 0;
  int64_t moment_budget_ = 0;
  FlatBuffer* params_ = nullptr;
  FlatBuffer* grads_ = nullptr;
  // The buffers' storage, held so that the mappings outlive the store (which touches its homes
  // until it is destroyed) whichever of the model and the pager goes first.
  at::Tensor params_storage_, grads_storage_;
  std::unique_ptr<TieredChunkStore> store_;
  std::vector<std::vector<int>> piece_chunks_;  // per piece: its parameter chunks, ascending
  std::vector<int> users_;                      // per chunk: the pieces using it
  std::vector<int> remaining_;                  // last micro-batch: users whose backward is to run
  bool last_micro_batch_ = true;
  std::vector<double> block_sums_;              // per kNormBlockElements block of the gradients

  // Warm-up and trace.
  int steps_begun_ = 0;
  std::vector<int> recording_;
  std::vector<int> trace_;
  std::vector<std::vector<int64_t>> positions_;  // chunk -> its positions in trace_
  int64_t next_ = 0;                             // trace position after the latest acquisition
  int64_t predicted_loads_per_step_ = -1;
  int64_t loads_at_trace_ = 0;  // the store's loads and zero fills when the trace was installed
  int depth_ = 4;               // prefetch depth in use

  // The warm-up's measurements: per recorded access, whether its release dirtied the chunk or
  // discarded it (for the write-backs the plan predicts), time and waits at its start.
  std::vector<char> recording_dirty_, recording_discard_;
  std::vector<int64_t> last_recorded_;  // chunk -> its latest position in recording_
  bool warmup_started_ = false;
  std::chrono::steady_clock::time_point warmup_start_;
  TieredChunkStoreStats warmup_stats_;   // the store's stats when the warm-up began
  TieredChunkStoreStats warmup_moments_; // the moment store's
  int64_t non_chunk_peak_ = 0;
  const TieredChunkStore* moment_store_ = nullptr;
  std::function<void(int)> on_final_;
  int read_chunk_ = -1;             // the chunk in read_buffer_ (ReadParams), -1: none
  std::vector<float> read_buffer_;
  WarmupProfile profile_;
  std::optional<MemoryPlanEstimate> plan_;
  std::chrono::steady_clock::time_point last_step_begin_;
  double steady_seconds_ = 0;
  int steady_steps_ = 0;
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_MODEL_PAGER_H_
