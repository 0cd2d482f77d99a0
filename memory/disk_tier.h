// DiskTier: the slowest tier of the chunk manager (ALGORITHMS.md §3, §4): one file per worker
// under a directory the user gives (`memory.disk_path`), cut into fixed-size slots, one per chunk
// id, read and written asynchronously.
//
// The file is working storage, not a checkpoint: Open() always creates it afresh (a file left by
// an earlier run is replaced, never trusted) and, by default, the destructor deletes it. Durable
// state is the checkpoint's job.
//
// File layout (host byte order; the file never leaves the machine that wrote it):
//   [file header, kFileHeaderBytes]  magic, geometry, CRC32C of itself
//   [slot 0] [slot 1] ...            each kSlotStride-aligned, at SlotOffset(chunk_id):
//       slot header (kSlotHeaderBytes): magic, chunk id, generation, payload bytes,
//                                       CRC32C of the payload, CRC32C of the header itself
//       payload (up to slot_bytes)
// Every write of a chunk bumps its generation (1 for the first write). A read names the
// generation it expects and is checked against the header, so a torn write (header and payload
// from different writes, or a half-written payload) and a stale slot (a write that never reached
// the file) both fail with kDataLoss instead of returning wrong bytes.
//
// Asynchronous I/O: with liburing (compiled in when CMake finds it, and the kernel allows
// io_uring) operations go through one io_uring, fed by a submitting thread and drained by a
// reaping thread; otherwise, or with DiskIoBackend::kThreadPool, a small pool of threads runs
// pwritev/preadv. Either way WriteAsync/ReadAsync only queue: checksums are computed and
// verified on those threads, never on the caller's. Operations on the same chunk run one at a time in
// submission order (a read submitted after a write of that chunk sees the write); operations on
// different chunks overlap.
//
// Buffers: the caller owns them. `data` of a write and `out` of a read must stay alive and
// untouched until Wait() on the operation's handle returns, or until Drain() returns. Dropping a
// handle does not cancel or wait for the operation.
//
// Thread safety: every DiskTier method may be called from any thread concurrently. A handle is
// used by one thread at a time. Blocking calls: Wait(), Drain(), Write(), Read(), the destructor
// (which drains) and Open()/Inspect().
#ifndef SHOAL_MEMORY_DISK_TIER_H_
#define SHOAL_MEMORY_DISK_TIER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace shoal::memory {

enum class DiskIoBackend {
  kAuto,        // io_uring when compiled in and the kernel allows it, else the thread pool
  kIoUring,     // io_uring or Open() fails (kUnavailable)
  kThreadPool,  // pwritev/preadv on a pool of threads
};
const char* DiskIoBackendName(DiskIoBackend backend);

struct DiskTierOptions {
  std::string directory;          // where the file is made (created if missing); memory.disk_path
  int worker = 0;                 // the file is <directory>/shoal-disk-tier-<worker>.bin
  int64_t slot_bytes = 0;         // largest payload of one chunk (> 0)
  int64_t num_slots = 0;          // chunk ids are [0, num_slots) (> 0)
  int64_t budget_bytes = 0;       // the whole file, headers and padding included, must fit
  DiskIoBackend backend = DiskIoBackend::kAuto;
  int io_threads = 2;             // thread pool size (kThreadPool, or the kAuto fallback)
  int queue_depth = 64;           // io_uring: most operations in flight at once
  bool remove_on_close = true;    // delete the file in the destructor
};

// Running totals since Open(), for the memory profiler. Bytes are payload bytes.
struct DiskTierStats {
  int64_t bytes_written = 0;   // successful writes only
  int64_t bytes_read = 0;      // successful (verified) reads only
  int64_t writes = 0;
  int64_t reads = 0;
  int64_t failures = 0;        // operations that ended in an error, verification included
  double io_seconds = 0;       // sum over operations of start-to-completion time (overlaps add up)
  double wait_seconds = 0;     // time callers spent blocked in Wait() and Drain()
};

// What Inspect() finds in one slot.
struct DiskSlotReport {
  int64_t chunk_id = 0;
  bool valid = false;          // header and payload checksums hold, and the header names this slot
  uint64_t generation = 0;     // when valid
  int64_t payload_bytes = 0;   // when valid
  std::string problem;         // when not valid: "never written", "header checksum mismatch", ...
};

struct DiskTierReport {
  int64_t slot_bytes = 0;
  int64_t num_slots = 0;
  std::vector<DiskSlotReport> slots;  // one per slot, by chunk id
};

namespace internal {
struct DiskOp;
class DiskIoEngine;
struct DiskCounters;
}  // namespace internal

// A submitted write. Wait() blocks until it is on the file (in the page cache: no fsync, see
// disk_tier.cc) and returns the generation it wrote, or the error: kInvalidArgument / kOutOfRange
// for bad arguments (reported without any I/O), kResourceExhausted when the disk is full,
// kInternal / kDataLoss for I/O errors, each naming the file and chunk.
class DiskWriteHandle {
 public:
  DiskWriteHandle() = default;
  // May be called more than once; returns the same result. kFailedPrecondition on an empty handle.
  absl::StatusOr<uint64_t> Wait();
  bool done() const;  // Wait() would not block

 private:
  friend class DiskTier;
  explicit DiskWriteHandle(std::shared_ptr<internal::DiskOp> op) : op_(std::move(op)) {}
  std::shared_ptr<internal::DiskOp> op_;
};

// A submitted read. Wait() returns OK once `out` holds the verified payload, or:
// kDataLoss (torn write, stale or corrupted slot, truncated file: the message names the path,
// the chunk and what did not match; `out` then holds garbage), kFailedPrecondition (the chunk was
// never written, or its latest write has a different generation than the one asked for — the
// requested contents are gone, a caller bug rather than damage; no I/O is done), kOutOfRange /
// kInvalidArgument for bad arguments.
class DiskReadHandle {
 public:
  DiskReadHandle() = default;
  absl::Status Wait();
  bool done() const;

 private:
  friend class DiskTier;
  explicit DiskReadHandle(std::shared_ptr<internal::DiskOp> op) : op_(std::move(op)) {}
  std::shared_ptr<internal::DiskOp> op_;
};

class DiskTier {
 public:
  static constexpr int64_t kFileHeaderBytes = 4096;
  static constexpr int64_t kSlotHeaderBytes = 64;
  static constexpr int64_t kSlotAlignment = 4096;  // slots start on page boundaries

  // Creates the file afresh. Fails with kInvalidArgument for bad options; kResourceExhausted
  // (naming the path, the budget and the need) when the slots do not fit the budget, or when the
  // budget exceeds the free space of the file system; kUnavailable when kIoUring is asked for and
  // is not available; kInternal (naming the path) on a file system error.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);

  // Drains outstanding operations, closes the file and deletes it (unless !remove_on_close).
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Queues a write of `bytes` bytes at `data` to chunk `chunk_id`'s slot (replacing what was
  // there). Never blocks on I/O. See DiskWriteHandle for the results.
  DiskWriteHandle WriteAsync(int64_t chunk_id, const void* data, int64_t bytes);
  // Queues a read of chunk `chunk_id` into `out`: `bytes` must equal the size written and
  // `expected_generation` the generation that write returned. See DiskReadHandle.
  DiskReadHandle ReadAsync(int64_t chunk_id, void* out, int64_t bytes,
                           uint64_t expected_generation);

  // Blocking forms.
  absl::StatusOr<uint64_t> Write(int64_t chunk_id, const void* data, int64_t bytes) {
    return WriteAsync(chunk_id, data, bytes).Wait();
  }
  absl::Status Read(int64_t chunk_id, void* out, int64_t bytes, uint64_t expected_generation) {
    return ReadAsync(chunk_id, out, bytes, expected_generation).Wait();
  }

  // Waits until no operation is outstanding (those submitted meanwhile from other threads
  // included). Returns the first error of the operations that finished since the previous Drain()
  // (each error also stays on its handle), else OK.
  absl::Status Drain();

  // Generation of the latest write submitted for `chunk_id` (0: never written, or out of range).
  uint64_t generation(int64_t chunk_id) const;

  DiskTierStats stats() const;
  const std::string& path() const { return path_; }
  DiskIoBackend backend() const { return backend_; }  // kIoUring or kThreadPool, never kAuto
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t file_bytes() const { return FileBytes(slot_bytes_, num_slots_); }
  // Byte offset of chunk `chunk_id`'s slot header in the file; the payload follows it.
  int64_t SlotOffset(int64_t chunk_id) const { return SlotOffset(slot_bytes_, chunk_id); }

  // Geometry helpers: the distance between slots, the file size for a layout, and how many slots
  // of `slot_bytes` fit in `budget_bytes` (0 if none).
  static int64_t SlotStride(int64_t slot_bytes);
  static int64_t SlotOffset(int64_t slot_bytes, int64_t chunk_id);
  static int64_t FileBytes(int64_t slot_bytes, int64_t num_slots);
  static int64_t SlotsWithinBudget(int64_t slot_bytes, int64_t budget_bytes);

  // True when this binary was built with liburing.
  static bool IoUringCompiledIn();

  // Read-only check of a disk tier file (for instance one left by a killed process): for each
  // slot, whether its header and payload checksums hold and the header names that slot, with its
  // generation. `on_valid_payload`, if given, is called for every valid slot with its payload
  // (valid only during the call), so that a caller can compare contents. Does not modify the file
  // and needs no open DiskTier. kNotFound if the file is missing; kDataLoss if its file header is
  // damaged; slots cut off by a truncated file are reported invalid.
  using PayloadVisitor =
      std::function<void(int64_t chunk_id, uint64_t generation, const char* data, int64_t bytes)>;
  static absl::StatusOr<DiskTierReport> Inspect(const std::string& path,
                                                const PayloadVisitor& on_valid_payload = nullptr);

 private:
  DiskTier() = default;
  // Assigns a write its generation (or checks a read's) and queues the operation behind those of
  // the same chunk. An error means it was not queued.
  absl::Status Submit(const std::shared_ptr<internal::DiskOp>& op);
  // Ends an operation that never reached the engine.
  void FailNow(const std::shared_ptr<internal::DiskOp>& op, absl::Status status);
  // Called by the engine when an operation's transfer ended; verifies reads, finishes the
  // operation and starts the next one queued on the same chunk.
  void OnTransferDone(const std::shared_ptr<internal::DiskOp>& op, absl::Status transfer);
  absl::Status VerifyRead(const internal::DiskOp& op) const;

  std::string path_;
  int fd_ = -1;
  int64_t slot_bytes_ = 0;
  int64_t num_slots_ = 0;
  DiskIoBackend backend_ = DiskIoBackend::kThreadPool;
  bool remove_on_close_ = true;
  std::shared_ptr<internal::DiskCounters> counters_;
  std::unique_ptr<internal::DiskIoEngine> engine_;

  mutable std::mutex mu_;
  std::vector<uint64_t> generations_;  // by chunk id; guarded by mu_
  // Operations not yet finished, per chunk with any: the front one is running, the rest wait
  // for it (this is what keeps same-chunk operations in order). Guarded by mu_.
  std::unordered_map<int64_t, std::deque<std::shared_ptr<internal::DiskOp>>> queued_;
  int64_t outstanding_ = 0;            // guarded by mu_
  std::condition_variable drained_;
  absl::Status first_error_;           // since the last Drain(); guarded by mu_
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_DISK_TIER_H_
