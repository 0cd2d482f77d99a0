// ActivationOffloader: the third choice of the activation plan (issue 7; ALGORITHMS.md §4.2's
// SWAP mode, with the disk tier in the role of host memory). A transformer block that offloads
// packs the inner activations of its forward (the tensors its backward reads, all but its input
// and output) into one staging buffer, queues a write of it to a DiskTier and frees the tensors;
// its backward reads them back into fresh tensors of the recorded shapes. Nothing is transformed
// on the way, so the gradients are bit-identical to keeping the activations in RAM.
//
// Storage: one DiskTier (memory/disk_tier.h) under `directory` (the trainer uses
// <memory.disk_path>/activations), one slot per (block, micro-batch slot) that may offload, each
// as large as the largest packed block. The file is scratch: made afresh at Open, deleted at
// destruction.
//
// RAM: a pool of `staging_buffers` buffers of `slot_bytes` (allocated on first use) carries all
// transfers, writes and reads alike, so whatever the model does the offloader never holds more
// than staging_buffers x slot_bytes. A buffer is reused for a write once its previous write is
// on the file; with two buffers, packing a block overlaps the write of the block before it.
//
// Prefetch: Restore(block) first unpacks that block, then starts the read of the block whose
// backward comes next (the previous block offloaded in the same micro-batch slot), so that read
// overlaps the compute of the current block's backward. PrefetchNewest starts the first read of a
// backward pass, before the blocks that kept their activations run theirs.
//
// Errors: a failed write (disk full) or read (checksum mismatch, a stale or damaged slot) throws
// c10::Error naming memory.disk_path's file and the block, from the call that waits for the
// operation: a later Offload or Restore. Wrong numbers are never returned. After an error the
// offloader's contents are undefined; the caller is expected to stop.
//
// Blocking: Offload blocks only when every staging buffer is busy (it waits for the oldest
// write); Restore blocks until the block's read is done; Drain blocks until all I/O is done.
// Thread safety: one caller thread (the model's); the I/O runs on the DiskTier's threads.
#ifndef SHOAL_MEMORY_ACTIVATION_OFFLOAD_H_
#define SHOAL_MEMORY_ACTIVATION_OFFLOAD_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "memory/disk_tier.h"

namespace shoal::memory {

struct ActivationOffloadOptions {
  std::string directory;        // where the disk tier's file goes (created if missing)
  int worker = 0;               // the data-parallel rank: one file per process
  std::vector<int> blocks;      // model-wide indices of the blocks that may offload
  int micro_batch_slots = 1;    // slots per block (micro-batches in flight; 1 on one process)
  int64_t slot_bytes = 0;       // the largest packed block (PackedBytes of its tensors)
  int staging_buffers = 2;      // the RAM pool for transfers (>= 1)
  memory::DiskIoBackend backend = memory::DiskIoBackend::kAuto;
};

class ActivationOffloader {
 public:
  // Alignment of every tensor in a packed block: memcpy on cache lines.
  static constexpr int64_t kAlignment = 64;

  // Bytes of `shapes` (float32) packed as Offload packs them, alignment included.
  static int64_t PackedBytes(const std::vector<std::vector<int64_t>>& shapes);

  // Opens the disk tier. kInvalidArgument for bad options; the DiskTier's errors (no space,
  // an unwritable folder), each prefixed with "memory.disk_path".
  static absl::StatusOr<std::unique_ptr<ActivationOffloader>> Open(
      const ActivationOffloadOptions& options);
  // Waits for outstanding I/O (errors then are dropped: nothing will read them) and removes the
  // file.
  ~ActivationOffloader();
  ActivationOffloader(const ActivationOffloader&) = delete;
  ActivationOffloader& operator=(const ActivationOffloader&) = delete;

  // Write then read `rounds` slots of slot_bytes (each of the first min(rounds, slots) slots),
  // timed: the tier's bandwidth in bytes per second, each byte counted once per direction.
  // Call before any Offload: it overwrites those slots. Errors as Open's.
  absl::StatusOr<double> MeasureBandwidth(int rounds = 4);

  // After `block`'s forward in micro-batch slot `slot`: packs the defined tensors of `tensors`
  // (float32, contiguous) into a staging buffer, queues its write and resets every tensor.
  // Replaces what an earlier Offload of the same block and slot left unread. Throws c10::Error
  // for a block or slot out of range, a pack over slot_bytes, or an earlier write's failure.
  void Offload(int block, int slot, const std::vector<at::Tensor*>& tensors);
  // Whether `block`'s activations of `slot` are offloaded and not yet restored.
  bool Holds(int block, int slot) const;
  // For `block`'s backward: waits for its read (issuing it if no prefetch did), gives each of
  // `tensors` (the same list, in the same order, as its Offload) a fresh tensor of its recorded
  // shape holding the bytes written, then prefetches the previous block of `slot`.
  // REQUIRES: Holds(block, slot). Throws c10::Error naming the block and the file when the data
  // cannot be read back intact.
  void Restore(int block, int slot, const std::vector<at::Tensor*>& tensors);
  // Forgets `block`'s offloaded activations of `slot`, if any, without reading them (a
  // forward-only pass replaced them).
  void Forget(int block, int slot);
  // Starts the read of the block of `slot` offloaded last, if any and if a buffer is free.
  void PrefetchNewest(int slot);
  // Waits until every queued write and read is done; throws c10::Error on a write's failure.
  void Drain();

  const std::string& path() const { return tier_->path(); }
  memory::DiskTierStats disk_stats() const { return tier_->stats(); }
  int64_t slot_bytes() const { return tier_->slot_bytes(); }
  // Bytes of staging buffers allocated (at most staging_buffers x slot_bytes).
  int64_t staging_bytes() const;
  // The tier's file offset of `block`'s slot `slot` payload (for tests that damage it).
  int64_t PayloadOffset(int block, int slot) const;

 private:
  // One block's activations on disk: where, which write, and how to unpack them.
  struct Record {
    uint64_t generation = 0;
    int64_t bytes = 0;
    std::vector<std::vector<int64_t>> shapes;  // empty vector: the tensor was undefined
  };
  struct Buffer {
    std::unique_ptr<char[]> data;
    enum class State { kFree, kWriting, kReading } state = State::kFree;
    int64_t key = -1;  // the (block, slot) whose transfer it carries
    uint64_t seq = 0;  // when that transfer was queued (the oldest busy buffer is freed first)
    memory::DiskWriteHandle write;
    memory::DiskReadHandle read;
  };

  explicit ActivationOffloader(const ActivationOffloadOptions& options);
  int64_t Key(int block, int slot) const;  // throws c10::Error when out of range
  int BlockOf(int64_t key) const;
  int SlotOf(int64_t key) const;
  // A free buffer: one never used, else one whose write is done, else the oldest write or read,
  // waited for (a read so released is dropped: its block will be read again). Returns -1 when
  // `for_prefetch` and only reads hold the buffers.
  int AcquireBuffer(bool for_prefetch);
  // Waits for a buffer's write and frees it; throws c10::Error naming its block on failure.
  void FinishWrite(Buffer& b);
  // Issues the read of `key` into a buffer; returns its index (-1: no buffer free, prefetch).
  int StartRead(int64_t key, bool for_prefetch);
  std::string Where(int64_t key) const;  // "block 3 (micro-batch slot 0) in <file>"

  ActivationOffloadOptions options_;
  std::unique_ptr<memory::DiskTier> tier_;
  std::vector<int> block_index_;              // model-wide block -> index in options_.blocks
  std::vector<Buffer> buffers_;
  std::map<int64_t, Record> records_;         // offloaded and not yet restored, by key
  std::vector<std::deque<int64_t>> order_;    // per slot: keys in the order they were offloaded
  uint64_t next_seq_ = 0;
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_ACTIVATION_OFFLOAD_H_