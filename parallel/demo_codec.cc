#include "parallel/demo_codec.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace shoal::parallel {
namespace {

// Work per parallel_for task in coefficients: tiles are grouped so a task touches ~16 Ki of them
// (64×64 tiles: 4 per task), enough to amortise the task overhead.
constexpr int64_t kCoefsPerTask = 16384;

struct Geometry {
  int64_t rows = 1, cols = 1;
  int n1 = 1, n2 = 1;
  int64_t k = 0;
};

bool IsWireDtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Validates the options and shape and works out the matrix view and tiling described in the
// header.
absl::StatusOr<Geometry> MakeGeometry(const std::vector<int64_t>& shape, int chunk, int topk,
                                      at::ScalarType wire_dtype) {
  const std::string where = absl::StrCat("DeMo codec for shape [", absl::StrJoin(shape, ", "), "]");
  if (chunk <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": chunk = ", chunk, " must be > 0"));
  }
  if (topk <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": topk = ", topk, " must be > 0"));
  }
  if (!IsWireDtype(wire_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": wire dtype ", c10::toString(wire_dtype),
                     " is not one of Float, BFloat16, Half"));
  }
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": every dimension must be > 0 (empty tensors are not compressed)"));
    }
  }
  Geometry g;
  if (shape.size() == 1) {
    g.cols = shape[0];
  } else if (shape.size() >= 2) {
    g.rows = shape[0];
    for (size_t i = 1; i < shape.size(); ++i) g.cols *= shape[i];
  }
  g.n1 = DemoChunkLength(g.rows, chunk);
  g.n2 = DemoChunkLength(g.cols, chunk);
  const int64_t tile_numel = static_cast<int64_t>(g.n1) * g.n2;
  if (tile_numel > kDemoMaxTileNumel) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " with chunk ", chunk, ": tile ", g.n1, " x ", g.n2, " = ", tile_numel,
        " coefficients exceeds ", kDemoMaxTileNumel, ", the most int16 indices can address"));
  }
  g.k = std::min<int64_t>(topk, tile_numel);
  return g;
}

// Ordering for top-k: larger |value| first, NaN before any number, ties to the lower index. A
// strict total order on a tile's indices, so the selection does not depend on the algorithm.
template <typename T>
struct LargerMagnitudeFirst {
  const T* tile;
  bool operator()(int a, int b) const {
    const T va = std::abs(tile[a]);
    const T vb = std::abs(tile[b]);
    const bool na = std::isnan(va);
    const bool nb = std::isnan(vb);
    if (na != nb) return na;
    if (!na && va != vb) return va > vb;
    return a < b;
  }
};

}  // namespace

int DemoChunkLength(int64_t dim, int target) {
  if (dim <= 0 || target <= 0) return 0;
  if (dim % target == 0) return target;
  // The largest divisor below target; when dim < target that is dim itself.
  for (int64_t d = std::min<int64_t>(target - 1, dim); d > 1; --d) {
    if (dim % d == 0) return static_cast<int>(d);
  }
  return 1;
}

at::Tensor DemoDctBasis(int n) {
  TORCH_CHECK(n >= 1, "DemoDctBasis: n = ", n, " must be >= 1");
  static std::mutex mu;
  static auto* cache = new std::map<int, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(n);
  if (it != cache->end()) return it->second;
  at::Tensor c = at::empty({n, n}, at::kDouble);
  double* p = c.data_ptr<double>();
  const double pi = std::acos(-1.0);
  for (int k = 0; k < n; ++k) {
    const double alpha = std::sqrt((k == 0 ? 1.0 : 2.0) / n);
    for (int j = 0; j < n; ++j) p[k * n + j] = alpha * std::cos(pi * (2 * j + 1) * k / (2.0 * n));
  }
  cache->emplace(n, c);
  return c;
}

absl::StatusOr<DemoCodec> DemoCodec::Create(std::vector<int64_t> shape,
                                            DemoCodecOptions options) {
  auto geometry = MakeGeometry(shape, options.chunk, options.topk, options.wire_dtype);
  if (!geometry.ok()) return geometry.status();
  DemoCodec codec;
  codec.shape_ = std::move(shape);
  codec.rows_ = geometry->rows;
  codec.cols_ = geometry->cols;
  codec.n1_ = geometry->n1;
  codec.n2_ = geometry->n2;
  codec.k_ = geometry->k;
  codec.wire_dtype_ = options.wire_dtype;
  codec.basis1_f64_ = DemoDctBasis(codec.n1_);
  codec.basis1_f32_ = codec.basis1_f64_.to(at::kFloat);
  codec.basis2_f64_ = DemoDctBasis(codec.n2_);
  codec.basis2_f32_ = codec.basis2_f64_.to(at::kFloat);
  return codec;
}

const at::Tensor& DemoCodec::Basis1(at::ScalarType dtype) const {
  return dtype == at::kDouble ? basis1_f64_ : basis1_f32_;
}
const at::Tensor& DemoCodec::Basis2(at::ScalarType dtype) const {
  return dtype == at::kDouble ? basis2_f64_ : basis2_f32_;
}

at::Tensor DemoCodec::Encode(const at::Tensor& x) const {
  TORCH_CHECK(x.sizes().vec() == shape_, "DemoCodec::Encode: got shape ", x.sizes(),
              ", codec is for [", absl::StrJoin(shape_, ", "), "]");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "DemoCodec::Encode: floating input required");
  const at::ScalarType dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // 1 x 1 tiles (prime-sized axes): the coefficients are the values; copy so that the result
  // never shares storage with the input.
  if (n1_ == 1 && n2_ == 1) return x.to(dtype).reshape({tiles(), 1}).clone();
  const int64_t a = rows_ / n1_, b = cols_ / n2_;
  // (a, n1, cols): each block row of the matrix; C1 · block transforms along the rows of a tile.
  at::Tensor y = x.to(dtype).reshape({a, n1_, cols_});
  if (n1_ > 1) y = at::matmul(Basis1(dtype), y);
  // (a·n1·b, n2): each tile row segment; · C2ᵀ transforms along the columns of a tile.
  y = y.reshape({a * n1_ * b, n2_});
  if (n2_ > 1) y = at::matmul(y, Basis2(dtype).t());
  // (a, n1, b, n2) → (a, b, n1, n2) → (tiles, n1·n2), coefficient (k, l) at k·n2 + l.
  return y.reshape({a, n1_, b, n2_}).permute({0, 2, 1, 3}).reshape({tiles(), tile_numel()});
}

at::Tensor DemoCodec::Decode(const at::Tensor& coefs) const {
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == tiles() && coefs.size(1) == tile_numel(),
              "DemoCodec::Decode: got coefs of shape ", coefs.sizes(), ", expected (", tiles(),
              ", ", tile_numel(), ")");
  const at::ScalarType dtype = coefs.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "DemoCodec::Decode: coefs must be Float or Double, got ", c10::toString(dtype));
  if (n1_ == 1 && n2_ == 1) return coefs.reshape(shape_).clone();
  const int64_t a = rows_ / n1_, b = cols_ / n2_;
  // (tiles, n1·n2) → (a, n1, b, n2) → (a·n1·b, n2); · C2 undoes the column transform.
  at::Tensor y = coefs.reshape({a, b, n1_, n2_}).permute({0, 2, 1, 3}).reshape({-1, n2_});
  if (n2_ > 1) y = at::matmul(y, Basis2(dtype));
  // (a, n1, cols); C1ᵀ · block undoes the row transform.
  y = y.reshape({a, n1_, cols_});
  if (n1_ > 1) y = at::matmul(Basis1(dtype).t(), y);
  return y.reshape(shape_);
}

DemoSelection DemoCodec::Select(const at::Tensor& coefs) const {
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == tiles() && coefs.size(1) == tile_numel(),
              "DemoCodec::Select: got coefs of shape ", coefs.sizes(), ", expected (", tiles(),
              ", ", tile_numel(), ")");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat || coefs.scalar_type() == at::kDouble,
              "DemoCodec::Select: coefs must be Float or Double");
  const at::Tensor c = coefs.contiguous();
  const int64_t n = tile_numel();
  const int64_t k = k_;
  at::Tensor indices = at::empty({tiles(), k}, at::kShort);
  at::Tensor values = at::empty({tiles(), k}, c.options());
  int16_t* idx_out = indices.data_ptr<int16_t>();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "DemoCodec::Select", [&] {
    const scalar_t* src = c.data_ptr<scalar_t>();
    scalar_t* val_out = values.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kCoefsPerTask / n);
    at::parallel_for(0, tiles(), grain, [&](int64_t t0, int64_t t1) {
      std::vector<int> order(n);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* tile = src + t * n;
        std::iota(order.begin(), order.end(), 0);
        if (k < n) {
          std::nth_element(order.begin(), order.begin() + k, order.end(),
                           LargerMagnitudeFirst<scalar_t>{tile});
        }
        std::sort(order.begin(), order.begin() + k);
        for (int64_t j = 0; j < k; ++j) {
          idx_out[t * k + j] = static_cast<int16_t>(order[j]);
          val_out[t * k + j] = tile[order[j]];
        }
      }
    });
  });
  return DemoSelection{indices, values.to(wire_dtype_)};
}

at::Tensor DemoCodec::Decompress(const DemoSelection& selection, at::ScalarType dtype) const {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "DemoCodec::Decompress: dtype must be Float or Double");
  TORCH_CHECK(selection.indices.sizes() == at::IntArrayRef({tiles(), k_}) &&
                  selection.values.sizes() == selection.indices.sizes(),
              "DemoCodec::Decompress: selection of shape ", selection.indices.sizes(),
              " for a codec of (", tiles(), ", ", k_, ")");
  at::Tensor dense = at::zeros({tiles(), tile_numel()}, dtype);
  // Indices are distinct within a row, so the scatter is a plain (deterministic) assignment.
  dense.scatter_(1, selection.indices.to(at::kLong), selection.values.to(dtype));
  return dense;
}

absl::StatusOr<at::Tensor> DemoCodec::DecompressMean(const std::vector<DemoSelection>& workers,
                                                     at::ScalarType dtype) const {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "DemoCodec::DecompressMean: dtype must be Float or Double");
  if (workers.empty()) {
    return absl::InvalidArgumentError("DeMo decompress-mean: no selections given");
  }
  const int64_t n = tile_numel();
  const int64_t k = k_;
  const int64_t num_tiles = tiles();
  const int64_t w_count = static_cast<int64_t>(workers.size());
  // Widen every worker's values to float32 (exact from bfloat16/float16) and make both tensors
  // contiguous so the loop below reads plain arrays.
  std::vector<at::Tensor> idx(w_count), val(w_count);
  std::vector<const int16_t*> idx_p(w_count);
  std::vector<const float*> val_p(w_count);
  for (int64_t w = 0; w < w_count; ++w) {
    const DemoSelection& s = workers[w];
    const bool shapes_ok = s.indices.defined() && s.values.defined() &&
                           s.indices.sizes() == at::IntArrayRef({num_tiles, k}) &&
                           s.values.sizes() == s.indices.sizes();
    if (!shapes_ok || s.indices.scalar_type() != at::kShort ||
        s.values.scalar_type() != wire_dtype_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DeMo decompress-mean: worker ", w, " sent ",
          s.indices.defined() ? c10::toString(s.indices.scalar_type()) : "no", " indices ",
          s.indices.defined() ? absl::StrJoin(s.indices.sizes(), "x") : "-", " and ",
          s.values.defined() ? c10::toString(s.values.scalar_type()) : "no", " values ",
          s.values.defined() ? absl::StrJoin(s.values.sizes(), "x") : "-", "; expected Short and ",
          c10::toString(wire_dtype_), " of ", num_tiles, "x", k));
    }
    idx[w] = s.indices.contiguous();
    val[w] = s.values.to(at::kFloat).contiguous();
    idx_p[w] = idx[w].data_ptr<int16_t>();
    val_p[w] = val[w].data_ptr<float>();
  }

  at::Tensor dense = at::zeros({num_tiles, n}, dtype);
  // The first bad (tile, worker, index) by tile order, so the message does not depend on threads.
  std::mutex error_mu;
  int64_t error_tile = num_tiles;
  std::string error;
  AT_DISPATCH_FLOATING_TYPES(dtype, "DemoCodec::DecompressMean", [&] {
    scalar_t* out = dense.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kCoefsPerTask / n);
    at::parallel_for(0, num_tiles, grain, [&](int64_t t0, int64_t t1) {
      // Per task scratch of one tile: sum and count per coefficient, and the last worker that
      // touched it (to catch a worker naming one index twice). Reset after each tile by
      // revisiting only the touched entries.
      std::vector<double> sum(n, 0.0);
      std::vector<int32_t> count(n, 0);
      std::vector<int32_t> last_worker(n, -1);
      for (int64_t t = t0; t < t1; ++t) {
        bool bad = false;
        for (int64_t w = 0; w < w_count && !bad; ++w) {
          const int16_t* ti = idx_p[w] + t * k;
          const float* tv = val_p[w] + t * k;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t i = ti[j];
            if (i < 0 || i >= n || last_worker[i] == w) {
              std::lock_guard<std::mutex> lock(error_mu);
              if (t < error_tile) {
                error_tile = t;
                error = absl::StrCat("DeMo decompress-mean: worker ", w, ", tile ", t, ": index ",
                                     i, (i < 0 || i >= n) ? " is outside [0, " : " repeated in [0, ",
                                     n, ")");
              }
              bad = true;
              break;
            }
            last_worker[i] = static_cast<int32_t>(w);
            sum[i] += static_cast<double>(tv[j]);
            count[i] += 1;
          }
        }
        // Write the means and clear what this tile touched (all of it, even after an error).
        for (int64_t w = 0; w < w_count; ++w) {
          const int16_t* ti = idx_p[w] + t * k;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t i = ti[j];
            if (i < 0 || i >= n || count[i] == 0) continue;
            out[t * n + i] = static_cast<scalar_t>(sum[i] / count[i]);
            sum[i] = 0.0;
            count[i] = 0;
            last_worker[i] = -1;
          }
        }
      }
    });
  });
  if (error_tile < num_tiles) return absl::InvalidArgumentError(error);
  return dense;
}

int64_t DemoCodec::WireBytes() const {
  return tiles() * k_ * (2 + static_cast<int64_t>(c10::elementSize(wire_dtype_)));
}

absl::StatusOr<int64_t> DemoWireBytes(const std::vector<int64_t>& shape, int chunk, int topk,
                                      at::ScalarType wire_dtype) {
  auto g = MakeGeometry(shape, chunk, topk, wire_dtype);
  if (!g.ok()) return g.status();
  const int64_t tiles = (g->rows / g->n1) * (g->cols / g->n2);
  return tiles * g->k * (2 + static_cast<int64_t>(c10::elementSize(wire_dtype)));
}

DemoSelection DemoCompress(const DemoCodec& codec, double lr, double decay,
                           const at::Tensor& grad, at::Tensor* delta) {
  TORCH_CHECK(decay >= 0 && decay < 1, "DemoCompress: decay = ", decay, " must be in [0, 1)");
  TORCH_CHECK(delta->scalar_type() == at::kFloat || delta->scalar_type() == at::kDouble,
              "DemoCompress: delta must be Float or Double");
  delta->mul_(decay).add_(grad, lr);
  DemoSelection mine = codec.Select(codec.Encode(*delta));
  delta->sub_(codec.Decode(codec.Decompress(mine, delta->scalar_type())));
  return mine;
}

absl::Status DemoApply(const DemoCodec& codec, const std::vector<DemoSelection>& gathered,
                       double lr, double weight_decay, at::Tensor* param) {
  TORCH_CHECK(param->scalar_type() == at::kFloat || param->scalar_type() == at::kDouble,
              "DemoApply: param must be Float or Double");
  auto mean = codec.DecompressMean(gathered, param->scalar_type());
  if (!mean.ok()) return mean.status();
  DemoApplyMean(codec, *mean, lr, weight_decay, param);
  return absl::OkStatus();
}

void DemoApplyMean(const DemoCodec& codec, const at::Tensor& mean, double lr, double weight_decay,
                   at::Tensor* param) {
  const at::Tensor direction = codec.Decode(mean).sign();
  // The reference's order: decoupled decay first, then the SGD step with the sign as gradient.
  if (weight_decay != 0) param->mul_(1 - lr * weight_decay);
  param->add_(direction, -lr);
}

}  // namespace shoal::parallel
