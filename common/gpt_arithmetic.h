// The GPT's sizes and costs from its shape alone: parameters, FLOPs per token, the activation
// bytes a block keeps for its backward, and the even split of blocks over pipeline stages.
// Written once for everything that plans with them: the layout solver (scheduler/), the trainer's
// memory and activation plans and MFU (runtime/, memory/), the model itself (runtime/gpt.cc) and
// `shoal bench memory`. Plain C++, no LibTorch, so the coordinator uses it too.
//
// The figures describe shoal's model (runtime/gpt.h): GPT-2 with a fused qkv projection, a 4x
// MLP, pre-LayerNorm blocks, learned position embeddings and a head tied to the token embedding,
// fp32 throughout. tests/runtime/runtime_model_arithmetic_test.cc holds every figure to the real
// model: its parameter count and FLOPs, and the activation bytes it measurably holds.
#ifndef SHOAL_COMMON_GPT_ARITHMETIC_H_
#define SHOAL_COMMON_GPT_ARITHMETIC_H_

#include <cstdint>
#include <vector>

namespace shoal {

// The model's shape. Sizes are int64 so products do not overflow.
struct GptShape {
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_embd = 0;      // C
  int64_t block_size = 0;  // T, the context
  int64_t vocab_size = 0;  // V
};

// --- Parameters (the tied head counted once) ---------------------------------------------------

// One block: qkv 3C² + 3C, attention projection C² + C, MLP 4C² + 4C and 4C² + C, two
// LayerNorms 4C.
inline int64_t GptBlockParameters(const GptShape& s) {
  return 12 * s.n_embd * s.n_embd + 13 * s.n_embd;
}
// Token and position embeddings.
inline int64_t GptEmbeddingParameters(const GptShape& s) {
  return (s.vocab_size + s.block_size) * s.n_embd;
}
// The final LayerNorm.
inline int64_t GptFinalParameters(const GptShape& s) { return 2 * s.n_embd; }
// The whole model.
inline int64_t GptParameters(const GptShape& s) {
  return s.n_layer * GptBlockParameters(s) + GptEmbeddingParameters(s) + GptFinalParameters(s);
}
// The weight-decay group (every 2-D weight and both embeddings) and the rest (biases, LayerNorm
// gains); they sum to GptParameters.
inline int64_t GptDecayParameters(const GptShape& s) {
  return GptEmbeddingParameters(s) + s.n_layer * 12 * s.n_embd * s.n_embd;
}
inline int64_t GptNoDecayParameters(const GptShape& s) {
  return s.n_layer * 13 * s.n_embd + GptFinalParameters(s);
}

// --- FLOPs per token of a training step (forward and backward) ----------------------------------
// 6 per parameter that multiplies an activation (2 forward, 4 backward) plus attention: the
// scores and their product with v, 2·2·T·C forward and twice that backward. The position
// embedding is a lookup and costs none; the token embedding's matmul is the head's.

// One block: 6 (12C² + 13C) + 12 T C; its forward is a third.
inline double GptBlockFlopsPerToken(const GptShape& s) {
  return 6.0 * static_cast<double>(GptBlockParameters(s)) +
         12.0 * static_cast<double>(s.block_size) * static_cast<double>(s.n_embd);
}
// The head: logits against the tied wte, and the final LayerNorm.
inline double GptHeadFlopsPerToken(const GptShape& s) {
  return 6.0 * static_cast<double>(s.vocab_size * s.n_embd + GptFinalParameters(s));
}
// The whole model: 6 N + 12 L C T with N the parameters without the position embeddings; what
// MFU divides by.
inline double GptFlopsPerToken(const GptShape& s) {
  return static_cast<double>(s.n_layer) * GptBlockFlopsPerToken(s) + GptHeadFlopsPerToken(s);
}

// --- Activations, bytes per token of a micro-batch (fp32) ---------------------------------------

// What one block keeps between its forward and its backward, with tensor parallelism `tp` (this
// rank's share): per token, the replicated ln1, x1, ln2 and output (4C) and the two LayerNorms'
// mean and rstd (4), and the sharded q|k|v (3C/t), attention output (C/t), MLP hidden and its
// GELU (8C/t) and attention probabilities (H·T/t).
inline double GptBlockActivationBytesPerToken(const GptShape& s, int tp = 1) {
  const double c = static_cast<double>(s.n_embd), t = tp;
  return 4.0 * (4 * c + 12 * c / t + static_cast<double>(s.n_head * s.block_size) / t + 4);
}
// What a block that recomputes (or offloads) its activations keeps: its output.
inline double GptBlockOutputBytesPerToken(const GptShape& s) {
  return 4.0 * static_cast<double>(s.n_embd);
}
// The head's logits and their gradient (vocabulary-parallel with `tp`).
inline double GptHeadActivationBytesPerToken(const GptShape& s, int tp = 1) {
  return 2.0 * 4.0 * static_cast<double>(s.vocab_size) / tp;
}

// --- Pipeline stages ----------------------------------------------------------------------------

// `n_layer` blocks over `stages` stages as evenly as whole blocks allow, the first stages taking
// the remainder: UniformSplit(10, 4) = {3, 3, 2, 2}. Empty for stages <= 0.
inline std::vector<int> UniformSplit(int n_layer, int stages) {
  if (stages <= 0) return {};
  std::vector<int> out(stages, n_layer / stages);
  for (int i = 0; i < n_layer % stages; ++i) ++out[i];
  return out;
}

}  // namespace shoal

#endif  // SHOAL_COMMON_GPT_ARITHMETIC_H_
