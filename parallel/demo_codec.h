// The DeMo codec for one parameter shape (chunk rule, transform, top-k compression, wire size): the math that
// turns a worker's momentum buffer into the (index, value) pairs it sends and turns the pairs
// gathered from every worker back into a dense update. No communication happens here; the
// optimizer moves DemoSelection's two tensors over comm/.
//
//   x (shape) --Encode--> coefs (tiles, tile_numel) --Select--> DemoSelection {indices, values}
//   DemoSelection --Decompress--> own dense coefs      (error feedback: delta -= Decode(dense))
//   W selections --DecompressMean--> mean dense coefs  (update: sign(Decode(dense)))
//
// Layout. Every parameter is seen as a matrix (rows, cols): a 2-D (R, C) tensor as itself, a 1-D
// tensor of length L as (1, L), a 0-D tensor as (1, 1), and a ≥3-D tensor flattened to
// (shape[0], product of the rest) — a conv weight (out, in, kh, kw) becomes (out, in·kh·kw).
// n1 = DemoChunkLength(rows, chunk), n2 = DemoChunkLength(cols, chunk); the matrix is cut into
// (rows/n1) × (cols/n2) tiles of n1 × n2, numbered row-major (tile t = a·(cols/n2) + b for the
// tile at block row a, block column b), and each tile gets a 2-D orthonormal DCT-II whose
// coefficient (k, l) sits at index k·n2 + l of the tile. For 1-D tensors n1 = 1, which is the
// reference's (L/n, n) layout exactly; for 2-D it is the reference's (R/n1, C/n2, n1·n2).
//
// Wire format (shoal's, smaller than the reference's int64 + fp32): per tile the
// k = min(topk, tile_numel) largest-|coef| positions as int16 indices within the tile (so a tile
// may hold at most 32767 coefficients) and their values rounded to the wire dtype
// (float32, bfloat16 or float16). Bytes per worker: tiles · k · (2 + value bytes).
//
// Precision. The DCT basis is built in float64 and cached once per chunk length (a float32 copy is
// kept beside it). Encode/Decode compute in float64 for float64 input and in float32 otherwise
// (bfloat16/float16 input is widened to float32). DecompressMean accumulates in double.
//
// Determinism. Select and DecompressMean work tile by tile, each tile on one thread, in a fixed
// order, so their results are bit-identical for any LibTorch thread count. Encode/Decode are
// batched matrix products (LibTorch's BLAS); they are deterministic for a given BLAS build and CPU,
// which is what replicas of one job share.
//
// Thread safety: a DemoCodec is immutable after Create; its const methods may be called from
// several threads at once. The basis cache is guarded by a mutex. Calls block until done.
#ifndef SHOAL_PARALLEL_DEMO_CODEC_H_
#define SHOAL_PARALLEL_DEMO_CODEC_H_

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace shoal::parallel {

// The largest tile the int16 wire indices can address.
inline constexpr int64_t kDemoMaxTileNumel = 32767;

// Chunk length along one axis of size `dim` for target `target`: `target` if it divides
// `dim`; else the largest divisor of `dim` below `target`, which is `dim` itself when
// dim < target. Examples: (2048, 64) → 64, (50280, 64) → 60, (48, 64) → 48, (97, 64) → 1,
// (100, 64) → 50. Returns 0 when dim <= 0 or target <= 0.
int DemoChunkLength(int64_t dim, int target);

// The orthonormal DCT-II matrix C of size (n, n), float64: C[k, j] = α_k cos(π(2j+1)k / (2n)),
// α_0 = sqrt(1/n), α_k = sqrt(2/n). Encoding a vector v is C·v, decoding is Cᵀ·c. Built once per
// n and shared (the returned tensor must not be written to). REQUIRES: n >= 1.
at::Tensor DemoDctBasis(int n);

struct DemoCodecOptions {
  int chunk = 64;  // target chunk length per axis; > 0
  int topk = 32;   // coefficients kept per tile, clamped to the tile size; > 0
  // Dtype of the values on the wire: at::kFloat (as the reference), at::kBFloat16 or at::kHalf.
  at::ScalarType wire_dtype = at::kFloat;
};

// What one worker sends for one parameter. Both tensors are (tiles, k), contiguous; in each row
// the indices are distinct, ascending and in [0, tile_numel).
struct DemoSelection {
  at::Tensor indices;  // int16
  at::Tensor values;   // wire dtype, the coefficient at that index rounded to it
};

class DemoCodec {
 public:
  // A codec for parameters of `shape`. kInvalidArgument when chunk <= 0, topk <= 0, the wire
  // dtype is not one of the three above, a dimension is <= 0 (empty tensors are not compressed),
  // or a tile holds more than kDemoMaxTileNumel coefficients (the message names n1, n2 and the
  // product).
  static absl::StatusOr<DemoCodec> Create(std::vector<int64_t> shape, DemoCodecOptions options);

  // Coefficients of `x` (a tensor of this codec's shape, any strides), (tiles, tile_numel),
  // float64 for float64 input and float32 otherwise; a new tensor (never a view of `x`).
  at::Tensor Encode(const at::Tensor& x) const;
  // The exact inverse: coefs (tiles, tile_numel), float32 or float64 → a tensor of the codec's
  // shape in the same dtype, a new tensor.
  at::Tensor Decode(const at::Tensor& coefs) const;

  // Keeps, per tile, the k largest |coef| of `coefs` (tiles, tile_numel); ties go to the lower
  // index; NaN counts as larger than any number (so it travels and shows up). Indices are
  // returned in ascending order, values rounded to the wire dtype.
  DemoSelection Select(const at::Tensor& coefs) const;

  // Dense coefficients (tiles, tile_numel) in `dtype` (kFloat or kDouble) holding one worker's
  // selection, zero elsewhere. The values are the wire values widened (exactly), so
  // Decode(Decompress(own)) is precisely what the other workers decode from this worker.
  // REQUIRES: `selection` is shaped for this codec (e.g. made by Select); for data from a peer,
  // use DecompressMean, which validates.
  at::Tensor Decompress(const DemoSelection& selection, at::ScalarType dtype) const;

  // Deterministic scatter-mean of W workers' selections, given in worker order: a coefficient
  // chosen by m >= 1 workers gets the mean of their m values (sum and count accumulated in double,
  // workers in the given order), one chosen by nobody is 0. Returns (tiles, tile_numel) in
  // `dtype` (kFloat or kDouble), bit-identical for any thread count. kInvalidArgument when the
  // list is empty, a selection's shape or dtypes differ from this codec's, or an index is
  // outside [0, tile_numel) or repeated within a tile (the message names worker, tile and index).
  absl::StatusOr<at::Tensor> DecompressMean(const std::vector<DemoSelection>& workers,
                                            at::ScalarType dtype) const;

  // Bytes one worker sends for this parameter: tiles · k · (2 + wire value bytes).
  int64_t WireBytes() const;

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t rows() const { return rows_; }  // the matrix view described at the top
  int64_t cols() const { return cols_; }
  int n1() const { return n1_; }  // tile height (chunk length along rows)
  int n2() const { return n2_; }  // tile width (chunk length along cols)
  int64_t tiles() const { return (rows_ / n1_) * (cols_ / n2_); }
  int64_t tile_numel() const { return static_cast<int64_t>(n1_) * n2_; }
  int64_t k() const { return k_; }  // min(topk, tile_numel)
  at::ScalarType wire_dtype() const { return wire_dtype_; }

 private:
  DemoCodec() = default;

  const at::Tensor& Basis1(at::ScalarType dtype) const;
  const at::Tensor& Basis2(at::ScalarType dtype) const;

  std::vector<int64_t> shape_;
  int64_t rows_ = 0, cols_ = 0;
  int n1_ = 1, n2_ = 1;
  int64_t k_ = 0;
  at::ScalarType wire_dtype_ = at::kFloat;
  at::Tensor basis1_f64_, basis1_f32_;  // DemoDctBasis(n1), (n1, n1)
  at::Tensor basis2_f64_, basis2_f32_;  // DemoDctBasis(n2), (n2, n2)
};

// Bytes one worker sends for a parameter of `shape` (DemoCodec::WireBytes without building the
// bases); the same errors as DemoCodec::Create.
absl::StatusOr<int64_t> DemoWireBytes(const std::vector<int64_t>& shape, int chunk, int topk,
                                      at::ScalarType wire_dtype);

// The per-parameter DeMo step split around the exchange, for a caller that moves the
// selections itself (all-gather in worker order). One step of one worker is
//   DemoSelection mine = DemoCompress(codec, lr, decay, grad, &delta);
//   ... gather every worker's `mine`, in worker order, into `gathered` ...
//   DemoApply(codec, gathered, lr, weight_decay, &param);
// which is p ← p·(1 − lr·λ) − lr·sign(Decode(mean of gathered)), the reference's update.

// Steps 3–6 before the exchange: delta ← decay·delta + lr·grad; select the top-k of its DCT;
// delta ← delta − Decode(own selection), with the values as rounded for the wire (error
// feedback keeps exactly what was not sent). Returns the selection to send.
// REQUIRES: grad and *delta have the codec's shape; *delta is float32 or float64;
// 0 <= decay < 1.
DemoSelection DemoCompress(const DemoCodec& codec, double lr, double decay,
                           const at::Tensor& grad, at::Tensor* delta);

// Steps 2, 8, 9 and the SGD step after the exchange: *param ← *param·(1 − lr·weight_decay)
// − lr·sign(Decode(DecompressMean(gathered))), sign(0) = 0. Every element moves by 0 or lr
// besides the decay. The errors of DecompressMean, with *param unchanged.
// REQUIRES: *param has the codec's shape and is float32 or float64.
absl::Status DemoApply(const DemoCodec& codec, const std::vector<DemoSelection>& gathered,
                       double lr, double weight_decay, at::Tensor* param);

// DemoApply's update for an already decompressed mean (DecompressMean's result):
// *param ← *param·(1 − lr·weight_decay) − lr·sign(Decode(mean)).
void DemoApplyMean(const DemoCodec& codec, const at::Tensor& mean, double lr, double weight_decay,
                   at::Tensor* param);

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_DEMO_CODEC_H_
