// The two interfaces through which model states are paged (issue 7; memory/model_pager.h
// implements both): what the model calls around every pass over its parameters (StatePager), and
// what the optimizer calls around every range of parameters it updates (RangeResidency). Small
// and LibTorch-free, so that the model (runtime/gpt.h) and the optimizer (parallel/adamw.h)
// depend on memory/ and not on the pager or on each other.
#ifndef SHOAL_MEMORY_STATE_PAGING_H_
#define SHOAL_MEMORY_STATE_PAGING_H_

#include <cstdint>
#include <vector>

#include "memory/chunk_layout.h"

namespace shoal::memory {

class FlatBuffer;

// Paged parameters and gradients. With a pager, the model's decay group's parameters and
// gradients are laid out in equal chunks, in mapped flat buffers, and a chunk may be absent from
// RAM (on disk) whenever no pass needs it: the model brackets every piece's pass, and every other
// touch of a decay tensor, with Begin/End so that the pager makes what the piece uses resident.
// The pager's calls may throw c10::Error (a disk failure), which propagates out of the model's
// methods like a failed collective does.
class StatePager {
 public:
  enum class Pass {
    kWrite,     // parameters written outside training (initialisation, LoadParameters)
    kRead,      // parameters read outside training (NamedParameters)
    kForward,   // parameters read
    kBackward,  // parameters read, gradients added to
  };
  virtual ~StatePager() = default;
  // From the constructor, once the parameters are declared: the layout of the decay group's
  // tensors in chunks, for these groups (per piece, the decay tensors it is the first to use; in
  // piece order).
  virtual ChunkLayout Layout(const std::vector<ChunkGroup>& groups) = 0;
  // Then, with the buffers allocated (mapped) in that layout and before anything is written:
  // `piece_entries[p]` lists the entries of `params` (and `grads`) that piece p uses.
  virtual void Attach(FlatBuffer* params, FlatBuffer* grads,
                      std::vector<std::vector<int>> piece_entries) = 0;
  virtual void Begin(int piece, Pass pass) = 0;
  virtual void End(int piece, Pass pass) = 0;
  // ZeroGrad: every decay gradient is zero again.
  virtual void ZeroGrads() = 0;
};

// Parameters and gradients that are themselves paged: the optimizer brackets the update of each
// moment chunk's range of a paged group with Acquire and Release, so that the range's parameters
// and gradients are resident, and hints the next range with Prefetch. The calls may throw
// c10::Error. Release means the range's parameters changed and its gradients are consumed.
class RangeResidency {
 public:
  virtual ~RangeResidency() = default;
  virtual bool Paged(int group) const = 0;
  virtual void Prefetch(int group, int64_t begin, int64_t count) = 0;
  virtual void Acquire(int group, int64_t begin, int64_t count) = 0;
  virtual void Release(int group, int64_t begin, int64_t count) = 0;
};

// The gradient norm is taken in blocks of this many elements, each summed in double and the
// blocks added in buffer order, so the result does not depend on the thread count, and a pager
// can take a chunk's block sums while the chunk is resident (chunk capacities are whole blocks)
// and still add up to exactly the norm over the whole buffer.
inline constexpr int64_t kNormBlockElements = 4096;
// The sum of squares, in double, of elements [0, n) of one block (n <= kNormBlockElements).
double BlockSumSquares(const float* g, int64_t n);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_STATE_PAGING_H_
