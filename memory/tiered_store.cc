#include "memory/tiered_store.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

namespace shoal::memory {
namespace {

// The rule before a trace exists (PatrickStar's warm-up: every candidate has the same priority,
// ties to the lower id). Candidates arrive sorted, but taking the minimum does not rely on that.
class LowestIdPolicy final : public EvictionPolicy {
 public:
  absl::string_view name() const override { return "lowest-id"; }
  absl::StatusOr<int> ChooseVictim(absl::Span<const int> candidates,
                                   int64_t moment) const override {
    if (candidates.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("lowest-id: no evictable chunk at moment ", moment));
    }
    return *std::min_element(candidates.begin(), candidates.end());
  }
};

const LowestIdPolicy& LowestId() {
  static const LowestIdPolicy* policy = new LowestIdPolicy();
  return *policy;
}

// Buffers are 64-byte aligned (a cache line; what vectorised AdamW over the chunk wants).
constexpr size_t kBufferAlignment = 64;

absl::Status Annotate(const absl::Status& status, const std::string& context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat("tiered store: ", context, ": ", status.message()));
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int64_t PageBytes() {
  static const int64_t page = static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

// Homes mode. A home leaves RAM by madvise(MADV_DONTNEED), which in private anonymous memory
// frees its pages so that they read as zeros when next touched, and PROT_NONE, so that a stray
// access faults instead of silently reading those zeros. Returns 0 or the errno.
int ReleasePages(float* home, int64_t bytes) {
  if (::madvise(home, static_cast<size_t>(bytes), MADV_DONTNEED) != 0) return errno;
  if (::mprotect(home, static_cast<size_t>(bytes), PROT_NONE) != 0) return errno;
  return 0;
}

// Both calls below act on ranges Create() checked (mapped, private anonymous, page-aligned), so
// they fail only if the caller unmapped a home (the contract says it must not) or the kernel is
// out of memory for its own bookkeeping. Going on would break the budget or hand out a chunk
// that faults, hence abort, as for a failed allocation of an own buffer.
void ReleaseHome(float* home, int64_t bytes) {
  const int error = ReleasePages(home, bytes);
  if (error != 0) {
    SHOAL_LOG(Error) << "tiered store: releasing the home at " << home << " (" << bytes
                     << " bytes) failed: " << std::strerror(error);
    std::abort();
  }
}

// The released pages come back as zeros. They are populated writable here, in one call, rather
// than faulted in one by one as the load's copy or the caller touches them: on the 2-core AMD
// EPYC VM of issue 13 a fault costs microseconds, and a page first read (mapped to the shared
// zero page, as a gradient accumulation's `C += A B` does) and then written faults twice, the
// second time with a TLB-flush IPI to the other core; those faults took 16 % of the paged step's
// CPU samples. A kernel without MADV_POPULATE_WRITE (before 5.14) faults them in as before.
// `populate` false: accessible only (the destructor, which hands unused homes back as they came).
void CommitHome(float* home, int64_t bytes, bool populate = true) {
  if (::mprotect(home, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE) != 0) {
    const int error = errno;
    SHOAL_LOG(Error) << "tiered store: making the home at " << home << " (" << bytes
                     << " bytes) accessible failed: " << std::strerror(error);
    std::abort();
  }
#if defined(MADV_POPULATE_WRITE)
  if (populate) (void)::madvise(home, static_cast<size_t>(bytes), MADV_POPULATE_WRITE);
#else
  (void)populate;
#endif
}

// Hands the pages of `from` (a victim's home, its contents no longer needed in RAM) to `to` (the
// newcomer's released home): mremap moves the page-table entries, so `to` is accessible and
// populated without a fault, a zeroed page or a copy, and `from` is left mapped, empty and then
// protected, exactly as ReleaseHome leaves it (MREMAP_DONTUNMAP keeps the range mapped, so no
// other mmap can take the address in between). The pages in RAM do not change in number, so the
// budget holds as with a release and a commit. Returns false, having changed nothing, where the
// kernel refuses (before 5.7, or a mapping it cannot move): the caller then releases and commits.
// `to` then holds the victim's old bytes, not zeros.
bool MoveHome(float* from, float* to, int64_t bytes) {
#if defined(MREMAP_DONTUNMAP)
  static std::atomic<bool> unsupported{false};
  if (unsupported.load(std::memory_order_relaxed)) return false;
  void* moved = ::mremap(from, static_cast<size_t>(bytes), static_cast<size_t>(bytes),
                         MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, to);
  if (moved == MAP_FAILED) {
    unsupported.store(true, std::memory_order_relaxed);
    return false;
  }
  if (::mprotect(from, static_cast<size_t>(bytes), PROT_NONE) != 0) {
    const int error = errno;
    SHOAL_LOG(Error) << "tiered store: protecting the home at " << from << " (" << bytes
                     << " bytes) after moving its pages failed: " << std::strerror(error);
    std::abort();
  }
  return true;
#else
  (void)from;
  (void)to;
  (void)bytes;
  return false;
#endif
}

// [start, end) of this process's private anonymous mappings (anonymous: no backing inode), from
// /proc/self/maps, adjacent ones merged.
absl::StatusOr<std::vector<std::pair<uintptr_t, uintptr_t>>> PrivateAnonymousRanges() {
  std::ifstream maps("/proc/self/maps");
  if (!maps) return absl::UnavailableError("tiered store: cannot read /proc/self/maps");
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::string line;
  while (std::getline(maps, line)) {
    uintptr_t start = 0, end = 0;
    char perms[8] = {};
    uint64_t inode = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %7s %*s %*s %" SCNu64, &start, &end,
                    perms, &inode) != 4) {
      continue;
    }
    if (perms[3] != 'p' || inode != 0) continue;
    if (!ranges.empty() && ranges.back().second == start) {
      ranges.back().second = end;
    } else {
      ranges.emplace_back(start, end);
    }
  }
  return ranges;
}

// The rules for TieredChunkStoreOptions::homes (see there). Why private anonymous memory: only
// there do released pages read back as zeros and leave the process's memory (a shared mapping
// keeps them, a file mapping re-reads the file), which is what both the contents and the budget
// rely on.
absl::Status CheckHomes(const TieredChunkStoreOptions& o) {
  const std::vector<float*>& homes = o.homes;
  const int64_t page = PageBytes();
  if (static_cast<int64_t>(homes.size()) != o.num_chunks) {
    return absl::InvalidArgumentError(absl::StrCat("tiered store: homes has ", homes.size(),
                                                   " entries, one per chunk is needed (",
                                                   o.num_chunks, ")"));
  }
  if (o.chunk_bytes % page != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tiered store: with homes, chunk_bytes (", o.chunk_bytes,
                     ") must be a multiple of the page size (", page, ")"));
  }
  std::vector<std::pair<uintptr_t, int>> sorted;
  sorted.reserve(homes.size());
  for (size_t i = 0; i < homes.size(); ++i) {
    const auto address = reinterpret_cast<uintptr_t>(homes[i]);
    if (homes[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("tiered store: homes[", i, "] is null"));
    }
    if (address % static_cast<uintptr_t>(page) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tiered store: homes[", i, "] (0x",
                                                     absl::Hex(address),
                                                     ") is not aligned to the page size (", page,
                                                     " bytes)"));
    }
    sorted.emplace_back(address, static_cast<int>(i));
  }
  std::sort(sorted.begin(), sorted.end());
  const auto bytes = static_cast<uintptr_t>(o.chunk_bytes);
  for (size_t k = 1; k < sorted.size(); ++k) {
    if (sorted[k - 1].first + bytes > sorted[k].first) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tiered store: homes[", sorted[k - 1].second, "] and homes[", sorted[k].second,
          "] overlap (0x", absl::Hex(sorted[k - 1].first), " and 0x", absl::Hex(sorted[k].first),
          ", chunk_bytes ", o.chunk_bytes, ")"));
    }
  }
  absl::StatusOr<std::vector<std::pair<uintptr_t, uintptr_t>>> ranges = PrivateAnonymousRanges();
  if (!ranges.ok()) return Annotate(ranges.status(), "checking homes");
  for (const auto& [address, i] : sorted) {
    // The last range starting at or before the home must cover all of it.
    auto it = std::upper_bound(
        ranges->begin(), ranges->end(), address,
        [](uintptr_t a, const std::pair<uintptr_t, uintptr_t>& r) { return a < r.first; });
    if (it == ranges->begin() || std::prev(it)->second < address + bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tiered store: homes[", i, "] (0x", absl::Hex(address), ", ", o.chunk_bytes,
          " bytes) is not all in private anonymous memory (mmap MAP_PRIVATE | MAP_ANONYMOUS)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void TieredChunkStore::BufferDeleter::operator()(float* p) const { std::free(p); }

// One chunk being made resident in `out`. Either a read submitted directly (`direct`: the buffer
// was free), or a job for the loader thread, which first waits for the write-back of the evicted
// chunk that still owns the bytes of `out`, then reads or zero-fills. In homes mode `out` is the
// newcomer's own home and the victim's is another: the loader releases the victim's home after
// its write-back and only then makes `out` accessible (`commit_home`; by moving the victim's pages
// there, MoveHome, where the kernel allows), so that the pages in use
// never pass the budget; a load into a home whose release is still queued also runs here, behind
// that release.
struct TieredChunkStore::LoadJob {
  int chunk = 0;
  float* out = nullptr;
  int64_t bytes = 0;
  uint64_t generation = 0;  // to read; 0: never written, zero-fill

  float* release_home = nullptr;  // homes mode: the victim's home, released after the write
  bool commit_home = false;       // homes mode: make `out` accessible before filling it
  bool zeros_free = false;        // `out` reads as zeros already (released pages): no memset
                                  // (the loader memsets anyway where it moved a victim's pages)

  bool direct = false;
  DiskReadHandle read;  // when direct

  bool after_write = false;
  DiskWriteHandle write_before;  // when after_write: the victim's write-back from `out`
  int write_chunk = -1;
  uint64_t write_generation = 0;

  // Loader results, guarded by mu.
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  absl::Status status;
  absl::Status write_status;

  bool Done() {
    if (direct) return read.done();
    std::lock_guard<std::mutex> lock(mu);
    return finished;
  }
  // Once per job.
  absl::Status Wait() {
    if (direct) return read.Wait();
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return finished; });
    return status;
  }
};

// One thread running LoadJobs in submission order. Why a thread rather than chaining on the
// DiskTier: the tier orders operations per chunk only, and here a read of chunk X must follow the
// write of a different chunk V out of the same buffer. Blocking on that write is the loader's
// job, so that neither Prefetch() nor the caller's compute waits for it.
class TieredChunkStore::Loader {
 public:
  explicit Loader(DiskTier* disk) : disk_(disk), thread_([this] { Run(); }) {}
  // Runs what is queued, then stops.
  ~Loader() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void Submit(std::shared_ptr<LoadJob> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_all();
  }

 private:
  void Run() {
    while (true) {
      std::shared_ptr<LoadJob> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      absl::Status write_status;
      if (job->after_write) write_status = job->write_before.Wait().status();
      // The buffer is free once the write has ended, whether or not it succeeded.
      bool zeros_free = job->zeros_free;
      if (job->release_home != nullptr && job->commit_home &&
          MoveHome(job->release_home, job->out, job->bytes)) {
        zeros_free = false;  // the victim's bytes
      } else {
        if (job->release_home != nullptr) ReleaseHome(job->release_home, job->bytes);
        if (job->commit_home) CommitHome(job->out, job->bytes);
      }
      absl::Status status;
      if (job->generation == 0) {
        if (!zeros_free) std::memset(job->out, 0, static_cast<size_t>(job->bytes));
      } else {
        status = disk_->Read(job->chunk, job->out, job->bytes, job->generation);
      }
      {
        std::lock_guard<std::mutex> lock(job->mu);
        job->write_status = std::move(write_status);
        job->status = std::move(status);
        job->finished = true;
      }
      job->cv.notify_all();
    }
  }

  DiskTier* disk_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<LoadJob>> queue_;  // guarded by mu_
  bool stop_ = false;                           // guarded by mu_
  std::thread thread_;                          // last: starts after the rest is initialised
};

absl::StatusOr<std::unique_ptr<TieredChunkStore>> TieredChunkStore::Create(
    const TieredChunkStoreOptions& options) {
  if (options.num_chunks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tiered store: num_chunks must be > 0, got ", options.num_chunks));
  }
  if (options.chunk_bytes <= 0 ||
      options.chunk_bytes % static_cast<int64_t>(sizeof(float)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tiered store: chunk_bytes must be a positive multiple of 4, got ", options.chunk_bytes));
  }
  if (options.host_budget_bytes < options.chunk_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tiered store: host budget of ", options.host_budget_bytes,
        " bytes cannot hold one chunk of ", options.chunk_bytes, " bytes"));
  }
  if (options.disk_directory.empty()) {
    return absl::InvalidArgumentError("tiered store: disk_directory is empty");
  }
  if (options.disk_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tiered store: disk_budget_bytes must be >= 0, got ", options.disk_budget_bytes));
  }
  if (!options.homes.empty()) SHOAL_RETURN_IF_ERROR(CheckHomes(options));
  DiskTierOptions disk;
  disk.directory = options.disk_directory;
  disk.worker = options.disk_worker;
  disk.slot_bytes = options.chunk_bytes;
  disk.num_slots = options.num_chunks;
  disk.budget_bytes = options.disk_budget_bytes > 0
                          ? options.disk_budget_bytes
                          : DiskTier::FileBytes(options.chunk_bytes, options.num_chunks);
  disk.backend = options.disk_backend;
  disk.io_threads = options.disk_io_threads;
  absl::StatusOr<std::unique_ptr<DiskTier>> opened = DiskTier::Open(disk);
  if (!opened.ok()) return Annotate(opened.status(), "opening the disk tier");

  std::unique_ptr<TieredChunkStore> store(new TieredChunkStore(options));
  store->disk_ = *std::move(opened);
  store->loader_ = std::make_unique<Loader>(store->disk_.get());
  if (store->home_mode_) {
    // Only now that nothing else can fail: a Create() that fails leaves the homes untouched.
    for (int id = 0; id < options.num_chunks; ++id) {
      Chunk& c = store->chunks_[id];
      c.home = options.homes[id];
      const int error = ReleasePages(c.home, options.chunk_bytes);
      if (error != 0) {
        return absl::InvalidArgumentError(absl::StrCat("tiered store: releasing homes[", id,
                                                       "] failed: ", std::strerror(error)));
      }
    }
  }
  return store;
}

TieredChunkStore::TieredChunkStore(const TieredChunkStoreOptions& options)
    : chunk_bytes_(options.chunk_bytes),
      host_budget_bytes_(options.host_budget_bytes),
      capacity_(static_cast<int>(
          std::min<int64_t>(options.host_budget_bytes / options.chunk_bytes, options.num_chunks))),
      allocation_observer_(options.allocation_observer),
      home_mode_(!options.homes.empty()),
      chunks_(options.num_chunks),
      // Create() has checked that the budget holds a chunk, so the capacity is >= 1.
      resident_(*ResidentSet::Create(capacity_)) {}

TieredChunkStore::~TieredChunkStore() {
  // Every buffer may still be in use by an operation: the loader finishes its queued jobs (each
  // waits for its write-back), the tier drains the direct reads; only then are buffers freed.
  loader_.reset();
  if (!home_mode_) {
    disk_.reset();
    for (Chunk& c : chunks_) {
      if (c.buffer != nullptr) FreeBuffer(std::move(c.buffer));
    }
    return;
  }
  // Homes stay with the caller: resident chunks keep their contents; a load that failed left
  // garbage, so that home is released like the non-resident ones, and all of those become
  // readable and writable zeros, as the caller's mapping was before Create().
  for (Chunk& c : chunks_) {
    if (c.loading && !c.load->Wait().ok()) {
      ReleaseHome(c.data, chunk_bytes_);
      c.data = nullptr;
      UnchargeBuffer();
    }
  }
  disk_.reset();
  for (Chunk& c : chunks_) {
    if (c.data != nullptr) {
      UnchargeBuffer();  // no longer the store's
    } else if (c.home != nullptr) {
      CommitHome(c.home, chunk_bytes_, /*populate=*/false);
    }
  }
}

absl::Status TieredChunkStore::CheckId(int id, const char* what) const {
  if (id < 0 || id >= num_chunks()) {
    return absl::OutOfRangeError(absl::StrCat("tiered store: ", what, " of chunk ", id,
                                              ": ids are [0, ", num_chunks(), ")"));
  }
  return absl::OkStatus();
}

bool TieredChunkStore::IsResident(int id) const {
  return id >= 0 && id < num_chunks() && chunks_[id].data != nullptr;
}

absl::Status TieredChunkStore::SetTrace(absl::Span<const int> trace) {
  for (size_t t = 0; t < trace.size(); ++t) {
    if (trace[t] < 0 || trace[t] >= num_chunks()) {
      return absl::InvalidArgumentError(absl::StrCat("tiered store: trace position ", t,
                                                     " names chunk ", trace[t], ", ids are [0, ",
                                                     num_chunks(), ")"));
    }
  }
  absl::StatusOr<NextUseTable> table = NextUseTable::Build(trace);
  if (!table.ok()) return Annotate(table.status(), "trace");
  trace_table_ = std::make_unique<NextUseTable>(*std::move(table));
  trace_policy_ = std::make_unique<FarthestNextUsePolicy>(trace_table_.get());
  trace_positions_.assign(chunks_.size(), {});
  for (size_t t = 0; t < trace.size(); ++t) {
    trace_positions_[trace[t]].push_back(static_cast<int64_t>(t));
  }
  moment_ = 0;
  next_position_ = 0;
  return absl::OkStatus();
}

const EvictionPolicy& TieredChunkStore::policy() const {
  if (trace_policy_ != nullptr) return *trace_policy_;
  return LowestId();
}

int64_t TieredChunkStore::AdvanceMoment(int id) {
  if (trace_table_ == nullptr) return 0;
  const std::vector<int64_t>& positions = trace_positions_[id];
  if (positions.empty()) return moment_;
  // The next position of `id` at or after where the previous access left off, wrapping into the
  // next iteration: an access that skips entries of the trace (or repeats one) resynchronises.
  auto it = std::lower_bound(positions.begin(), positions.end(), next_position_);
  moment_ = it != positions.end() ? *it : positions.front();
  next_position_ = (moment_ + 1) % trace_table_->length();
  return moment_;
}

void TieredChunkStore::ChargeBuffer() {
  // The one place a buffer (or a home) is counted in. The resident set never holds more than
  // capacity_ chunks and every buffer belongs to one of them, so this cannot pass the budget;
  // checked anyway, because passing it would be a bug here that a caller could not work around.
  if (stats_.resident_bytes + chunk_bytes_ > static_cast<int64_t>(capacity_) * chunk_bytes_) {
    SHOAL_LOG(Error) << "tiered store: allocating a chunk buffer would exceed the host budget of "
                     << host_budget_bytes_ << " bytes (" << stats_.resident_bytes
                     << " bytes held)";
    std::abort();
  }
  stats_.resident_bytes += chunk_bytes_;
  stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);
  if (allocation_observer_) allocation_observer_(chunk_bytes_);
}

void TieredChunkStore::UnchargeBuffer() {
  stats_.resident_bytes -= chunk_bytes_;
  if (allocation_observer_) allocation_observer_(-chunk_bytes_);
}

TieredChunkStore::BufferPtr TieredChunkStore::AllocateBuffer() {
  ChargeBuffer();
  const size_t size = (static_cast<size_t>(chunk_bytes_) + kBufferAlignment - 1) /
                      kBufferAlignment * kBufferAlignment;
  auto* p = static_cast<float*>(std::aligned_alloc(kBufferAlignment, size));
  if (p == nullptr) {
    SHOAL_LOG(Error) << "tiered store: out of memory allocating " << size << " bytes";
    std::abort();
  }
  return BufferPtr(p);
}

void TieredChunkStore::FreeBuffer(BufferPtr buffer) {
  if (buffer == nullptr) return;
  buffer.reset();
  UnchargeBuffer();
}

void TieredChunkStore::FreeChunkBuffer(int id) {
  Chunk& c = chunks_[id];
  if (c.data == nullptr) return;
  c.data = nullptr;
  if (home_mode_) {
    ReleaseHome(c.home, chunk_bytes_);
    UnchargeBuffer();
  } else {
    FreeBuffer(std::move(c.buffer));
  }
}

void TieredChunkStore::NoteError(const absl::Status& status) {
  if (!status.ok() && pending_error_.ok()) pending_error_ = status;
}

void TieredChunkStore::DropFromResidentSet(int id) {
  ResidentSet rebuilt = *ResidentSet::Create(capacity_);
  for (int r : resident_.Residents()) {
    if (r == id) continue;
    // Below capacity: no eviction, so the policy is never consulted.
    (void)rebuilt.Load(r, 0, LowestId());
    const int pins = chunks_[r].caller_pins + (chunks_[r].loading ? 1 : 0);
    for (int i = 0; i < pins; ++i) (void)rebuilt.Pin(r);
  }
  resident_ = std::move(rebuilt);
}

absl::Status TieredChunkStore::StartLoad(int id, int64_t moment) {
  Chunk& c = chunks_[id];
  absl::StatusOr<std::optional<int>> evicted = resident_.Load(id, moment, policy());
  if (!evicted.ok()) return evicted.status();

  auto job = std::make_shared<LoadJob>();
  job->chunk = id;
  job->bytes = chunk_bytes_;
  job->generation = c.generation;
  // Homes mode: this chunk's home may still be waiting for its release after an earlier eviction
  // (its write-back in flight). Then this load goes to the loader too, which runs jobs in order,
  // so that the release happens before the home is made accessible again, not after.
  bool behind_release = false;
  bool moved_home = false;  // homes mode: `id`'s home holds a clean victim's pages (MoveHome)
  if (c.home_release != nullptr) {
    behind_release = !c.home_release->Done();
    c.home_release.reset();
  }
  if (evicted->has_value()) {
    // The newcomer takes the victim's buffer (or, with homes, its place in the budget), so the
    // number of buffers does not change: this is what keeps write-backs in flight inside the
    // budget.
    const int v = **evicted;
    Chunk& victim = chunks_[v];
    ++stats_.evictions;
    float* const victim_data = victim.data;
    victim.data = nullptr;
    if (!home_mode_) c.buffer = std::move(victim.buffer);
    if (victim.prefetched) ++stats_.prefetches_wasted;
    victim.prefetched = false;
    if (victim.dirty) {
      const uint64_t before = victim.generation;
      job->write_before = disk_->WriteAsync(v, victim_data, chunk_bytes_);
      // The tier numbers a write when it is submitted; a later read of v names this generation
      // and, being queued behind this write on chunk v, sees its bytes.
      victim.generation = disk_->generation(v);
      victim.dirty = false;
      job->after_write = true;
      job->write_chunk = v;
      job->write_generation = victim.generation;
      ++stats_.write_backs;
      stats_.bytes_written += chunk_bytes_;
      if (victim.generation == before) {
        // Refused before any I/O (the handle is already done): the contents of v are lost.
        victim.error = Annotate(job->write_before.Wait().status(),
                                absl::StrCat("writing back chunk ", v));
        NoteError(victim.error);
      }
      if (home_mode_) {
        // The victim's pages leave only once written; `id`'s home is filled after that.
        job->release_home = victim_data;
        victim.home_release = job;
      }
    } else if (home_mode_) {
      // Nothing to write: the victim's pages become `id`'s now, unless `id`'s home still waits
      // for its own release on the loader (which would then drop them); otherwise they leave and
      // `id` proceeds as into a free slot.
      if (!behind_release && MoveHome(victim_data, c.home, chunk_bytes_)) {
        moved_home = true;
      } else {
        ReleaseHome(victim_data, chunk_bytes_);
      }
      UnchargeBuffer();
      ChargeBuffer();
    }
  } else if (home_mode_) {
    ChargeBuffer();
  } else {
    c.buffer = AllocateBuffer();
  }
  c.data = home_mode_ ? c.home : c.buffer.get();
  job->out = c.data;
  const bool on_loader = job->after_write || behind_release;
  if (home_mode_) {
    // Every home not in use has been released (at Create, eviction, Discard or a failed load),
    // so it reads as zeros once accessible.
    job->zeros_free = true;
    if (on_loader) {
      job->commit_home = true;
    } else if (moved_home) {
      job->zeros_free = false;
    } else {
      CommitHome(c.home, chunk_bytes_);
    }
  }

  if (!on_loader && job->generation == 0) {
    // Never written: zeros, no disk, nothing in flight.
    if (!job->zeros_free) std::memset(job->out, 0, static_cast<size_t>(chunk_bytes_));
    ++stats_.zero_fills;
    return absl::OkStatus();
  }
  // Pinned while loading, so that no other load evicts a buffer an operation is filling.
  c.loading = true;
  (void)resident_.Pin(id);
  if (on_loader) {
    loader_->Submit(job);
  } else {
    job->direct = true;
    job->read = disk_->ReadAsync(id, job->out, chunk_bytes_, job->generation);
  }
  c.load = std::move(job);
  in_flight_.push_back(id);
  return absl::OkStatus();
}

absl::Status TieredChunkStore::FinishLoad(int id) {
  Chunk& c = chunks_[id];
  std::shared_ptr<LoadJob> job = std::move(c.load);
  absl::Status status = job->Wait();
  in_flight_.erase(std::find(in_flight_.begin(), in_flight_.end(), id));
  c.loading = false;
  (void)resident_.Unpin(id);

  if (job->after_write && !job->write_status.ok()) {
    // The victim's only up-to-date copy was the one written: it is lost. Its next Acquire says
    // so, unless it has been rewritten (a newer generation) or reloaded meanwhile.
    const absl::Status lost =
        Annotate(job->write_status, absl::StrCat("writing back chunk ", job->write_chunk));
    NoteError(lost);
    Chunk& victim = chunks_[job->write_chunk];
    if (victim.data == nullptr && victim.generation == job->write_generation) {
      victim.error = lost;
    }
  }
  if (!status.ok()) {
    DropFromResidentSet(id);
    FreeChunkBuffer(id);
    c.prefetched = false;
    return Annotate(status, absl::StrCat("loading chunk ", id));
  }
  if (job->generation != 0) {
    ++stats_.loads;
    stats_.bytes_read += chunk_bytes_;
  } else {
    ++stats_.zero_fills;
  }
  return absl::OkStatus();
}

void TieredChunkStore::ReapLoads() {
  // A copy: FinishLoad edits in_flight_.
  const std::vector<int> loading = in_flight_;
  for (int id : loading) {
    if (!chunks_[id].load->Done()) continue;
    absl::Status status = FinishLoad(id);
    if (!status.ok()) chunks_[id].error = status;
  }
}

absl::Status TieredChunkStore::AcquireAt(int id, int64_t moment) {
  while (true) {
    absl::Status started = StartLoad(id, moment);
    if (started.ok()) break;
    if (!absl::IsResourceExhausted(started)) return started;
    if (!in_flight_.empty()) {
      // Loads in flight hold pins; once settled their chunks can be evicted.
      const int other = in_flight_.front();
      absl::Status finished = FinishLoad(other);
      if (!finished.ok()) chunks_[other].error = finished;
      continue;
    }
    return absl::ResourceExhaustedError(absl::StrCat(
        "tiered store: host budget of ", host_budget_bytes_, " bytes holds ", capacity_,
        " chunk(s) of ", chunk_bytes_, " bytes and every one is pinned; cannot make chunk ", id,
        " resident (", started.message(), ")"));
  }
  if (chunks_[id].loading) return FinishLoad(id);
  return absl::OkStatus();
}

absl::StatusOr<float*> TieredChunkStore::Acquire(int id) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "acquire"));
  ReapLoads();
  const int64_t moment = AdvanceMoment(id);
  Chunk& c = chunks_[id];
  if (!c.error.ok()) {
    // Reported once; the next Acquire tries again.
    absl::Status error = std::move(c.error);
    c.error = absl::OkStatus();
    return error;
  }
  const auto start = std::chrono::steady_clock::now();
  if (resident_.Contains(id)) {
    ++stats_.prefetch_hits;
    if (c.loading) {
      absl::Status loaded = FinishLoad(id);
      stats_.acquire_wait_seconds += SecondsSince(start);
      if (!loaded.ok()) return loaded;
    }
  } else {
    ++stats_.demand_loads;
    absl::Status loaded = AcquireAt(id, moment);
    stats_.acquire_wait_seconds += SecondsSince(start);
    if (!loaded.ok()) return loaded;
  }
  c.prefetched = false;
  (void)resident_.Pin(id);
  ++c.caller_pins;
  return c.data;
}

absl::Status TieredChunkStore::Release(int id, bool dirty) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "release"));
  Chunk& c = chunks_[id];
  if (c.caller_pins == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("tiered store: release of chunk ", id, ", which is not acquired"));
  }
  --c.caller_pins;
  (void)resident_.Unpin(id);
  if (dirty) c.dirty = true;
  ReapLoads();
  return absl::OkStatus();
}

absl::Status TieredChunkStore::Prefetch(int id) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "prefetch"));
  ReapLoads();
  Chunk& c = chunks_[id];
  // Resident or in flight; or a failure waiting to be reported by Acquire.
  if (resident_.Contains(id) || !c.error.ok()) return absl::OkStatus();
  if (resident_.size() >= capacity_ && resident_.NumEvictable() == 0) {
    ++stats_.prefetches_skipped;
    return absl::OkStatus();
  }
  // Victims are judged at the moment of the latest access, as SimulateTrace's prefetch does.
  SHOAL_RETURN_IF_ERROR(StartLoad(id, moment_));
  ++stats_.prefetches;
  c.prefetched = true;
  return absl::OkStatus();
}

absl::Status TieredChunkStore::Discard(int id) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "discard"));
  ReapLoads();
  Chunk& c = chunks_[id];
  if (c.caller_pins > 0) {
    return absl::FailedPreconditionError(absl::StrCat("tiered store: discard of chunk ", id,
                                                      ", which is acquired (", c.caller_pins,
                                                      " pin(s))"));
  }
  // A load in flight owns the buffer until it ends. Its outcome does not matter: whatever it
  // read is dropped, and a failure leaves the chunk absent already.
  if (c.loading) (void)FinishLoad(id);
  if (c.data != nullptr) {
    DropFromResidentSet(id);
    FreeChunkBuffer(id);
  }
  // Never written again. A write-back still in flight from an earlier eviction may complete; its
  // generation is simply no longer named (and its failure no longer matters to this chunk). With
  // homes, a release of this home still queued stays in c.home_release, which the next load
  // waits behind.
  c.dirty = false;
  c.generation = 0;
  c.prefetched = false;
  c.error = absl::OkStatus();
  ++stats_.discards;
  return absl::OkStatus();
}

absl::Status TieredChunkStore::Flush() {
  while (!in_flight_.empty()) {
    const int id = in_flight_.front();
    absl::Status finished = FinishLoad(id);
    if (!finished.ok()) chunks_[id].error = finished;
  }
  std::vector<std::pair<int, DiskWriteHandle>> writes;
  for (int id = 0; id < num_chunks(); ++id) {
    Chunk& c = chunks_[id];
    if (c.data == nullptr || !c.dirty) continue;
    writes.emplace_back(id, disk_->WriteAsync(id, c.data, chunk_bytes_));
    c.generation = disk_->generation(id);
    c.dirty = false;
    ++stats_.write_backs;
    stats_.bytes_written += chunk_bytes_;
  }
  for (auto& [id, handle] : writes) {
    absl::StatusOr<uint64_t> written = handle.Wait();
    if (!written.ok()) {
      // The RAM copy is still the latest: keep it dirty so that it is written again.
      chunks_[id].dirty = true;
      NoteError(Annotate(written.status(), absl::StrCat("flushing chunk ", id)));
    }
  }
  NoteError(Annotate(disk_->Drain(), "flush"));
  absl::Status error = std::move(pending_error_);
  pending_error_ = absl::OkStatus();
  return error;
}

absl::Status TieredChunkStore::Read(int id, absl::Span<float> out) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "read"));
  if (static_cast<int64_t>(out.size()) != chunk_elements()) {
    return absl::InvalidArgumentError(absl::StrCat("tiered store: read of chunk ", id, " into ",
                                                   out.size(), " floats, the chunk holds ",
                                                   chunk_elements()));
  }
  ReapLoads();
  Chunk& c = chunks_[id];
  if (c.loading) {
    absl::Status loaded = FinishLoad(id);
    if (!loaded.ok()) return loaded;
  }
  if (c.data != nullptr) {
    std::memcpy(out.data(), c.data, static_cast<size_t>(chunk_bytes_));
    return absl::OkStatus();
  }
  if (!c.error.ok()) return c.error;
  if (c.generation == 0) {
    std::fill(out.begin(), out.end(), 0.0f);
    return absl::OkStatus();
  }
  SHOAL_RETURN_IF_ERROR(Annotate(disk_->Read(id, out.data(), chunk_bytes_, c.generation),
                                 absl::StrCat("reading chunk ", id)));
  stats_.bytes_read += chunk_bytes_;
  return absl::OkStatus();
}

absl::Status TieredChunkStore::Write(int id, absl::Span<const float> in) {
  SHOAL_RETURN_IF_ERROR(CheckId(id, "write"));
  if (static_cast<int64_t>(in.size()) != chunk_elements()) {
    return absl::InvalidArgumentError(absl::StrCat("tiered store: write of chunk ", id, " from ",
                                                   in.size(), " floats, the chunk holds ",
                                                   chunk_elements()));
  }
  ReapLoads();
  Chunk& c = chunks_[id];
  // A failed load leaves the chunk absent, and the write below replaces what it could not read.
  if (c.loading) (void)FinishLoad(id);
  c.error = absl::OkStatus();
  if (c.data != nullptr) {
    std::memcpy(c.data, in.data(), static_cast<size_t>(chunk_bytes_));
    c.dirty = true;
    return absl::OkStatus();
  }
  absl::StatusOr<uint64_t> written = disk_->Write(id, in.data(), chunk_bytes_);
  if (!written.ok()) return Annotate(written.status(), absl::StrCat("writing chunk ", id));
  c.generation = *written;
  stats_.bytes_written += chunk_bytes_;
  return absl::OkStatus();
}

absl::Status TieredChunkStore::ForEachChunk(
    const std::function<absl::Status(int id, absl::Span<const float> payload)>& visit) {
  for (int id = 0; id < num_chunks(); ++id) {
    ReapLoads();
    Chunk& c = chunks_[id];
    if (!c.error.ok()) return c.error;
    if (c.loading) {
      SHOAL_RETURN_IF_ERROR(FinishLoad(id));
    } else if (c.data == nullptr) {
      SHOAL_RETURN_IF_ERROR(AcquireAt(id, moment_));
    }
    // Nothing else runs on the caller's thread during the visit, so the chunk stays resident
    // without a pin.
    SHOAL_RETURN_IF_ERROR(
        visit(id, absl::Span<const float>(c.data, static_cast<size_t>(chunk_elements()))));
  }
  return absl::OkStatus();
}

}  // namespace shoal::memory
