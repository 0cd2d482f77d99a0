#include "memory/state_paging.h"

#include "common/simd.h"

namespace shoal::memory {

// Vectorised per ISA (common/simd.h); one function for every caller, so block sums taken by a
// pager and a norm over the whole buffer (parallel/adamw.cc) are the same bits.
SHOAL_SIMD_CLONES
double BlockSumSquares(const float* g, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
  return s;
}

}  // namespace shoal::memory
