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

// Vocabulary-parallel pieces (tensor parallelism): a rank holds the vocabulary rows
// [v_begin, v_begin + v) of wte, so its logits are (N, v) and its embedding lookup only sees ids
// in that range. The statistics a rank computes are summed (or maxed) over the group by the
// caller between the steps below.

// out[r] = wte_shard[tokens[r] - v_begin] for ids in [v_begin, v_begin + v), zeros for the others
// (another rank holds those rows). tokens: (N); out: (N, C).
void EmbeddingShardForward(const int64_t* tokens, const float* wte_shard, int64_t v_begin,
                           int64_t v, int64_t n, int64_t c, float* out);
// out[b, t, :] += wpe[t].  out: (B*T, C).
void AddPositionEmbedding(const float* wpe, int64_t b, int64_t t, int64_t c, float* out);
// dwte_shard[tokens[b, t] - v_begin] += dout[b, t] for ids in this rank's range;
// dwpe[t] += sum_b dout[b, t]. Same order of additions as EmbeddingBackward.
void EmbeddingShardBackward(const int64_t* tokens, const float* dout, int64_t b, int64_t t,
                            int64_t c, int64_t v_begin, int64_t v, float* dwte_shard,
                            float* dwpe);

// Vocabulary-parallel cross-entropy, in three steps around two all-reduces:
//   1. row_max (N) = max of each row of the local logits (N, v) (-inf when v == 0); the caller
//      all-reduces it with MAX.
//   2. Overwrites the logits with exp(l - row_max) and writes stats (2, N): stats[0] = the local
//      sum of those, stats[1] = l[target - v_begin] - row_max where the target is in this shard,
//      else 0; the caller all-reduces stats with SUM.
//   3. Divides the exponentials by the global sums (they become this shard of the softmax) and
//      returns the mean loss, mean(log(sum) - (l[target] - max)).
void CrossEntropyShardMax(const float* logits, int64_t n, int64_t v, float* row_max);
void CrossEntropyShardExp(float* logits_to_exp, const int64_t* targets, int64_t v_begin,
                          int64_t n, int64_t v, const float* row_max, float* stats);
double CrossEntropyShardFinish(float* exp_to_probs, const float* stats, int64_t n, int64_t v);
// In place: probs shard (N, v) -> dlogits = (probs - onehot(target)) * dloss / N, the one-hot
// only where the target is in [v_begin, v_begin + v).
void CrossEntropyShardBackward(float* probs_to_grad, const int64_t* targets, int64_t v_begin,
                               int64_t n, int64_t v, float dloss);

}  // namespace shoal::runtime::kernels

#endif  // SHOAL_RUNTIME_KERNELS_H_
