#include "runtime/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace shoal::runtime::kernels {
namespace {

// Rows per block for the cross-row reductions of LayerNorm's backward: the blocking is fixed, so
// the sum order does not depend on how many threads run.
constexpr int64_t kRowBlock = 32;

int64_t RowGrain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

}  // namespace

void LayerNormForward(const float* x, const float* w, const float* b, int64_t n, int64_t c,
                      float eps, float* out, float* mean, float* rstd) {
  at::parallel_for(0, n, RowGrain(c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * c;
      float* yr = out + r * c;
      // Two passes in float, like ATen's LayerNorm (mean, then variance about the mean).
      float s = 0;
      for (int64_t j = 0; j < c; ++j) s += xr[j];
      const float m = s / c;
      float ss = 0;
      for (int64_t j = 0; j < c; ++j) {
        const float d = xr[j] - m;
        ss += d * d;
      }
      const float rs = 1.0f / std::sqrt(ss / c + eps);
      for (int64_t j = 0; j < c; ++j) yr[j] = (xr[j] - m) * rs * w[j] + b[j];
      mean[r] = m;
      rstd[r] = rs;
    }
  });
}

void LayerNormBackward(const float* dout, const float* x, const float* w, const float* mean,
                       const float* rstd, int64_t n, int64_t c, float* dx, float* dw, float* db) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<float> part_w(blocks * c, 0.f), part_b(blocks * c, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> dxhat(c);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* pw = part_w.data() + blk * c;
      float* pb = part_b.data() + blk * c;
      const int64_t rend = std::min(n, (blk + 1) * kRowBlock);
      for (int64_t r = blk * kRowBlock; r < rend; ++r) {
        const float* dr = dout + r * c;
        const float* xr = x + r * c;
        float* dxr = dx + r * c;
        const float m = mean[r], rs = rstd[r];
        // dxhat = dout * w;  dx = rs * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        float sum_d = 0, sum_dx = 0;
        for (int64_t j = 0; j < c; ++j) {
          const float xh = (xr[j] - m) * rs;
          const float d = dr[j] * w[j];
          dxhat[j] = d;
          sum_d += d;
          sum_dx += d * xh;
          pw[j] += dr[j] * xh;
          pb[j] += dr[j];
        }
        sum_d /= c;
        sum_dx /= c;
        for (int64_t j = 0; j < c; ++j) {
          const float xh = (xr[j] - m) * rs;
          dxr[j] += rs * (dxhat[j] - sum_d - xh * sum_dx);
        }
      }
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* pw = part_w.data() + blk * c;
    const float* pb = part_b.data() + blk * c;
    for (int64_t j = 0; j < c; ++j) {
      dw[j] += pw[j];
      db[j] += pb[j];
    }
  }
}

namespace {
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluC = 0.044715f;
}  // namespace

void GeluForward(const float* x, int64_t n, float* out) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float u = kGeluK * (v + kGeluC * v * v * v);
      out[i] = 0.5f * v * (1.0f + std::tanh(u));
    }
  });
}

void GeluBackward(const float* x, const float* dout, int64_t n, float* dx) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float u = kGeluK * (v + kGeluC * v * v * v);
      const float th = std::tanh(u);
      const float du = kGeluK * (1.0f + 3.0f * kGeluC * v * v);
      const float grad = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * du;
      dx[i] = dout[i] * grad;
    }
  });
}

void CausalSoftmaxForward(float* scores, int64_t rows, int64_t t, float scale) {
  // rows = number of (T, T) matrices; parallel over every (matrix, row) pair.
  at::parallel_for(0, rows * t, std::max<int64_t>(1, 8192 / t), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i = q % t;
      float* s = scores + q * t;
      float mx = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, s[j] * scale);
      float sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        const float e = std::exp(s[j] * scale - mx);
        s[j] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j <= i; ++j) s[j] *= inv;
      for (int64_t j = i + 1; j < t; ++j) s[j] = 0.f;
    }
  });
}

void CausalSoftmaxBackward(const float* p, float* dp, int64_t rows, int64_t t, float scale) {
  at::parallel_for(0, rows * t, std::max<int64_t>(1, 8192 / t), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i = q % t;
      const float* pr = p + q * t;
      float* dr = dp + q * t;
      float dot = 0;
      for (int64_t j = 0; j <= i; ++j) dot += pr[j] * dr[j];
      for (int64_t j = 0; j <= i; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
      for (int64_t j = i + 1; j < t; ++j) dr[j] = 0.f;
    }
  });
}

double CrossEntropyForward(float* logits, const int64_t* targets, int64_t n, int64_t v) {
  std::vector<double> row_loss(n);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* l = logits + r * v;
      float mx = -INFINITY;
      for (int64_t j = 0; j < v; ++j) mx = std::max(mx, l[j]);
      float sum = 0;
      for (int64_t j = 0; j < v; ++j) {
        const float e = std::exp(l[j] - mx);
        l[j] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < v; ++j) l[j] *= inv;
      // -log p[target] computed from the normalised probability, clamped away from log(0).
      row_loss[r] = -std::log(std::max(static_cast<double>(l[targets[r]]), 1e-38));
    }
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
      float* g = probs + r * v;
      for (int64_t j = 0; j < v; ++j) g[j] *= scale;
      g[targets[r]] -= scale;
    }
  });
}

void EmbeddingForward(const int64_t* tokens, const float* wte, const float* wpe, int64_t b,
                      int64_t t, int64_t c, float* out) {
  at::parallel_for(0, b * t, RowGrain(c), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* te = wte + tokens[r] * c;
      const float* pe = wpe + (r % t) * c;
      float* o = out + r * c;
      for (int64_t j = 0; j < c; ++j) o[j] = te[j] + pe[j];
    }
  });
}

void EmbeddingBackward(const int64_t* tokens, const float* dout, int64_t b, int64_t t, int64_t c,
                       float* dwte, float* dwpe) {
  // Channel slices of 16: each thread owns whole columns, so no two threads touch one address.
  const int64_t slices = (c + 15) / 16;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    const int64_t j0 = s0 * 16, j1 = std::min(c, s1 * 16);
    for (int64_t r = 0; r < b * t; ++r) {
      const float* d = dout + r * c;
      float* te = dwte + tokens[r] * c;
      float* pe = dwpe + (r % t) * c;
      for (int64_t j = j0; j < j1; ++j) {
        te[j] += d[j];
        pe[j] += d[j];
      }
    }
  });
}

}  // namespace shoal::runtime::kernels
