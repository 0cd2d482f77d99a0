// The GPT pieces' operations other than matrix multiplies, on tensors, in two interchangeable
// sets (`train.kernels`):
//   kFused  the hand-written CPU kernels of runtime/kernels.h (contiguous float32 on the CPU);
//   kAten   device-generic ATen calls, which run wherever LibTorch runs (CPU here, CUDA on a GPU
//           build): the path a GPU worker takes, checked on the CPU against kFused.
// Both keep one contract, the kernels' (see kernels.h for each formula): "+=" where a gradient
// accumulates, in place where the kernel works in place. Shapes: N rows (tokens), C channels,
// V vocabulary rows (this rank's, under tensor parallelism).
//
// Mixed precision (`train.dtype = "bf16"`, kAten only): activations and their gradients may be
// bfloat16; parameters, their gradients and LayerNorm's mean and rstd are always float32. The
// aten set computes every operation here in float32 and rounds only what it writes into a
// bfloat16 tensor, so only the matrix multiplies (the pieces' own) run in bfloat16.
#ifndef SHOAL_RUNTIME_PIECE_OPS_H_
#define SHOAL_RUNTIME_PIECE_OPS_H_

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace shoal::runtime {

enum class Kernels { kFused, kAten };

// "fused" or "aten".
const char* KernelsName(Kernels k);

// The compute type of activations and matrix multiplies (`train.dtype`); parameters, gradients
// and optimizer states stay float32 either way.
enum class Precision { kFp32, kBf16 };

// "fp32" or "bf16".
const char* PrecisionName(Precision p);
// at::kFloat or at::kBFloat16.
at::ScalarType ComputeType(Precision p);
// Parses `train.dtype`; kInvalidArgument names the value and the choices.
absl::StatusOr<Precision> ParsePrecision(const std::string& name);

// Parses `train.kernels` for a run at `precision`: "fused", "aten", or "auto" (fused at fp32,
// aten at bf16). kInvalidArgument names the value and the choices, and refuses "fused" with
// bf16 (the fused kernels are float32 only).
absl::StatusOr<Kernels> ParseKernels(const std::string& name,
                                     Precision precision = Precision::kFp32);

// What a run computes with: `train.kernels` resolved for `train.dtype` (the one place both are
// read together). Errors as ParsePrecision's, then ParseKernels'.
struct Compute {
  Kernels kernels = Kernels::kFused;
  Precision precision = Precision::kFp32;
};
absl::StatusOr<Compute> ParseCompute(const std::string& kernels, const std::string& dtype);

class PieceOps {
 public:
  virtual ~PieceOps() = default;

  // x (N, C) -> out (N, C); mean and rstd (N) saved for the backward.
  virtual void LayerNormForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                float eps, at::Tensor& out, at::Tensor& mean,
                                at::Tensor& rstd) const = 0;
  // dx += d/dx; dw += sum of dout * xhat; db += sum of dout.
  virtual void LayerNormBackward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                                 at::Tensor& dw, at::Tensor& db) const = 0;
  // GPT-2's GELU (tanh approximation): out = gelu(x); dout_to_dx *= gelu'(x), in place.
  virtual void GeluForward(const at::Tensor& x, at::Tensor& out) const = 0;
  virtual void GeluBackward(const at::Tensor& x, at::Tensor& dout_to_dx) const = 0;
  // scores (R, T, T), in place: each row i becomes softmax(scale * s[i, 0..i]), zeros above the
  // diagonal. Backward, in place into dp: scale * P * (dP - rowsum(dP * P)), zeros above.
  virtual void CausalSoftmaxForward(at::Tensor& scores, float scale) const = 0;
  virtual void CausalSoftmaxBackward(const at::Tensor& p, at::Tensor& dp, float scale) const = 0;
  // logits (N, V) become the softmax probabilities; returns the mean loss against targets (N).
  // Backward, in place: probs -> (probs - onehot(target)) * dloss / N.
  virtual double CrossEntropyForward(at::Tensor& logits_to_probs,
                                     const at::Tensor& targets) const = 0;
  virtual void CrossEntropyBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                                    float dloss) const = 0;
  // tokens (B, T) -> out (B*T, C) = wte[token] + wpe[t]; backward: dwte[token] += dout,
  // dwpe[t] += sum over b of dout.
  virtual void EmbeddingForward(const at::Tensor& tokens, const at::Tensor& wte,
                                const at::Tensor& wpe, at::Tensor& out) const = 0;
  virtual void EmbeddingBackward(const at::Tensor& tokens, const at::Tensor& dout,
                                 at::Tensor& dwte, at::Tensor& dwpe) const = 0;

  // Vocabulary-parallel forms (kernels.h): a rank holds wte rows [v_begin, v_begin + V).
  // out (N, C) = the shard's row of each token, zeros for tokens of other ranks.
  virtual void EmbeddingShardForward(const at::Tensor& tokens, const at::Tensor& wte_shard,
                                     int64_t v_begin, at::Tensor& out) const = 0;
  // out (B*T, C) += wpe[t].
  virtual void AddPositionEmbedding(const at::Tensor& wpe, int64_t batch, int64_t seq,
                                    at::Tensor& out) const = 0;
  virtual void EmbeddingShardBackward(const at::Tensor& tokens, const at::Tensor& dout,
                                      int64_t v_begin, at::Tensor& dwte_shard,
                                      at::Tensor& dwpe) const = 0;
  // The three steps of the vocabulary-parallel loss around the caller's two all-reduces.
  virtual void CrossEntropyShardMax(const at::Tensor& logits, at::Tensor& row_max) const = 0;
  virtual void CrossEntropyShardExp(at::Tensor& logits_to_exp, const at::Tensor& targets,
                                    int64_t v_begin, const at::Tensor& row_max,
                                    at::Tensor& stats) const = 0;
  virtual double CrossEntropyShardFinish(at::Tensor& exp_to_probs,
                                         const at::Tensor& stats) const = 0;
  virtual void CrossEntropyShardBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                                         int64_t v_begin, float dloss) const = 0;
};

// The set for `k` (static; lives for the program).
const PieceOps& OpsFor(Kernels k);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_PIECE_OPS_H_
