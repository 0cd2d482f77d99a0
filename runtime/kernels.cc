#include "runtime/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/simd.h"

// The inner loops below are plain functions marked SHOAL_SIMD_CLONES (see common/simd.h), called
// from the ATen parallel_for lambdas; the summation order of their `omp simd` reductions depends
// only on the vector width, never on the thread count.

namespace shoal::runtime::kernels {
namespace {

// Rows per block for the cross-row reductions of LayerNorm's backward: the blocking is fixed, so
// the sum order does not depend on how many threads run.
constexpr int64_t kRowBlock = 32;

int64_t RowGrain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

// exp(x) for float, branch-free so loops that call it vectorise (libm's expf does not, and the
// scalar calls were a quarter of a tiny model's step). Range reduction x = k ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for e^r (relative error < 2e-7), 2^k through the exponent
// bits. Inputs are clamped to [-87, 88], where float exp neither overflows nor goes subnormal.
inline float ExpF(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no floor call).
  const float kMagic = 12582912.0f;
  const float kf = (x * 1.44269504088896341f + kMagic) - kMagic;
  const float r = (x - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(u) = 1 - 2 / (e^{2u} + 1): exact at both tails, absolute error ~1e-7 near 0, which is
// what GELU needs (it adds 1 to it).
inline float TanhF(float u) { return 1.0f - 2.0f / (ExpF(2.0f * u) + 1.0f); }

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluC = 0.044715f;

SHOAL_SIMD_CLONES
void GeluForwardRange(const float* x, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kGeluK * (v + kGeluC * v * v * v);
    out[i] = 0.5f * v * (1.0f + TanhF(u));
  }
}

SHOAL_SIMD_CLONES
void GeluBackwardRange(const float* x, const float* dout, int64_t n, float* dx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = kGeluK * (v + kGeluC * v * v * v);
    const float th = TanhF(u);
    const float du = kGeluK * (1.0f + 3.0f * kGeluC * v * v);
    dx[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * du);
  }
}

SHOAL_SIMD_CLONES
void LayerNormRows(const float* x, const float* w, const float* b, int64_t r0, int64_t r1,
                   int64_t c, float eps, float* out, float* mean, float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * c;
    float* yr = out + r * c;
    // Two passes (mean, then variance about the mean), as ATen's LayerNorm.
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < c; ++j) s += xr[j];
    const float m = s / c;
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < c; ++j) ss += (xr[j] - m) * (xr[j] - m);
    const float rs = 1.0f / std::sqrt(ss / c + eps);
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) yr[j] = (xr[j] - m) * rs * w[j] + b[j];
    mean[r] = m;
    rstd[r] = rs;
  }
}

// One block of rows of LayerNorm's backward: dx += ..., and this block's partial dw, db.
SHOAL_SIMD_CLONES
void LayerNormBackwardRows(const float* dout, const float* x, const float* w, const float* mean,
                           const float* rstd, int64_t r0, int64_t r1, int64_t c, float* dx,
                           float* pw, float* pb) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dr = dout + r * c;
    const float* xr = x + r * c;
    float* dxr = dx + r * c;
    const float m = mean[r], rs = rstd[r];
    // dxhat = dout * w;  dx = rs * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    float sum_d = 0, sum_dx = 0;
#pragma omp simd reduction(+ : sum_d, sum_dx)
    for (int64_t j = 0; j < c; ++j) {
      const float xh = (xr[j] - m) * rs;
      const float d = dr[j] * w[j];
      sum_d += d;
      sum_dx += d * xh;
      pw[j] += dr[j] * xh;
      pb[j] += dr[j];
    }
    sum_d /= c;
    sum_dx /= c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float xh = (xr[j] - m) * rs;
      dxr[j] += rs * (dr[j] * w[j] - sum_d - xh * sum_dx);
    }
  }
}

// Row i of one (T, T) score matrix: softmax of scale * s[0..i], zeros above the diagonal.
SHOAL_SIMD_CLONES
void CausalSoftmaxRow(float* s, int64_t i, int64_t t, float scale) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, s[j]);
  mx *= scale;  // scale > 0, so max(scale * s) = scale * max(s)
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j <= i; ++j) {
    const float e = ExpF(s[j] * scale - mx);
    s[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j <= i; ++j) s[j] *= inv;
  for (int64_t j = i + 1; j < t; ++j) s[j] = 0.f;
}

SHOAL_SIMD_CLONES
void CausalSoftmaxBackwardRow(const float* p, float* d, int64_t i, int64_t t, float scale) {
  float dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j <= i; ++j) dot += p[j] * d[j];
#pragma omp simd
  for (int64_t j = 0; j <= i; ++j) d[j] = scale * p[j] * (d[j] - dot);
  for (int64_t j = i + 1; j < t; ++j) d[j] = 0.f;
}

SHOAL_SIMD_CLONES
float RowMax(const float* l, int64_t v) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < v; ++j) mx = std::max(mx, l[j]);
  return mx;
}

// l[j] = exp(l[j] - mx) in place; returns their sum.
SHOAL_SIMD_CLONES
float ExpShiftedRow(float* l, int64_t v, float mx) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < v; ++j) {
    const float e = ExpF(l[j] - mx);
    l[j] = e;
    sum += e;
  }
  return sum;
}

// Softmax of one row of logits in place; returns -log p[target].
SHOAL_SIMD_CLONES
double CrossEntropyRow(float* l, int64_t target, int64_t v) {
  const float mx = RowMax(l, v);
  // log p[target] = (l[target] - max) - log(sum): taken from the shifted logit before the row is
  // overwritten, so it stays exact when p[target] underflows (ExpF clamps at e^-87).
  const double shifted_target = static_cast<double>(l[target]) - mx;
  const float sum = ExpShiftedRow(l, v, mx);
  const double logp = shifted_target - std::log(static_cast<double>(sum));
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) l[j] *= inv;
  return -logp;
}

SHOAL_SIMD_CLONES
void ScaleRow(float* g, int64_t v, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) g[j] *= scale;
}

SHOAL_SIMD_CLONES
void AddRows(const float* a, const float* b, int64_t c, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) out[j] = a[j] + b[j];
}

SHOAL_SIMD_CLONES
void AccumulateRow(const float* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

}  // namespace

void LayerNormForward(const float* x, const float* w, const float* b, int64_t n, int64_t c,
                      float eps, float* out, float* mean, float* rstd) {
  at::parallel_for(0, n, RowGrain(c), [&](int64_t r0, int64_t r1) {
    LayerNormRows(x, w, b, r0, r1, c, eps, out, mean, rstd);
  });
}

void LayerNormBackward(const float* dout, const float* x, const float* w, const float* mean,
                       const float* rstd, int64_t n, int64_t c, float* dx, float* dw, float* db) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<float> part_w(blocks * c, 0.f), part_b(blocks * c, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      LayerNormBackwardRows(dout, x, w, mean, rstd, blk * kRowBlock,
                            std::min(n, (blk + 1) * kRowBlock), c, dx, part_w.data() + blk * c,
                            part_b.data() + blk * c);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) {  // fixed order: thread-count independent
    AccumulateRow(part_w.data() + blk * c, c, dw);
    AccumulateRow(part_b.data() + blk * c, c, db);
  }
}

void GeluForward(const float* x, int64_t n, float* out) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    GeluForwardRange(x + i0, i1 - i0, out + i0);
  });
}

void GeluBackward(const float* x, const float* dout, int64_t n, float* dx) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    GeluBackwardRange(x + i0, dout + i0, i1 - i0, dx + i0);
  });
}

void CausalSoftmaxForward(float* scores, int64_t rows, int64_t t, float scale) {
  // rows = number of (T, T) matrices; parallel over every (matrix, row) pair.
  at::parallel_for(0, rows * t, std::max<int64_t>(1, 8192 / t), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) CausalSoftmaxRow(scores + q * t, q % t, t, scale);
  });
}

void CausalSoftmaxBackward(const float* p, float* dp, int64_t rows, int64_t t, float scale) {
  at::parallel_for(0, rows * t, std::max<int64_t>(1, 8192 / t), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      CausalSoftmaxBackwardRow(p + q * t, dp + q * t, q % t, t, scale);
    }
  });
}

double CrossEntropyForward(float* logits, const int64_t* targets, int64_t n, int64_t v) {
  std::vector<double> row_loss(n);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_loss[r] = CrossEntropyRow(logits + r * v, targets[r], v);
  });
  double total = 0;
  for (double x : row_loss) total += x;
  return total / n;
}

void CrossEntropyBackward(float* probs, const int64_t* targets, int64_t n, int64_t v,
                          float dloss) {
  const float scale = dloss / n;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      ScaleRow(probs + r * v, v, scale);
      probs[r * v + targets[r]] -= scale;
    }
  });
}

void EmbeddingForward(const int64_t* tokens, const float* wte, const float* wpe, int64_t b,
                      int64_t t, int64_t c, float* out) {
  at::parallel_for(0, b * t, RowGrain(c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) AddRows(wte + tokens[r] * c, wpe + (r % t) * c, c, out + r * c);
  });
}

void EmbeddingBackward(const int64_t* tokens, const float* dout, int64_t b, int64_t t, int64_t c,
                       float* dwte, float* dwpe) {
  // Channel slices of 16: each thread owns whole columns, so no two threads touch one address.
  const int64_t slices = (c + 15) / 16;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    const int64_t j0 = s0 * 16, j1 = std::min(c, s1 * 16);
    for (int64_t r = 0; r < b * t; ++r) {
      AccumulateRow(dout + r * c + j0, j1 - j0, dwte + tokens[r] * c + j0);
      AccumulateRow(dout + r * c + j0, j1 - j0, dwpe + (r % t) * c + j0);
    }
  });
}

void EmbeddingShardForward(const int64_t* tokens, const float* wte_shard, int64_t v_begin,
                           int64_t v, int64_t n, int64_t c, float* out) {
  at::parallel_for(0, n, RowGrain(c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t local = tokens[r] - v_begin;
      if (local >= 0 && local < v) {
        std::memcpy(out + r * c, wte_shard + local * c, c * sizeof(float));
      } else {
        std::memset(out + r * c, 0, c * sizeof(float));
      }
    }
  });
}

void AddPositionEmbedding(const float* wpe, int64_t b, int64_t t, int64_t c, float* out) {
  at::parallel_for(0, b * t, RowGrain(c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) AccumulateRow(wpe + (r % t) * c, c, out + r * c);
  });
}

void EmbeddingShardBackward(const int64_t* tokens, const float* dout, int64_t b, int64_t t,
                            int64_t c, int64_t v_begin, int64_t v, float* dwte_shard,
                            float* dwpe) {
  const int64_t slices = (c + 15) / 16;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    const int64_t j0 = s0 * 16, j1 = std::min(c, s1 * 16);
    for (int64_t r = 0; r < b * t; ++r) {
      const int64_t local = tokens[r] - v_begin;
      if (local >= 0 && local < v) {
        AccumulateRow(dout + r * c + j0, j1 - j0, dwte_shard + local * c + j0);
      }
      AccumulateRow(dout + r * c + j0, j1 - j0, dwpe + (r % t) * c + j0);
    }
  });
}

void CrossEntropyShardMax(const float* logits, int64_t n, int64_t v, float* row_max) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) row_max[r] = RowMax(logits + r * v, v);
                   });
}

void CrossEntropyShardExp(float* logits, const int64_t* targets, int64_t v_begin, int64_t n,
                          int64_t v, const float* row_max, float* stats) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       float* l = logits + r * v;
                       const int64_t local = targets[r] - v_begin;
                       // Taken before the row is overwritten (see CrossEntropyRow).
                       stats[n + r] = local >= 0 && local < v ? l[local] - row_max[r] : 0.f;
                       stats[r] = ExpShiftedRow(l, v, row_max[r]);
                     }
                   });
}

double CrossEntropyShardFinish(float* probs, const float* stats, int64_t n, int64_t v) {
  std::vector<double> row_loss(n);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       row_loss[r] = std::log(static_cast<double>(stats[r])) -
                                     static_cast<double>(stats[n + r]);
                       ScaleRow(probs + r * v, v, 1.0f / stats[r]);
                     }
                   });
  double total = 0;
  for (double x : row_loss) total += x;
  return total / n;
}

void CrossEntropyShardBackward(float* probs, const int64_t* targets, int64_t v_begin, int64_t n,
                               int64_t v, float dloss) {
  const float scale = dloss / n;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       ScaleRow(probs + r * v, v, scale);
                       const int64_t local = targets[r] - v_begin;
                       if (local >= 0 && local < v) probs[r * v + local] -= scale;
                     }
                   });
}

}  // namespace shoal::runtime::kernels
