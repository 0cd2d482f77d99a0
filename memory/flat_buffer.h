// FlatBuffer: one contiguous allocation holding many named tensors as views into it.
//
// shoal keeps model states (parameters, gradients, optimizer moments) in flat buffers from the
// start, so that an optimizer steps whole buffers in one fused loop, gradient sync moves one
// buffer instead of hundreds of tensors, and a later chunk manager can place, move and offload
// the same storage without the model noticing: a parameter is always a view at a fixed offset.
//
// Two phases: Add() every tensor (the layout), then Allocate() once. After that the layout is
// frozen and View()/flat() are valid for the buffer's lifetime. Offsets are aligned to 64 bytes
// so every view starts on a cache line. Not thread-safe during layout; views may be used from any
// thread afterwards (the usual tensor rules apply).
#ifndef SHOAL_MEMORY_FLAT_BUFFER_H_
#define SHOAL_MEMORY_FLAT_BUFFER_H_

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "memory/chunk_layout.h"

namespace shoal::memory {

class FlatBuffer {
 public:
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0;  // in elements
    int64_t numel = 0;
  };

  // Appends a tensor of `shape` to the layout; returns its index.
  // REQUIRES: not yet allocated; `name` unique within this buffer.
  int Add(std::string name, std::vector<int64_t> shape);

  // Allocates zeroed float32 CPU storage for the layout, its size rounded up to a multiple of
  // `pad_multiple` elements (so that N ranks can each own an equal shard of it).
  void Allocate(int64_t pad_multiple = 1);

  // Chunked layout (the chunk manager's paged states): every entry moves to its place in
  // `layout` (chunk * capacity + offset), and the buffer becomes num_chunks * capacity elements.
  // Errors (kInvalidArgument, naming the tensor): an entry missing from the layout or a size that
  // differs, a layout tensor that is no entry; nothing changes then. REQUIRES: not allocated.
  absl::Status ApplyChunkLayout(const ChunkLayout& layout);

  // Like Allocate, but the storage is an anonymous memory mapping of whole pages: zero, and
  // committed only as it is touched, so that a chunk manager can release ranges of it
  // (madvise) and protect them (mprotect). Unmapped with the last tensor that uses it.
  void AllocateMapped(int64_t pad_multiple = 1);
  bool mapped() const { return mapped_; }

  // A buffer with the same layout and fresh zeroed storage (gradients, optimizer moments),
  // mapped if this one is. REQUIRES: allocated.
  FlatBuffer MakeLike() const;

  // The view of entry `index`, shaped as added. REQUIRES: allocated.
  at::Tensor View(int index) const;
  // Index of `name`, or -1.
  int Find(const std::string& name) const;

  // The whole buffer as a 1-D tensor (padding between entries included, always zero for
  // gradients and never read by the model).
  const at::Tensor& flat() const { return flat_; }
  const std::vector<Entry>& entries() const { return entries_; }
  // Elements including alignment padding.
  int64_t numel() const { return size_; }
  bool allocated() const { return flat_.defined(); }

 private:
  std::vector<Entry> entries_;
  int64_t size_ = 0;
  bool mapped_ = false;
  at::Tensor flat_;
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_FLAT_BUFFER_H_
