#include "runtime/sampler.h"

#include <cstdio>
#include <cstdlib>

namespace shoal::runtime {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // 2^64 / golden ratio, SplitMix64's step

// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mix whose output
// passes BigCrush, so consecutive global indices land on unrelated windows.
uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A broken REQUIRES is a bug in the caller (OpenTokenDataset already rejects short files with a
// status), so it stops the process rather than returning an error.
void Require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "BatchSampler: requirement violated: %s\n", what);
  std::abort();
}

}  // namespace

BatchSampler::BatchSampler(const TokenFile& file, uint64_t seed, BatchSpec spec)
    : file_(file), seed_(seed), spec_(spec) {
  Require(spec.batch_size > 0 && spec.block_size > 0 && spec.grad_accum > 0, "sizes > 0");
  Require(spec.dp_size > 0 && spec.dp_rank >= 0 && spec.dp_rank < spec.dp_size,
          "0 <= dp_rank < dp_size");
  Require(file.size() > static_cast<size_t>(spec.block_size), "file.size() > block_size");
}

uint64_t BatchSampler::TrainWindowStart(uint64_t global_index) const {
  // The g-th output of a SplitMix64 generator seeded with `seed`: random access into the stream,
  // so no sampler state has to be saved in checkpoints.
  const uint64_t h = Mix64(seed_ + (global_index + 1) * kGolden);
  // Starts in [0, N - block_size) keep the shifted target y inside the file. The modulo bias is
  // below N / 2^64, far too small to matter.
  return h % (file_.size() - static_cast<uint64_t>(spec_.block_size));
}

void BatchSampler::TrainBatch(int64_t step, int micro, int64_t* x, int64_t* y) const {
  const auto b_size = static_cast<uint64_t>(spec_.batch_size);
  const uint64_t first =
      ((static_cast<uint64_t>(step) * spec_.grad_accum + micro) * spec_.dp_size + spec_.dp_rank) *
      b_size;
  for (uint64_t b = 0; b < b_size; ++b) {
    FillWindow(TrainWindowStart(first + b), x + b * spec_.block_size, y + b * spec_.block_size);
  }
}

void BatchSampler::ValBatch(int index, int num_batches, int64_t* x, int64_t* y) const {
  Require(num_batches > 0 && index >= 0 && index < num_batches, "0 <= index < num_batches");
  const uint64_t windows = static_cast<uint64_t>(num_batches) * spec_.batch_size;
  const uint64_t last_start = file_.size() - spec_.block_size - 1;
  for (int b = 0; b < spec_.batch_size; ++b) {
    const uint64_t w = static_cast<uint64_t>(index) * spec_.batch_size + b;
    // 128-bit product: w * last_start can exceed 2^64 for a large file and many windows.
    const uint64_t start =
        windows <= 1
            ? 0
            : static_cast<uint64_t>(static_cast<unsigned __int128>(w) * last_start / (windows - 1));
    FillWindow(start, x + static_cast<int64_t>(b) * spec_.block_size,
               y + static_cast<int64_t>(b) * spec_.block_size);
  }
}

void BatchSampler::FillWindow(uint64_t start, int64_t* x, int64_t* y) const {
  // x = tokens[start, start + T), y = tokens[start + 1, start + T + 1).
  const uint16_t* tokens = file_.data() + start;
  for (int t = 0; t < spec_.block_size; ++t) {
    x[t] = tokens[t];
    y[t] = tokens[t + 1];
  }
}

}  // namespace shoal::runtime
