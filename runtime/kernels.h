// CPU kernels for the GPT forward and backward passes that are not matrix multiplies (those go
// to BLAS through ATen). Each works on contiguous float32 rows, splits rows over the
// LibTorch/OpenMP pool, and is deterministic for a given thread count: reductions across rows
// (LayerNorm gain/bias gradients) sum fixed blocks in a fixed order, never atomics.
// Shapes in comments: N rows (= B*T tokens), C channels.
#ifndef SHOAL_RUNTIME_KERNELS_H_
#define SHOAL_RUNTIME_KERNELS_H_

#include <cstdint>

namespace shoal::runtime::kernels {

// out = (x - mean) * rstd * w + b per row; saves mean and rstd (N) for the backward pass.
void LayerNormForward(const float* x, const float* w, const float* b, int64_t n, int64_t c,
                      float eps, float* out, float* mean, float* rstd);

// dx += d/dx; dw += sum over rows of dout * xhat; db += sum of dout.  x: (N, C).
void LayerNormBackward(const float* dout, const float* x, const float* w, const float* mean,
                       const float* rstd, int64_t n, int64_t c, float* dx, float* dw, float* db);

// GELU with the tanh approximation (GPT-2's): out = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))).
void GeluForward(const float* x, int64_t n, float* out);
// dx = dout * gelu'(x); dx may alias dout.
void GeluBackward(const float* x, const float* dout, int64_t n, float* dx);

// In place over `rows` score matrices of (T, T): row i becomes softmax(scale * s[i, 0..i]) with
// zeros above the diagonal (causal attention). REQUIRES: scale > 0.
void CausalSoftmaxForward(float* scores, int64_t rows, int64_t t, float scale);
// dS = scale * P * (dP - rowsum(dP * P)), lower triangle only, zeros above; in place into dp.
void CausalSoftmaxBackward(const float* p, float* dp, int64_t rows, int64_t t, float scale);

// Mean cross-entropy of logits (N, V) against targets (N). Overwrites logits with the softmax
// probabilities (kept for the backward) and returns the mean loss.
double CrossEntropyForward(float* logits_to_probs, const int64_t* targets, int64_t n, int64_t v);
// In place: probs (N, V) -> dlogits = (probs - onehot(target)) * dloss / N.
void CrossEntropyBackward(float* probs_to_grad, const int64_t* targets, int64_t n, int64_t v,
                          float dloss);

// out[b, t, :] = wte[tokens[b, t]] + wpe[t].  tokens: (B, T); out: (B*T, C).
void EmbeddingForward(const int64_t* tokens, const float* wte, const float* wpe, int64_t b,
                      int64_t t, int64_t c, float* out);
// dwte[tokens[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]. Parallel over channel slices,
// so there are no races and the order of additions is fixed.
void EmbeddingBackward(const int64_t* tokens, const float* dout, int64_t b, int64_t t, int64_t c,
                       float* dwte, float* dwpe);

}  // namespace shoal::runtime::kernels

#endif  // SHOAL_RUNTIME_KERNELS_H_
