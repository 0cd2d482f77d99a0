// TieredChunkStore: N equal-sized chunks of model state (for instance the AdamW moments of one
// range of parameters each), kept in host RAM up to a budget and on a DiskTier for the rest
// (ALGORITHMS.md §3.4–3.5, §4.2–4.3; issue 7). The chunk manager's host/disk half: a caller
// Acquire()s a chunk, updates it in place, Release()s it, and may Prefetch() the next one so that
// its read overlaps the update of the current one.
//
// Budget. At most `host_budget_bytes / chunk_bytes` chunk buffers (C, the capacity) exist at any
// moment, counting every buffer the store holds: resident chunks, chunks being loaded, and chunks
// being written back. That holds by construction: a chunk is made resident either into a fresh
// buffer while fewer than C exist, or into the buffer of the chunk it evicts, and the evicted
// chunk's write-back and the newcomer's read then run one after the other on that same buffer (on
// an internal loader thread, so neither blocks the caller). Buffers the caller passes to Read() and
// Write() are the caller's and are not counted; those calls move data straight between them and
// the disk when the chunk is not resident.
//
// Eviction. SetTrace() records one iteration's access order (chunk ids, e.g. 0..N-1 for an
// optimizer sweep); from then on a victim is chosen by FarthestNextUsePolicy (Belady) through a
// ResidentSet of capacity C, at the moment of the latest Acquire: Acquire(id) moves the moment to
// the next position of `id` in the trace (wrapping; an id absent from the trace leaves it where
// it is), so accesses that skip or repeat entries do not derail it. Before any trace is given the
// victim is the lowest-id unpinned resident (PatrickStar's warm-up rule: all candidates equal,
// ties to the lower id). Pinned chunks — acquired and not yet released, or still loading — are
// never evicted.
//
// Contents. A chunk never written reads as zeros without any disk I/O. A chunk released dirty is
// written back when evicted (or by Flush()); a clean one is dropped and re-read from its disk slot
// later. Every disk write gets a new generation from the DiskTier, which the store keeps per chunk
// and names when reading, so a read always returns the latest data written for that chunk (the
// DiskTier runs operations on one chunk in submission order) and a damaged or stale slot fails
// with kDataLoss instead of returning wrong bytes. Discard() makes a chunk never-written again
// (counted in `discards`): its resident copy is dropped without a write-back and its slot is no
// longer referenced.
//
// Blocking. Acquire() blocks until the chunk is resident (waiting for its prefetch, or loading it
// now, behind any write-back of the buffer it takes). Prefetch() and Release() never wait for I/O.
// Flush(), Read()/Write() of a non-resident chunk, Discard() of a chunk being loaded,
// ForEachChunk() and the destructor (which waits for outstanding I/O) block.
//
// Thread safety: one caller thread. The public methods must not be called concurrently (they
// share the resident set, the policy and the counters without locks); I/O runs on the DiskTier's
// threads and on one internal loader thread, which touch only the buffers handed to them.
#ifndef SHOAL_MEMORY_TIERED_STORE_H_
#define SHOAL_MEMORY_TIERED_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "memory/disk_tier.h"
#include "memory/eviction.h"

namespace shoal::memory {

struct TieredChunkStoreOptions {
  int num_chunks = 0;              // chunk ids are [0, num_chunks) (> 0)
  int64_t chunk_bytes = 0;         // payload of one chunk: a positive multiple of sizeof(float)
  int64_t host_budget_bytes = 0;   // hard limit on chunk buffers in RAM (>= chunk_bytes)
  std::string disk_directory;      // where the disk tier's file is made (memory.disk_path)
  int64_t disk_budget_bytes = 0;   // 0: exactly DiskTier::FileBytes(chunk_bytes, num_chunks)
  int disk_worker = 0;             // names the file: shoal-disk-tier-<worker>.bin
  DiskIoBackend disk_backend = DiskIoBackend::kAuto;
  int disk_io_threads = 2;         // DiskTier thread pool (kThreadPool or the kAuto fallback)
  // Fixed homes (the chunk manager's parameters and gradients, which the model uses as views at
  // fixed addresses). Empty: the store allocates its own buffers, as described above. Otherwise
  // exactly num_chunks entries: chunk i lives at homes[i], chunk_bytes long, page-aligned (and
  // chunk_bytes a multiple of the page size), no two overlapping, in anonymous memory the caller
  // mapped (mmap) and keeps mapped for the store's lifetime; Create() checks all of that, private
  // anonymous mappings (MAP_PRIVATE | MAP_ANONYMOUS) included, because only there do released
  // pages read back as zeros and leave memory. Create() discards what the homes held: every
  // chunk starts never-written (zeros). A resident chunk's pages hold its contents; a chunk that
  // is not resident has its pages released (madvise MADV_DONTNEED: they leave RSS) and protected
  // (PROT_NONE), so a stray access faults instead of reading zeros. "A buffer" in the
  // budget rule above is then a resident home: a victim's write-back runs from its own home,
  // and the newcomer's pages are made accessible and filled only after the victim's pages are
  // released (on the loader thread, as the buffer hand-over is), so the committed homes never
  // exceed the capacity either (allocation_observer and stats count homes made accessible as
  // buffers). Where the kernel allows (mremap with MREMAP_DONTUNMAP, Linux 5.7+), "released and
  // made accessible" is one step: the victim's physical pages move to the newcomer's home, so a
  // load neither faults nor zeroes pages, and the victim's home is left mapped, empty and
  // protected as after a release; a home made accessible in a free slot is populated at once
  // (MADV_POPULATE_WRITE, 5.14+) instead of page by page. The destructor leaves resident
  // chunks' contents in place and makes every other home readable zeros again.
  std::vector<float*> homes;
  // Called on the caller's thread whenever the store allocates (+chunk_bytes) or frees
  // (-chunk_bytes) a chunk buffer, before the buffer is used / after it is no longer used; for
  // tests and a memory profiler that account for allocations independently of the counters.
  std::function<void(int64_t delta_bytes)> allocation_observer;
};

// Running totals since Create(). "Loads" make a chunk resident; a chunk is never loaded twice for
// one Acquire.
struct TieredChunkStoreStats {
  int64_t resident_bytes = 0;       // chunk buffers held now (resident, loading, writing back)
  int64_t peak_resident_bytes = 0;  // the most ever held at once: never above the host budget
  int64_t loads = 0;                // chunks read from their disk slot
  int64_t zero_fills = 0;           // never-written chunks made resident as zeros (no disk I/O)
  int64_t demand_loads = 0;         // loads and zero fills started by Acquire (the caller waits)
  int64_t prefetches = 0;           // loads and zero fills started by Prefetch
  int64_t prefetches_skipped = 0;   // Prefetch hints dropped: no room without evicting a pin
  int64_t prefetch_hits = 0;        // Acquire found the chunk resident or in flight
  int64_t prefetches_wasted = 0;    // prefetched chunks evicted before any Acquire used them
  int64_t evictions = 0;
  int64_t write_backs = 0;          // dirty chunks written to disk (eviction or Flush)
  int64_t bytes_read = 0;           // chunk payload bytes read from disk (Read() included)
  int64_t bytes_written = 0;        // chunk payload bytes written to disk (Write() included)
  int64_t discards = 0;             // Discard() calls (resident or not)
  double acquire_wait_seconds = 0;  // time Acquire() blocked on loads and write-backs
};

class TieredChunkStore {
 public:
  // Opens the disk tier (a fresh file; see DiskTier::Open) and starts the loader thread. No chunk
  // buffer is allocated yet. Errors: kInvalidArgument for bad options (naming the field);
  // kResourceExhausted when the host budget cannot hold one chunk (naming the budget and the chunk
  // size); the DiskTier's errors (a disk budget too small, an unusable directory).
  static absl::StatusOr<std::unique_ptr<TieredChunkStore>> Create(
      const TieredChunkStoreOptions& options);

  // Waits for outstanding loads and write-backs, then deletes the disk file and frees the buffers.
  ~TieredChunkStore();
  TieredChunkStore(const TieredChunkStore&) = delete;
  TieredChunkStore& operator=(const TieredChunkStore&) = delete;

  // Records the access order that drives eviction from now on, and puts the moment before its
  // start. Errors: kInvalidArgument for an empty trace or an id outside [0, num_chunks) (naming
  // its position); the previous trace (or none) then stays.
  absl::Status SetTrace(absl::Span<const int> trace);

  // Makes chunk `id` resident, pins it and returns its payload (chunk_bytes / 4 floats), valid
  // until the matching Release(). Pins nest. Errors: kOutOfRange for a bad id; kResourceExhausted
  // (naming the budget, the chunk size and the pinned chunks) when every buffer the budget allows
  // holds a pinned chunk; kDataLoss (naming the chunk) when its disk slot is damaged; other disk
  // errors as the DiskTier reports them. After an error the chunk is not resident and a later
  // Acquire tries again.
  absl::StatusOr<float*> Acquire(int id);

  // Drops one pin of `id`. `dirty`: the payload was modified, so its disk copy is stale and
  // evicting it must write it back first (a chunk stays dirty until written). Errors: kOutOfRange
  // for a bad id, kFailedPrecondition if it is not pinned.
  absl::Status Release(int id, bool dirty);

  // A hint: starts making `id` resident in the background if that is possible without evicting a
  // pinned chunk (evicting by the policy when the budget is full), so that a later Acquire(id)
  // does not wait. Does nothing if `id` is resident or already in flight, and skips the hint
  // (counted in prefetches_skipped) when there is no room. Errors: kOutOfRange for a bad id; a
  // load failure is reported by the Acquire that follows.
  absl::Status Prefetch(int id);

  // Forgets chunk `id`'s contents without any I/O: it reads as zeros again, as if never written
  // (gradients after an optimizer step). A resident copy is dropped (its buffer freed, or its
  // home released), an in-flight prefetch is waited for first, its disk slot's data is no longer
  // referenced. Errors: kOutOfRange for a bad id; kFailedPrecondition if it is pinned.
  absl::Status Discard(int id);

  // Writes every dirty chunk (pinned ones included, with their contents as of now) to disk and
  // waits for all outstanding I/O, so that the disk tier holds every chunk's latest released
  // contents. Returns the first error of those writes or of earlier write-backs not yet reported.
  absl::Status Flush();

  // Copies chunk `id` into `out` (chunk_bytes / 4 floats): from RAM if resident (waiting for an
  // in-flight load), zeros if never written, else straight from its disk slot into `out` without
  // using a store buffer. Errors: kOutOfRange / kInvalidArgument (wrong size), disk errors.
  absl::Status Read(int id, absl::Span<float> out);
  // Replaces chunk `id`'s contents with `in`: into its buffer if resident (marking it dirty), else
  // straight to its disk slot (no store buffer used; blocks until written). Errors as Read; a
  // pinned chunk can be written (the caller owns the consequences).
  absl::Status Write(int id, absl::Span<const float> in);

  // Calls `visit(id, payload)` for every chunk in id order, streaming them through the budget: a
  // chunk not resident is acquired for the call (evicting by the policy) and released clean. For
  // checkpoint save. Stops at the first error, from the store or from `visit`.
  absl::Status ForEachChunk(
      const std::function<absl::Status(int id, absl::Span<const float> payload)>& visit);

  TieredChunkStoreStats stats() const { return stats_; }
  int num_chunks() const { return static_cast<int>(chunks_.size()); }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  int64_t chunk_elements() const { return chunk_bytes_ / static_cast<int64_t>(sizeof(float)); }
  int64_t host_budget_bytes() const { return host_budget_bytes_; }
  int capacity_chunks() const { return capacity_; }  // host_budget_bytes / chunk_bytes
  bool IsResident(int id) const;  // resident or loading
  const DiskTier& disk() const { return *disk_; }

 private:
  struct LoadJob;
  class Loader;
  struct BufferDeleter {
    void operator()(float* p) const;
  };
  using BufferPtr = std::unique_ptr<float[], BufferDeleter>;

  struct Chunk {
    BufferPtr buffer;               // own buffers: set while resident or loading
    float* data = nullptr;          // the payload while resident or loading (buffer or home)
    float* home = nullptr;          // homes mode: its fixed address
    // Homes mode: the loader job that releases this chunk's home after its eviction's write-back,
    // while that may still be queued; a load of the chunk must then run after it, on the loader.
    std::shared_ptr<LoadJob> home_release;
    std::shared_ptr<LoadJob> load;  // set while loading
    bool loading = false;
    bool prefetched = false;        // made resident by Prefetch and not yet acquired
    bool dirty = false;             // RAM copy newer than the disk slot
    int caller_pins = 0;
    uint64_t generation = 0;        // of its latest disk write; 0: never written to disk
    absl::Status error;             // a failed load or lost write-back, returned by Acquire once
  };

  explicit TieredChunkStore(const TieredChunkStoreOptions& options);

  absl::Status CheckId(int id, const char* what) const;
  // The trace position of this access to `id` (advancing the moment), or the current moment.
  int64_t AdvanceMoment(int id);
  const EvictionPolicy& policy() const;
  // Starts making `id` resident at `moment`: evicts a victim if the budget is full (its buffer,
  // after a write-back if dirty, becomes `id`'s), then reads or zero-fills. kResourceExhausted
  // when every slot is pinned.
  absl::Status StartLoad(int id, int64_t moment);
  // Makes `id` resident for Acquire/ForEachChunk: StartLoad, waiting for in-flight loads to free
  // their pins when that is what blocks it, then waits for the load.
  absl::Status AcquireAt(int id, int64_t moment);
  // Waits for `id`'s in-flight load and settles it (counters, pins; on failure drops the chunk).
  absl::Status FinishLoad(int id);
  // Settles loads that have completed, without blocking.
  void ReapLoads();
  // Removes `id` from the resident set (ResidentSet has no removal: rebuilt from the others).
  void DropFromResidentSet(int id);
  BufferPtr AllocateBuffer();
  void FreeBuffer(BufferPtr buffer);
  // Budget accounting of one buffer (own or home) coming into use / going out of use: the
  // counters and the allocation observer. ChargeBuffer aborts if the budget would be passed.
  void ChargeBuffer();
  void UnchargeBuffer();
  // Frees chunk `id`'s buffer, or releases its home, with the accounting; nothing if it has none.
  void FreeChunkBuffer(int id);
  void NoteError(const absl::Status& status);

  int64_t chunk_bytes_;
  int64_t host_budget_bytes_;
  int capacity_;
  std::function<void(int64_t)> allocation_observer_;
  bool home_mode_ = false;  // options.homes given: chunks live at fixed addresses

  std::vector<Chunk> chunks_;
  ResidentSet resident_;
  std::vector<int> in_flight_;  // chunks loading

  std::unique_ptr<NextUseTable> trace_table_;            // null until SetTrace
  std::unique_ptr<FarthestNextUsePolicy> trace_policy_;  // over *trace_table_
  std::vector<std::vector<int64_t>> trace_positions_;    // chunk -> its ascending positions
  int64_t moment_ = 0;                                   // position of the latest access
  int64_t next_position_ = 0;                            // where the next access is looked for

  TieredChunkStoreStats stats_;
  absl::Status pending_error_;  // first write-back error not yet returned by Flush

  // Declared last: destroyed first, so that the loader stops before the tier it uses closes.
  std::unique_ptr<DiskTier> disk_;
  std::unique_ptr<Loader> loader_;
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_TIERED_STORE_H_
