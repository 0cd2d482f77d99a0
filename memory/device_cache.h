// The device tier (issue 7): chunks whose homes are in host memory, made resident in a fixed
// number of device slots (device budget / chunk bytes) ahead of use, evicted by the
// farthest-next-use rule once a warm-up trace is known, written back only when dirty.
//
// The cache decides *which* chunk goes *where* and *when*; a DeviceBackend owns the fast memory
// and three queues: an in queue (host -> device copies, in order), an out queue (device -> host,
// in order; separate, so that write-backs and loads use both directions of the link at once) and
// the compute queue the caller's kernels run on. Per slot, events order them without blocking
// the host:
//   ready[s]    recorded on the in queue after a chunk's copy into slot s; the compute queue
//               waits for it before the first kernel that uses the chunk (Acquire);
//   released[s] recorded on the compute queue when the caller releases the chunk; the out queue
//               waits for it before copying the slot out, the in queue before overwriting it;
//   written[s]  recorded on the out queue after a write-back from slot s; the in queue waits for
//               it before overwriting the slot, or before reloading that chunk from its home.
// So a prefetch overlaps compute, and no transfer races a kernel or another transfer.
//
// Backends: CudaDeviceBackend (memory/cuda_backend.h: cudaMalloc'd slots, a non-blocking copy
// stream, CUDA events; built where the CUDA toolkit is) and HostDeviceBackend below (the "device"
// is host memory, copies are memcpy, events are no-ops), which runs the same cache on a machine
// without a GPU.
//
// Budget: the slots are one allocation of capacity * chunk_bytes <= budget_bytes, made at Create;
// the cache never allocates device memory again, so device bytes for chunks never exceed the
// budget. Not thread-safe: one thread drives a cache.
#ifndef SHOAL_MEMORY_DEVICE_CACHE_H_
#define SHOAL_MEMORY_DEVICE_CACHE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "memory/eviction.h"

namespace shoal::memory {

// The fast memory and its three queues. Every call may fail with a status naming the backend call.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual std::string name() const = 0;
  // Makes `num_events` events (0 .. num_events-1) and one allocation of `bytes` of fast memory.
  virtual absl::StatusOr<void*> Allocate(int64_t bytes, int num_events) = 0;
  // Host -> device on the in queue, device -> host on the out queue; each queue runs in order.
  virtual absl::Status CopyIn(void* device_dst, const void* host_src, int64_t bytes) = 0;
  virtual absl::Status CopyOut(void* host_dst, const void* device_src, int64_t bytes) = 0;
  // Event `e` completes when the work queued so far on that queue has.
  virtual absl::Status RecordOnIn(int e) = 0;
  virtual absl::Status RecordOnOut(int e) = 0;
  virtual absl::Status RecordOnCompute(int e) = 0;
  // Work queued later on that queue starts after event `e` completes (its latest recording).
  virtual absl::Status InWaits(int e) = 0;
  virtual absl::Status OutWaits(int e) = 0;
  virtual absl::Status ComputeWaits(int e) = 0;
  // Blocks the host until everything queued on the in and out queues has finished.
  virtual absl::Status SynchronizeCopies() = 0;
};

// The "device" is host memory: copies are memcpy at the time they are queued (so every queue is
// the caller's thread, in program order) and events are no-ops.
class HostDeviceBackend final : public DeviceBackend {
 public:
  ~HostDeviceBackend() override;
  std::string name() const override { return "host"; }
  absl::StatusOr<void*> Allocate(int64_t bytes, int num_events) override;
  absl::Status CopyIn(void* device_dst, const void* host_src, int64_t bytes) override;
  absl::Status CopyOut(void* host_dst, const void* device_src, int64_t bytes) override;
  absl::Status RecordOnIn(int) override { return absl::OkStatus(); }
  absl::Status RecordOnOut(int) override { return absl::OkStatus(); }
  absl::Status RecordOnCompute(int) override { return absl::OkStatus(); }
  absl::Status InWaits(int) override { return absl::OkStatus(); }
  absl::Status OutWaits(int) override { return absl::OkStatus(); }
  absl::Status ComputeWaits(int) override { return absl::OkStatus(); }
  absl::Status SynchronizeCopies() override { return absl::OkStatus(); }

 private:
  void* memory_ = nullptr;
};

struct DeviceCacheOptions {
  int64_t chunk_bytes = 0;   // every chunk's size, > 0
  int64_t budget_bytes = 0;  // device bytes for chunk slots: capacity = budget / chunk_bytes >= 1
  // After each Acquire (once a trace is set), copy in up to this many of the next chunks in the
  // trace, each only into a free slot or over a chunk whose next use is later than its own.
  int prefetch_depth = 2;
  // Host address of chunk i (chunk_bytes each, page-locked where the backend benefits), owned by
  // the caller and kept alive for the cache's lifetime. The number of chunks is homes.size().
  std::vector<void*> homes;
};

struct DeviceCacheStats {
  int64_t acquires = 0;
  int64_t hits = 0;            // acquired while resident (a prefetch counts as a hit)
  int64_t demand_loads = 0;    // copied in at Acquire: the compute queue waits for the copy
  int64_t prefetches = 0;      // copied in ahead of use
  int64_t evictions = 0;
  int64_t write_backs = 0;     // dirty chunks copied to their homes (evictions and Flush)
  int64_t bytes_in = 0;        // host -> device
  int64_t bytes_out = 0;       // device -> host
  int64_t trace_misses = 0;    // Acquires whose chunk was not the trace's next access
  int64_t slot_bytes = 0;      // the one allocation: capacity * chunk_bytes <= budget
  int max_resident = 0;        // most chunks resident at once (<= capacity)
};

class DeviceChunkCache {
 public:
  // Errors: kInvalidArgument for chunk_bytes <= 0, no homes, a null home, a budget below one
  // chunk (naming both numbers) or a negative prefetch depth; the backend's allocation error.
  static absl::StatusOr<std::unique_ptr<DeviceChunkCache>> Create(
      DeviceCacheOptions options, std::unique_ptr<DeviceBackend> backend);
  ~DeviceChunkCache();
  DeviceChunkCache(const DeviceChunkCache&) = delete;
  DeviceChunkCache& operator=(const DeviceChunkCache&) = delete;

  int num_chunks() const { return static_cast<int>(options_.homes.size()); }
  int capacity() const { return capacity_; }
  const DeviceBackend& backend() const { return *backend_; }
  const DeviceCacheStats& stats() const { return stats_; }
  bool resident(int chunk) const { return slot_of_[chunk] >= 0; }

  // One iteration's access order (chunk ids), repeated every iteration: from now on victims are
  // chosen by farthest next use and the next accesses are prefetched. Before a trace is set the
  // least recently used chunk is evicted and nothing is prefetched. Acquires are matched to the
  // trace in order; one that does not match moves to its chunk's next moment in the trace.
  // Errors: kInvalidArgument for an empty trace or an id out of range (naming the moment).
  absl::Status SetTrace(absl::Span<const int> trace);
  bool has_trace() const { return table_.has_value(); }

  // The device address of `chunk`, valid for work queued on the compute queue after this call
  // until Release. Loads it if absent (evicting, writing back a dirty victim), then prefetches.
  // Acquires of one chunk nest. Errors: kOutOfRange for a bad id; kResourceExhausted (naming the
  // capacity and the pinned chunks) when every slot holds a pinned chunk; backend errors.
  absl::StatusOr<void*> Acquire(int chunk);
  // Ends one Acquire; `dirty`: the compute queue wrote the chunk, so it is copied to its home
  // before its slot is reused (or at Flush). Errors: kFailedPrecondition if not acquired.
  absl::Status Release(int chunk, bool dirty);
  // Drops `chunk`'s device copy without writing it back (its home is the truth again, e.g. after
  // the host changed it). Errors: kFailedPrecondition if it is acquired.
  absl::Status Discard(int chunk);
  // Copies every dirty resident chunk to its home and waits for the copy queue, so the homes hold
  // the latest data; chunks stay resident and clean. Errors: kFailedPrecondition while any chunk
  // is acquired; backend errors.
  absl::Status Flush();

 private:
  DeviceChunkCache(DeviceCacheOptions options, std::unique_ptr<DeviceBackend> backend,
                   int capacity);
  char* slot_address(int slot) const { return base_ + slot * options_.chunk_bytes; }
  int ready_event(int slot) const { return slot; }
  int released_event(int slot) const { return capacity_ + slot; }
  int written_event(int slot) const { return 2 * capacity_ + slot; }
  const EvictionPolicy& policy() const;
  int64_t NextUse(int chunk) const;  // from the current moment; kNeverUsed without a trace
  // Makes `chunk` resident in some slot (free, else a victim's), copying it in and recording
  // ready[slot]. `prefetch`: only over a victim used later than `chunk`; returns false if none.
  absl::StatusOr<bool> Load(int chunk, bool prefetch);
  absl::Status EvictSlot(int slot);
  absl::Status WriteBack(int slot);  // copies the slot's dirty chunk to its home
  void AdvanceMoment(int chunk);

  DeviceCacheOptions options_;
  std::unique_ptr<DeviceBackend> backend_;
  int capacity_;
  char* base_ = nullptr;
  std::vector<int> slot_of_;      // chunk -> slot, -1 if not resident
  std::vector<int> chunk_in_;     // slot -> chunk, -1 if free
  std::vector<int> free_slots_;
  std::vector<bool> released_once_;  // slot -> released[slot] has been recorded
  std::vector<bool> written_once_;   // slot -> written[slot] has been recorded
  std::vector<int> written_from_;    // chunk -> slot of its latest write-back, -1 if none
  std::vector<int> pins_;         // chunk -> nested Acquires
  std::vector<bool> dirty_;       // chunk -> device copy newer than its home
  std::vector<bool> pending_;     // chunk -> copied in, compute queue has not waited for it yet
  std::optional<NextUseTable> table_;
  std::unique_ptr<FarthestNextUsePolicy> farthest_;
  LeastRecentlyUsedPolicy lru_;
  int64_t moment_ = -1;           // position in the trace of the latest Acquire
  DeviceCacheStats stats_;
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_DEVICE_CACHE_H_
