#include "memory/disk_tier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "memory/checksum.h"

#if defined(SHOAL_HAVE_LIBURING)
#include <liburing.h>
#endif

// Why no O_DIRECT: it requires the buffer address, the file offset and the length of every
// transfer to be multiples of the device's logical block size. Chunk buffers belong to the caller
// (ATen allocations of any size), so O_DIRECT would need an aligned bounce buffer and one more copy
// of every chunk, and it would give up the page cache, which serves a chunk read back soon after it
// was evicted at memory speed while the machine has RAM to spare. Page-cache pages are
// reclaimable and not counted in the process's resident memory, so they do not break the host
// budget. Slots are still page-aligned so that O_DIRECT stays possible later.
//
// Why no fsync: the file is working storage for this run only. A killed process loses nothing
// that reached the page cache; a machine crash loses the run, which restarts from a checkpoint.

namespace shoal::memory {
namespace internal {

namespace {

constexpr uint64_t MagicOf(const char (&s)[9]) {
  uint64_t m = 0;
  for (int i = 7; i >= 0; --i) m = (m << 8) | static_cast<uint8_t>(s[i]);
  return m;
}

constexpr uint64_t kFileMagic = MagicOf("SHOALDTF");
constexpr uint64_t kSlotMagic = MagicOf("SHOALDTS");
constexpr uint32_t kFormatVersion = 1;

}  // namespace

// The first 64 bytes of the file (the rest of the first kFileHeaderBytes is zero).
struct FileHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t slot_header_bytes;
  int64_t slot_bytes;
  int64_t num_slots;
  int64_t slot_stride;
  int64_t first_slot_offset;
  uint8_t reserved[12];
  uint32_t header_crc;  // CRC32C of the bytes above
};
static_assert(sizeof(FileHeader) == 64, "file header layout");

// The header at the start of every slot; the payload follows it.
struct SlotHeader {
  uint64_t magic;
  int64_t chunk_id;
  uint64_t generation;
  int64_t payload_bytes;
  uint32_t payload_crc;
  uint32_t version;
  uint8_t reserved[20];
  uint32_t header_crc;  // CRC32C of the bytes above
};
static_assert(sizeof(SlotHeader) == DiskTier::kSlotHeaderBytes, "slot header layout");

constexpr size_t kCrcCovered = offsetof(SlotHeader, header_crc);
static_assert(offsetof(FileHeader, header_crc) == kCrcCovered, "both headers end in their CRC");

struct DiskCounters {
  std::atomic<int64_t> bytes_written{0};
  std::atomic<int64_t> bytes_read{0};
  std::atomic<int64_t> writes{0};
  std::atomic<int64_t> reads{0};
  std::atomic<int64_t> failures{0};
  std::atomic<int64_t> io_nanos{0};
  std::atomic<int64_t> wait_nanos{0};
};

// One read or write, shared by its handle, the tier's per-chunk queue and the I/O engine.
struct DiskOp {
  enum class Kind { kWrite, kRead };

  Kind kind = Kind::kWrite;
  int64_t chunk_id = 0;
  uint64_t generation = 0;  // write: assigned at submission; read: the one expected
  char* payload = nullptr;  // the caller's buffer (read-only for writes)
  int64_t bytes = 0;
  SlotHeader header{};      // write: what goes to the file; read: what came from it

  // Transfer state: header and payload as one vectored transfer starting at `offset`; both
  // advance as bytes move, so a short transfer resumes where it stopped.
  int64_t offset = 0;
  iovec iov[2]{};
  int iov_first = 0;
  std::chrono::steady_clock::time_point started;

  std::shared_ptr<DiskCounters> counters;
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;  // guarded by mu
  absl::Status status;    // guarded by mu; set once, with finished

  // One vectored transfer, header then payload, rather than the payload first and the header in
  // a second write: the header's checksum covers the payload's checksum, so any mix of bytes from
  // two writes fails verification whichever order they reached the file in (and the page cache
  // writes pages back in any order anyway). One transfer costs one syscall or ring entry.
  void SetUpTransfer(int64_t slot_offset) {
    offset = slot_offset;
    iov[0] = {&header, sizeof(SlotHeader)};
    iov[1] = {payload, static_cast<size_t>(bytes)};
    iov_first = 0;
  }
  int64_t Remaining() const {
    int64_t n = 0;
    for (int i = iov_first; i < 2; ++i) n += static_cast<int64_t>(iov[i].iov_len);
    return n;
  }
  void Advance(int64_t n) {
    offset += n;
    while (n > 0 && iov_first < 2) {
      iovec& v = iov[iov_first];
      const size_t take = std::min<size_t>(static_cast<size_t>(n), v.iov_len);
      v.iov_base = static_cast<char*>(v.iov_base) + take;
      v.iov_len -= take;
      n -= static_cast<int64_t>(take);
      if (v.iov_len == 0) ++iov_first;
    }
    while (iov_first < 2 && iov[iov_first].iov_len == 0) ++iov_first;
  }
  int iov_count() const { return 2 - iov_first; }

  void Finish(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = std::move(s);
    finished = true;
    cv.notify_all();
  }
  bool IsFinished() {
    std::lock_guard<std::mutex> lock(mu);
    return finished;
  }
  absl::Status WaitFinished() {
    std::unique_lock<std::mutex> lock(mu);
    if (!finished) {
      const auto t0 = std::chrono::steady_clock::now();
      cv.wait(lock, [this] { return finished; });
      counters->wait_nanos += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now() - t0)
                                  .count();
    }
    return status;
  }
};

namespace {

// Fills in the checksums of a write's header. Runs on an engine thread, never on the caller of
// WriteAsync: the CRC of a 64 MiB chunk takes ~7 ms with SSE4.2 (~9 GB/s on this AMD EPYC VM)
// and ~35 ms with the portable tables (~1.9 GB/s).
void SealWrite(DiskOp& op) {
  op.header.payload_crc = Crc32c(op.payload, static_cast<size_t>(op.bytes));
  op.header.header_crc = Crc32c(&op.header, kCrcCovered);
}

absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(msg);
    case EIO:
      return absl::DataLossError(msg);
    default:
      return absl::InternalError(msg);
  }
}

std::string OpWhat(const std::string& path, const DiskOp& op) {
  return absl::StrCat("disk tier ", path, ": ", op.kind == DiskOp::Kind::kWrite ? "write" : "read",
                      " of chunk ", op.chunk_id, " at offset ", op.offset);
}

// A transfer that moved no bytes: end of file for a read (the file was truncated under us).
absl::Status NothingMoved(const std::string& path, const DiskOp& op) {
  if (op.kind == DiskOp::Kind::kRead) {
    return absl::DataLossError(absl::StrCat(OpWhat(path, op),
                                            ": the file ends there (truncated?); ",
                                            op.Remaining(), " bytes of the slot are missing"));
  }
  return absl::InternalError(absl::StrCat(OpWhat(path, op), ": the kernel wrote 0 bytes"));
}

std::string Bytes(int64_t n) {
  return absl::StrFormat("%d bytes (%.2f MiB)", n, static_cast<double>(n) / (1 << 20));
}

bool AllZero(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  return std::all_of(b, b + n, [](uint8_t x) { return x == 0; });
}

// The problem with a slot header read from slot `chunk_id`, or "" if it is sound.
std::string SlotHeaderProblem(const SlotHeader& h, int64_t chunk_id, int64_t slot_bytes) {
  if (Crc32c(&h, kCrcCovered) != h.header_crc) {
    return AllZero(&h, sizeof(h)) ? "the slot was never written (header is all zeros)"
                                  : "header checksum mismatch (torn write or corruption)";
  }
  if (h.magic != kSlotMagic) return "bad slot magic";
  if (h.version != kFormatVersion) return absl::StrCat("unknown slot format version ", h.version);
  if (h.chunk_id != chunk_id) return absl::StrCat("the header names chunk ", h.chunk_id);
  if (h.payload_bytes < 0 || h.payload_bytes > slot_bytes) {
    return absl::StrCat("the header claims ", h.payload_bytes, " payload bytes, over the slot size ",
                        slot_bytes);
  }
  return "";
}

}  // namespace

// Runs transfers; calls `done` (on one of its threads) when an operation's transfer has ended.
class DiskIoEngine {
 public:
  using Done = std::function<void(const std::shared_ptr<DiskOp>&, absl::Status)>;
  virtual ~DiskIoEngine() = default;
  virtual void Start(std::shared_ptr<DiskOp> op) = 0;
};

namespace {

// The portable engine: a few threads each running blocking pwritev/preadv.
class ThreadPoolEngine final : public DiskIoEngine {
 public:
  ThreadPoolEngine(int fd, std::string path, int threads, Done done)
      : fd_(fd), path_(std::move(path)), done_(std::move(done)) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~ThreadPoolEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Start(std::shared_ptr<DiskOp> op) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_.push_back(std::move(op));
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    for (;;) {
      std::shared_ptr<DiskOp> op;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !ready_.empty(); });
        if (ready_.empty()) return;  // stopping, and nothing left
        op = std::move(ready_.front());
        ready_.pop_front();
      }
      if (op->kind == DiskOp::Kind::kWrite) SealWrite(*op);
      absl::Status status = Transfer(*op);
      done_(op, std::move(status));
    }
  }

  absl::Status Transfer(DiskOp& op) {
    while (op.Remaining() > 0) {
      const ssize_t n = op.kind == DiskOp::Kind::kWrite
                            ? ::pwritev(fd_, op.iov + op.iov_first, op.iov_count(), op.offset)
                            : ::preadv(fd_, op.iov + op.iov_first, op.iov_count(), op.offset);
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus(errno, OpWhat(path_, op));
      }
      if (n == 0) return NothingMoved(path_, op);
      op.Advance(n);
    }
    return absl::OkStatus();
  }

  const int fd_;
  const std::string path_;
  const Done done_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<DiskOp>> ready_;  // guarded by mu_
  bool stop_ = false;                          // guarded by mu_
  std::vector<std::thread> threads_;
};

#if defined(SHOAL_HAVE_LIBURING)
// io_uring with two threads of its own, so that WriteAsync/ReadAsync only queue: a submitter
// seals writes (their CRC) and fills the ring, a reaper takes completions (and verifies reads, in
// the tier's callback). liburing allows one submitting and one reaping thread on a ring at once;
// mu_ serialises submission (the reaper resubmits short transfers too). Entries carry
// IOSQE_ASYNC: buffered file I/O would otherwise be copied inline, serially, inside the
// submitter's io_uring_enter; with it the kernel's io-wq workers copy in parallel. At most `depth`
// operations are in the ring; the rest wait in backlog_, so the submission queue always has a
// free entry and the completion queue (twice as large) never overflows.
class IoUringEngine final : public DiskIoEngine {
 public:
  static absl::StatusOr<std::unique_ptr<IoUringEngine>> Create(int fd, std::string path,
                                                               int depth, Done done) {
    std::unique_ptr<IoUringEngine> engine(
        new IoUringEngine(fd, std::move(path), depth, std::move(done)));
    const int rc = io_uring_queue_init(static_cast<unsigned>(depth), &engine->ring_, 0);
    if (rc < 0) {
      return absl::UnavailableError(
          absl::StrCat("io_uring_queue_init(", depth, ") failed: ", std::strerror(-rc)));
    }
    engine->ring_ready_ = true;
    engine->reaper_ = std::thread([e = engine.get()] { e->Reap(); });
    engine->submitter_ = std::thread([e = engine.get()] { e->SubmitLoop(); });
    return engine;
  }

  ~IoUringEngine() override {
    if (!ring_ready_) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    submitter_.join();
    {
      // A no-op whose completion (with no operation attached) tells the reaper to stop. The tier
      // has drained before destroying the engine, so nothing else is in flight.
      std::lock_guard<std::mutex> lock(mu_);
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      SubmitQueued();
    }
    reaper_.join();
    io_uring_queue_exit(&ring_);
  }

  void Start(std::shared_ptr<DiskOp> op) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      backlog_.push_back(std::move(op));
    }
    cv_.notify_one();
  }

 private:
  IoUringEngine(int fd, std::string path, int depth, Done done)
      : fd_(fd), path_(std::move(path)), depth_(depth), done_(std::move(done)) {}

  void SubmitLoop() {
    for (;;) {
      std::shared_ptr<DiskOp> op;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || (!backlog_.empty() && in_flight_ < depth_); });
        if (backlog_.empty() || in_flight_ >= depth_) return;  // stopping (the tier drained)
        op = std::move(backlog_.front());
        backlog_.pop_front();
        ++in_flight_;  // reserves the ring entry while the write is sealed outside the lock
      }
      if (op->kind == DiskOp::Kind::kWrite) SealWrite(*op);
      std::lock_guard<std::mutex> lock(mu_);
      SubmitLocked(std::move(op));
    }
  }

  // REQUIRES: mu_ held, a ring entry reserved in in_flight_.
  void SubmitLocked(std::shared_ptr<DiskOp> op) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) Fatal("no free submission entry (in-flight bookkeeping is wrong)", 0);
    // The ring carries a heap-held reference, so the operation outlives its handle if need be.
    auto* ref = new std::shared_ptr<DiskOp>(std::move(op));
    DiskOp& o = **ref;
    if (o.kind == DiskOp::Kind::kWrite) {
      io_uring_prep_writev(sqe, fd_, o.iov + o.iov_first, o.iov_count(), o.offset);
    } else {
      io_uring_prep_readv(sqe, fd_, o.iov + o.iov_first, o.iov_count(), o.offset);
    }
    io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
    io_uring_sqe_set_data(sqe, ref);
    SubmitQueued();
  }

  // REQUIRES: mu_ held.
  void SubmitQueued() {
    for (;;) {
      const int rc = io_uring_submit(&ring_);
      if (rc >= 0) return;
      // Transient: the entry stays queued and goes in with the retry.
      if (rc == -EINTR || rc == -EAGAIN) {
        std::this_thread::yield();
        continue;
      }
      Fatal("io_uring_submit failed", -rc);
    }
  }

  // A ring that cannot take submissions leaves operations that will never complete; callers
  // would hang in Wait(). That cannot happen with the depth bookkeeping above, so stop loudly.
  [[noreturn]] void Fatal(const char* what, int err) {
    SHOAL_LOG(Error) << "disk tier " << path_ << ": " << what
                     << (err != 0 ? absl::StrCat(": ", std::strerror(err)) : "");
    std::abort();
  }

  void Reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(&ring_, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) Fatal("io_uring_wait_cqe failed", -rc);
      void* data = io_uring_cqe_get_data(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (data == nullptr) return;  // the stop no-op

      // Everything below runs under mu_, which the submitter held while it filled the entry: the
      // kernel orders the two threads, but taking the lock makes that order visible to tools
      // such as ThreadSanitizer, at no cost worth measuring.
      std::shared_ptr<DiskOp> op;
      absl::Status status;
      bool resubmit = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        {
          std::unique_ptr<std::shared_ptr<DiskOp>> ref(static_cast<std::shared_ptr<DiskOp>*>(data));
          op = std::move(*ref);
        }
        if (res == -EINTR || res == -EAGAIN) {
          resubmit = true;
        } else if (res < 0) {
          status = ErrnoStatus(-res, OpWhat(path_, *op));
        } else if (res == 0) {
          status = NothingMoved(path_, *op);
        } else {
          op->Advance(res);
          resubmit = op->Remaining() > 0;  // short transfer: continue where it stopped
        }
        if (resubmit) {
          SubmitLocked(op);  // keeps its ring entry
        } else {
          --in_flight_;
        }
      }
      if (!resubmit) {
        cv_.notify_one();  // a ring entry is free for the submitter
        done_(op, std::move(status));
      }
    }
  }

  const int fd_;
  const std::string path_;
  const int depth_;
  const Done done_;
  io_uring ring_{};
  bool ring_ready_ = false;
  std::thread reaper_;
  std::thread submitter_;
  std::mutex mu_;  // guards the submission side of ring_, in_flight_, backlog_, stop_
  std::condition_variable cv_;
  int in_flight_ = 0;  // ring entries in use or reserved
  std::deque<std::shared_ptr<DiskOp>> backlog_;
  bool stop_ = false;
};
#endif  // SHOAL_HAVE_LIBURING

}  // namespace
}  // namespace internal

using internal::Bytes;
using internal::DiskOp;
using internal::ErrnoStatus;
using internal::FileHeader;
using internal::SlotHeader;

namespace {
absl::Status ErrnoStatusForPath(const char* what, const std::string& path) {
  return ErrnoStatus(errno, absl::StrCat(what, " ", path));
}
}  // namespace

const char* DiskIoBackendName(DiskIoBackend backend) {
  switch (backend) {
    case DiskIoBackend::kAuto:
      return "auto";
    case DiskIoBackend::kIoUring:
      return "io_uring";
    case DiskIoBackend::kThreadPool:
      return "thread pool";
  }
  return "?";
}

// ---- handles ----

absl::StatusOr<uint64_t> DiskWriteHandle::Wait() {
  if (op_ == nullptr) return absl::FailedPreconditionError("Wait() on an empty DiskWriteHandle");
  absl::Status s = op_->WaitFinished();
  if (!s.ok()) return s;
  return op_->generation;
}
bool DiskWriteHandle::done() const { return op_ == nullptr || op_->IsFinished(); }

absl::Status DiskReadHandle::Wait() {
  if (op_ == nullptr) return absl::FailedPreconditionError("Wait() on an empty DiskReadHandle");
  return op_->WaitFinished();
}
bool DiskReadHandle::done() const { return op_ == nullptr || op_->IsFinished(); }

// ---- geometry ----

int64_t DiskTier::SlotStride(int64_t slot_bytes) {
  const int64_t raw = kSlotHeaderBytes + slot_bytes;
  return (raw + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
}
int64_t DiskTier::SlotOffset(int64_t slot_bytes, int64_t chunk_id) {
  return kFileHeaderBytes + chunk_id * SlotStride(slot_bytes);
}
int64_t DiskTier::FileBytes(int64_t slot_bytes, int64_t num_slots) {
  return kFileHeaderBytes + num_slots * SlotStride(slot_bytes);
}
int64_t DiskTier::SlotsWithinBudget(int64_t slot_bytes, int64_t budget_bytes) {
  if (slot_bytes <= 0 || budget_bytes < kFileHeaderBytes) return 0;
  return (budget_bytes - kFileHeaderBytes) / SlotStride(slot_bytes);
}

bool DiskTier::IoUringCompiledIn() {
#if defined(SHOAL_HAVE_LIBURING)
  return true;
#else
  return false;
#endif
}

// ---- open / close ----

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  if (options.directory.empty()) {
    return absl::InvalidArgumentError("disk tier: no directory given (memory.disk_path)");
  }
  if (options.slot_bytes <= 0 || options.num_slots <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("disk tier: slot_bytes (", options.slot_bytes,
                                                   ") and num_slots (", options.num_slots,
                                                   ") must be positive"));
  }
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  if (options.slot_bytes > kMax / 2 ||
      options.num_slots > (kMax - kFileHeaderBytes) / SlotStride(options.slot_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("disk tier: ", options.num_slots, " slots of ",
                                                   options.slot_bytes, " bytes overflow a file"));
  }
  if (options.io_threads < 1 || options.queue_depth < 1 || options.queue_depth > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk tier: io_threads (", options.io_threads, ") must be >= 1 and "
                     "queue_depth (", options.queue_depth, ") in [1, 4096]"));
  }
  const std::string path =
      absl::StrCat(options.directory, "/shoal-disk-tier-", options.worker, ".bin");
  const int64_t need = FileBytes(options.slot_bytes, options.num_slots);
  if (need > options.budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "disk tier ", path, ": ", options.num_slots, " chunk slots of ", options.slot_bytes,
        " bytes need ", Bytes(need), " with headers, over the disk budget of ",
        Bytes(options.budget_bytes), " (memory.disk_budget)"));
  }

  SHOAL_RETURN_IF_ERROR(MakeDirs(options.directory));
  // A file of an earlier run is never reused: its slots may be torn, and its generations mean
  // nothing to this run.
  if (IsDirectory(path)) {
    return absl::InvalidArgumentError(absl::StrCat("disk tier ", path, " is a directory"));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoStatusForPath("cannot remove the previous disk tier file", path);
  }
  struct statvfs fs {};
  if (::statvfs(options.directory.c_str(), &fs) != 0) {
    return ErrnoStatusForPath("statvfs failed on", options.directory);
  }
  const int64_t free_bytes =
      static_cast<int64_t>(fs.f_bavail) * static_cast<int64_t>(fs.f_frsize);
  if (options.budget_bytes > free_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "disk tier ", path, ": the disk budget of ", Bytes(options.budget_bytes),
        " (memory.disk_budget) exceeds the ", Bytes(free_bytes),
        " free on the file system of ", options.directory));
  }

  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatusForPath("cannot create the disk tier file", path);
  std::unique_ptr<DiskTier> tier(new DiskTier());
  tier->path_ = path;
  tier->fd_ = fd;
  tier->slot_bytes_ = options.slot_bytes;
  tier->num_slots_ = options.num_slots;
  tier->remove_on_close_ = options.remove_on_close;
  tier->counters_ = std::make_shared<internal::DiskCounters>();
  tier->generations_.assign(static_cast<size_t>(options.num_slots), 0);

  // Reserve the blocks now, so that a full disk shows up here rather than as a failed eviction
  // in the middle of a step. Unreserved space reads as zeros: a never-written slot has an
  // all-zero header, which fails its checksum.
  if (::fallocate(fd, 0, 0, need) != 0) {
    if (errno != EOPNOTSUPP && errno != ENOSYS) {
      return ErrnoStatus(errno, absl::StrCat("disk tier ", path, ": cannot reserve ", Bytes(need)));
    }
    if (::ftruncate(fd, need) != 0) {
      return ErrnoStatus(errno, absl::StrCat("disk tier ", path, ": cannot size to ", Bytes(need)));
    }
  }
  FileHeader fh{};
  fh.magic = internal::kFileMagic;
  fh.version = internal::kFormatVersion;
  fh.slot_header_bytes = kSlotHeaderBytes;
  fh.slot_bytes = options.slot_bytes;
  fh.num_slots = options.num_slots;
  fh.slot_stride = SlotStride(options.slot_bytes);
  fh.first_slot_offset = kFileHeaderBytes;
  fh.header_crc = Crc32c(&fh, internal::kCrcCovered);
  if (::pwrite(fd, &fh, sizeof(fh), 0) != static_cast<ssize_t>(sizeof(fh))) {
    return ErrnoStatus(errno, absl::StrCat("disk tier ", path, ": cannot write the file header"));
  }

  DiskTier* raw = tier.get();
  internal::DiskIoEngine::Done done = [raw](const std::shared_ptr<DiskOp>& op, absl::Status s) {
    raw->OnTransferDone(op, std::move(s));
  };
  absl::Status uring_status = absl::UnavailableError("liburing was not found at build time");
#if defined(SHOAL_HAVE_LIBURING)
  if (options.backend != DiskIoBackend::kThreadPool) {
    auto engine = internal::IoUringEngine::Create(fd, path, options.queue_depth, done);
    if (engine.ok()) {
      tier->engine_ = std::move(engine).value();
      tier->backend_ = DiskIoBackend::kIoUring;
    } else {
      uring_status = engine.status();
    }
  }
#endif
  if (tier->engine_ == nullptr) {
    if (options.backend == DiskIoBackend::kIoUring) {
      return absl::UnavailableError(
          absl::StrCat("disk tier ", path, ": io_uring asked for but unavailable: ",
                       uring_status.message()));
    }
    if (options.backend == DiskIoBackend::kAuto && IoUringCompiledIn()) {
      SHOAL_LOG(Info) << "disk tier " << path << ": io_uring unavailable ("
                      << uring_status.message() << "); using " << options.io_threads
                      << " I/O threads";
    }
    tier->engine_ = std::make_unique<internal::ThreadPoolEngine>(fd, path, options.io_threads,
                                                                 std::move(done));
    tier->backend_ = DiskIoBackend::kThreadPool;
  }
  return tier;
}

DiskTier::~DiskTier() {
  (void)Drain();
  engine_.reset();  // joins the I/O threads before the state they call back into goes away
  if (fd_ >= 0) ::close(fd_);
  if (remove_on_close_ && !path_.empty()) ::unlink(path_.c_str());
}

// ---- submission ----

namespace {

absl::Status CheckRequest(const std::string& path, int64_t num_slots, int64_t slot_bytes,
                          const char* what, int64_t chunk_id, const void* buffer, int64_t bytes) {
  if (chunk_id < 0 || chunk_id >= num_slots) {
    return absl::OutOfRangeError(absl::StrCat("disk tier ", path, ": ", what, " of chunk ",
                                              chunk_id, ": chunk id out of range [0, ", num_slots,
                                              ")"));
  }
  if (bytes < 0 || bytes > slot_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("disk tier ", path, ": ", what, " of chunk ",
                                                   chunk_id, ": ", bytes,
                                                   " bytes do not fit a slot of ", slot_bytes,
                                                   " bytes"));
  }
  if (buffer == nullptr && bytes > 0) {
    return absl::InvalidArgumentError(absl::StrCat("disk tier ", path, ": ", what, " of chunk ",
                                                   chunk_id, ": null buffer"));
  }
  return absl::OkStatus();
}

}  // namespace

DiskWriteHandle DiskTier::WriteAsync(int64_t chunk_id, const void* data, int64_t bytes) {
  auto op = std::make_shared<DiskOp>();
  op->kind = DiskOp::Kind::kWrite;
  op->chunk_id = chunk_id;
  op->bytes = bytes;
  op->counters = counters_;
  absl::Status s =
      CheckRequest(path_, num_slots_, slot_bytes_, "write", chunk_id, data, bytes);
  if (s.ok()) {
    // The payload is only read; the iovec type is what forces the cast.
    op->payload = const_cast<char*>(static_cast<const char*>(data));
    op->header.magic = internal::kSlotMagic;
    op->header.chunk_id = chunk_id;
    op->header.payload_bytes = bytes;
    op->header.version = internal::kFormatVersion;
    op->SetUpTransfer(SlotOffset(chunk_id));
    s = Submit(op);
  }
  if (!s.ok()) FailNow(op, std::move(s));
  return DiskWriteHandle(std::move(op));
}

DiskReadHandle DiskTier::ReadAsync(int64_t chunk_id, void* out, int64_t bytes,
                                   uint64_t expected_generation) {
  auto op = std::make_shared<DiskOp>();
  op->kind = DiskOp::Kind::kRead;
  op->chunk_id = chunk_id;
  op->bytes = bytes;
  op->generation = expected_generation;
  op->counters = counters_;
  absl::Status s = CheckRequest(path_, num_slots_, slot_bytes_, "read", chunk_id, out, bytes);
  if (s.ok()) {
    op->payload = static_cast<char*>(out);
    op->SetUpTransfer(SlotOffset(chunk_id));
    s = Submit(op);
  }
  if (!s.ok()) FailNow(op, std::move(s));
  return DiskReadHandle(std::move(op));
}

absl::Status DiskTier::Submit(const std::shared_ptr<DiskOp>& op) {
  bool start_now = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t& latest = generations_[static_cast<size_t>(op->chunk_id)];
    if (op->kind == DiskOp::Kind::kWrite) {
      // Assigned under the same lock that queues the operation, so generations follow
      // submission order.
      op->generation = ++latest;
      op->header.generation = op->generation;
    } else if (op->generation != latest) {
      // The caller asks for contents that no later write has kept: a bookkeeping bug on its side,
      // not damage on disk, so kFailedPrecondition (a mismatch found on disk is kDataLoss).
      return absl::FailedPreconditionError(
          latest == 0
              ? absl::StrCat("disk tier ", path_, ": read of chunk ", op->chunk_id,
                             " expecting generation ", op->generation,
                             ": the chunk was never written")
              : absl::StrCat("disk tier ", path_, ": read of chunk ", op->chunk_id,
                             " expecting generation ", op->generation,
                             ": the latest write of it is generation ", latest));
    }
    ++outstanding_;
    auto& queue = queued_[op->chunk_id];
    queue.push_back(op);
    start_now = queue.size() == 1;
  }
  if (start_now) {
    op->started = std::chrono::steady_clock::now();
    engine_->Start(op);
  }
  return absl::OkStatus();
}

void DiskTier::FailNow(const std::shared_ptr<DiskOp>& op, absl::Status status) {
  ++counters_->failures;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_error_.ok()) first_error_ = status;
  }
  op->Finish(std::move(status));
}

void DiskTier::OnTransferDone(const std::shared_ptr<DiskOp>& op, absl::Status transfer) {
  absl::Status status = std::move(transfer);
  if (status.ok() && op->kind == DiskOp::Kind::kRead) status = VerifyRead(*op);

  internal::DiskCounters& c = *counters_;
  c.io_nanos += std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now() - op->started)
                    .count();
  if (!status.ok()) {
    ++c.failures;
  } else if (op->kind == DiskOp::Kind::kWrite) {
    ++c.writes;
    c.bytes_written += op->bytes;
  } else {
    ++c.reads;
    c.bytes_read += op->bytes;
  }

  std::shared_ptr<DiskOp> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status.ok() && first_error_.ok()) first_error_ = status;
    auto it = queued_.find(op->chunk_id);
    it->second.pop_front();
    if (it->second.empty()) {
      queued_.erase(it);
    } else {
      next = it->second.front();
    }
  }
  op->Finish(std::move(status));
  if (next != nullptr) {
    next->started = std::chrono::steady_clock::now();
    engine_->Start(next);
  }
  // Last: once outstanding_ reaches 0 the destructor may run, so nothing of `this` is touched
  // after the unlock.
  std::lock_guard<std::mutex> lock(mu_);
  if (--outstanding_ == 0) drained_.notify_all();
}

absl::Status DiskTier::VerifyRead(const DiskOp& op) const {
  auto fail = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("disk tier ", path_, ": chunk ", op.chunk_id,
                                            " (generation ", op.generation, ", ", op.bytes,
                                            " bytes): ", what));
  };
  const SlotHeader& h = op.header;
  const std::string problem = internal::SlotHeaderProblem(h, op.chunk_id, slot_bytes_);
  if (!problem.empty()) return fail(problem);
  if (h.generation != op.generation) {
    return fail(absl::StrCat("the slot holds generation ", h.generation,
                             " (a write was lost, torn or is stale)"));
  }
  if (h.payload_bytes != op.bytes) {
    return fail(absl::StrCat("the slot holds ", h.payload_bytes, " payload bytes"));
  }
  const uint32_t crc = Crc32c(op.payload, static_cast<size_t>(op.bytes));
  if (crc != h.payload_crc) {
    return fail(absl::StrFormat("payload checksum mismatch: stored %08x, computed %08x",
                                h.payload_crc, crc));
  }
  return absl::OkStatus();
}

absl::Status DiskTier::Drain() {
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  drained_.wait(lock, [this] { return outstanding_ == 0; });
  counters_->wait_nanos += std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::steady_clock::now() - t0)
                               .count();
  absl::Status first = std::move(first_error_);
  first_error_ = absl::OkStatus();
  return first;
}

uint64_t DiskTier::generation(int64_t chunk_id) const {
  if (chunk_id < 0 || chunk_id >= num_slots_) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  return generations_[static_cast<size_t>(chunk_id)];
}

DiskTierStats DiskTier::stats() const {
  const internal::DiskCounters& c = *counters_;
  DiskTierStats s;
  s.bytes_written = c.bytes_written;
  s.bytes_read = c.bytes_read;
  s.writes = c.writes;
  s.reads = c.reads;
  s.failures = c.failures;
  s.io_seconds = static_cast<double>(c.io_nanos) * 1e-9;
  s.wait_seconds = static_cast<double>(c.wait_nanos) * 1e-9;
  return s;
}

// ---- inspection ----

namespace {

// Reads exactly `n` bytes at `offset`; returns how many were there before the end of the file.
absl::StatusOr<int64_t> PreadFull(int fd, void* buf, int64_t n, int64_t offset,
                                  const std::string& path) {
  int64_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, static_cast<char*>(buf) + got, static_cast<size_t>(n - got),
                              offset + got);
    if (r < 0) {
      if (errno == EINTR) continue;
      return internal::ErrnoStatus(errno, absl::StrCat("disk tier ", path, ": pread at ",
                                                       offset + got));
    }
    if (r == 0) break;
    got += r;
  }
  return got;
}

}  // namespace

absl::StatusOr<DiskTierReport> DiskTier::Inspect(const std::string& path,
                                                 const PayloadVisitor& on_valid_payload) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("disk tier ", path, " not found"));
    return ErrnoStatusForPath("cannot open", path);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};

  FileHeader fh{};
  int64_t got = 0;
  {
    SHOAL_ASSIGN_OR_RETURN(got, PreadFull(fd, &fh, sizeof(fh), 0, path));
  }
  if (got != static_cast<int64_t>(sizeof(fh)) || Crc32c(&fh, internal::kCrcCovered) !=
                                                     fh.header_crc ||
      fh.magic != internal::kFileMagic) {
    return absl::DataLossError(
        absl::StrCat("disk tier ", path, ": no valid file header (not a disk tier file?)"));
  }
  if (fh.version != internal::kFormatVersion || fh.slot_header_bytes != kSlotHeaderBytes ||
      fh.slot_bytes <= 0 || fh.num_slots <= 0 || fh.slot_stride != SlotStride(fh.slot_bytes) ||
      fh.first_slot_offset != kFileHeaderBytes) {
    return absl::DataLossError(absl::StrCat("disk tier ", path, ": unexpected file geometry"));
  }

  DiskTierReport report;
  report.slot_bytes = fh.slot_bytes;
  report.num_slots = fh.num_slots;
  report.slots.resize(static_cast<size_t>(fh.num_slots));
  std::vector<char> payload(static_cast<size_t>(fh.slot_bytes));
  for (int64_t id = 0; id < fh.num_slots; ++id) {
    DiskSlotReport& slot = report.slots[static_cast<size_t>(id)];
    slot.chunk_id = id;
    const int64_t offset = SlotOffset(fh.slot_bytes, id);
    SlotHeader h{};
    {
      SHOAL_ASSIGN_OR_RETURN(got, PreadFull(fd, &h, sizeof(h), offset, path));
    }
    if (got != static_cast<int64_t>(sizeof(h))) {
      slot.problem = "the file ends inside the slot header (truncated)";
      continue;
    }
    slot.problem = internal::SlotHeaderProblem(h, id, fh.slot_bytes);
    if (!slot.problem.empty()) continue;
    {
      SHOAL_ASSIGN_OR_RETURN(
          got, PreadFull(fd, payload.data(), h.payload_bytes, offset + kSlotHeaderBytes, path));
    }
    if (got != h.payload_bytes) {
      slot.problem = "the file ends inside the payload (truncated)";
      continue;
    }
    if (Crc32c(payload.data(), static_cast<size_t>(h.payload_bytes)) != h.payload_crc) {
      slot.problem = "payload checksum mismatch (torn write or corruption)";
      continue;
    }
    slot.valid = true;
    slot.generation = h.generation;
    slot.payload_bytes = h.payload_bytes;
    if (on_valid_payload) on_valid_payload(id, h.generation, payload.data(), h.payload_bytes);
  }
  return report;
}

}  // namespace shoal::memory
