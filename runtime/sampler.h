// Deterministic batch sampling. The windows of a batch are a pure function of
// (seed, step, micro-batch, data-parallel rank, data-parallel size): every sample has a global
// index  g = ((step * grad_accum + micro) * dp_size + dp_rank) * batch_size + b  and its window
// start is hash(seed, g) mod (N - block_size), where hash(seed, g) is the g-th output of a
// SplitMix64 generator seeded with `seed`: mix64(seed + (g + 1) * 0x9E3779B97F4A7C15). So a
// resumed run, or a run re-sharded over another number of data-parallel ranks with the same
// global batch, reads exactly the same windows.
// Validation uses a fixed set of evenly spaced windows, identical for every run on the same file.
// Stateless and thread-safe.
#ifndef SHOAL_RUNTIME_SAMPLER_H_
#define SHOAL_RUNTIME_SAMPLER_H_

#include <cstdint>

#include "runtime/token_file.h"

namespace shoal::runtime {

struct BatchSpec {
  int batch_size = 1;   // sequences per micro-batch on this rank
  int block_size = 1;   // tokens per sequence
  int grad_accum = 1;   // micro-batches per optimizer step
  int dp_rank = 0;
  int dp_size = 1;
};

class BatchSampler {
 public:
  // REQUIRES: file.size() > spec.block_size. `file` must outlive the sampler.
  BatchSampler(const TokenFile& file, uint64_t seed, BatchSpec spec);

  // Fills inputs x and targets y, each (batch_size, block_size) row-major int64, for one
  // training micro-batch. y is x shifted by one token.
  void TrainBatch(int64_t step, int micro, int64_t* x, int64_t* y) const;

  // Fills batch `index` (0-based) of the fixed validation set of `num_batches` batches.
  // Windows are spread evenly over the file: window w starts at w * (N - block_size - 1) / (W - 1)
  // for W = num_batches * batch_size windows (W = 1 starts at 0), so batch `index` holds windows
  // index * batch_size ... + batch_size - 1. When W exceeds the N - block_size distinct starts,
  // some windows repeat. REQUIRES: 0 <= index < num_batches.
  void ValBatch(int index, int num_batches, int64_t* x, int64_t* y) const;

  // Window start of global sample index g (exposed for tests).
  uint64_t TrainWindowStart(uint64_t global_index) const;

 private:
  void FillWindow(uint64_t start, int64_t* x, int64_t* y) const;
  const TokenFile& file_;
  uint64_t seed_;
  BatchSpec spec_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_SAMPLER_H_
