// The GPT decoder (GPT-2 architecture) with a hand-written backward pass.
//
// The model is an ordered list of pieces: [Embedding, Block 0, ..., Block L-1, Head]. A piece
// maps one activation to the next (the embedding takes token ids, the head returns the loss), so
// a pipeline stage can later hold any contiguous range of them. Every parameter is a view into
// one of two flat buffers owned by the model, "decay" (2-D weights) and "no_decay" (biases and
// LayerNorm gains), with gradient buffers of the same layout; backward accumulates straight into
// the gradient views (addmm with beta = 1), so gradient accumulation costs no extra pass.
//
// Names follow the safetensors checkpoint: "wte.weight", "wpe.weight",
// "blocks.<i>.ln1.{weight,bias}", "blocks.<i>.attn.qkv.{weight,bias}" (fused q|k|v, (3C, C)),
// "blocks.<i>.attn.proj.{weight,bias}", "blocks.<i>.ln2.{weight,bias}",
// "blocks.<i>.mlp.fc.{weight,bias}", "blocks.<i>.mlp.proj.{weight,bias}", "ln_f.{weight,bias}".
// Linear weights are (out, in) as in torch.nn.Linear. The head is tied to wte.
//
// Not thread-safe (pieces keep the activations of the last forward for their backward); the
// kernels inside use the LibTorch/OpenMP pool and BLAS threads.
#ifndef SHOAL_RUNTIME_GPT_H_
#define SHOAL_RUNTIME_GPT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "memory/flat_buffer.h"
#include "runtime/config.h"

namespace shoal::runtime {

// A parameter as a piece sees it: its value and gradient views.
struct Param {
  at::Tensor value;
  at::Tensor grad;
};

// What a piece's Forward needs besides its input.
struct MicroBatch {
  const at::Tensor* targets = nullptr;  // (B, T) int64, for the head
  int64_t batch = 0;                    // B
  int64_t seq = 0;                      // T
};

class Piece {
 public:
  virtual ~Piece() = default;
  // Forward: input -> output. The returned tensor stays valid until the next Forward.
  virtual at::Tensor Forward(const at::Tensor& input, const MicroBatch& mb) = 0;
  // Backward of the last Forward: gradient of the output -> gradient of the input (undefined for
  // the embedding). Adds the parameter gradients into their gradient views.
  virtual at::Tensor Backward(const at::Tensor& grad_output) = 0;
};

// Parameter declaration used while laying out the flat buffers.
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  enum class Init { kNormal, kZeros, kOnes } init = Init::kZeros;
  double std = 0.0;   // for kNormal
  bool decay = false; // 2-D weights
};

class Gpt {
 public:
  // Lays out and initialises the parameters: GPT-2 init, N(0, 0.02) for weights and embeddings,
  // N(0, 0.02 / sqrt(2 n_layer)) for the two residual projections of every block, zero biases,
  // unit LayerNorm gains; drawn from a generator seeded with `seed`, in declaration order.
  // `pad_multiple`: each flat buffer's size is rounded up to a multiple of it (the data-parallel
  // group size, so ZeRO-1 shards are equal).
  Gpt(const ModelConfig& config, uint64_t seed, int64_t pad_multiple = 1);
  ~Gpt();

  // One micro-batch: forward, loss, backward with the loss scaled by `loss_scale` (1 / grad_accum
  // for a mean over micro-batches). Gradients are ADDED to the gradient buffers.
  // tokens, targets: (B, T) int64 with T <= block_size. Returns the (unscaled) mean loss.
  // `on_piece_done(p)`, if given, runs right after piece p's backward (pieces run in reverse),
  // when the gradients of PieceParams(p) are final: data parallelism starts its all-reduce there.
  double ForwardBackward(const at::Tensor& tokens, const at::Tensor& targets, float loss_scale,
                         const std::function<void(int piece)>& on_piece_done = nullptr);
  // Forward only; returns the mean loss. Gradients untouched.
  double Loss(const at::Tensor& tokens, const at::Tensor& targets);
  // Forward only; the logits (B, T, V) as a new tensor.
  at::Tensor Logits(const at::Tensor& tokens);

  void ZeroGrad();

  memory::FlatBuffer& params(int group) { return params_[group]; }
  memory::FlatBuffer& grads(int group) { return grads_[group]; }
  static constexpr int kDecay = 0;
  static constexpr int kNoDecay = 1;

  // All parameters (or their gradients) by name, in declaration order; views.
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  std::vector<std::pair<std::string, at::Tensor>> NamedGradients() const;
  // Copies values in by name. Every parameter must be present with its exact shape and float32;
  // kDataLoss names the first that is not. Nothing is copied unless all are right.
  absl::Status LoadParameters(const std::vector<std::pair<std::string, at::Tensor>>& named);

  // Parameter count N (everything, tied head counted once) and N without position embeddings.
  int64_t NumParameters() const;
  int64_t NumParametersNoPos() const;
  // Model FLOPs per token of a training step: 6 N + 12 n_layer n_embd block_size, where N
  // excludes the position embeddings (they cost no matmul).
  double FlopsPerToken() const;

  // Parameters as (group, entry index into params(group)) whose gradients are final once piece
  // p's backward has run. The tied wte belongs to the embedding (piece 0), which runs last.
  const std::vector<std::pair<int, int>>& PieceParams(int piece) const {
    return piece_params_[piece];
  }
  // Every parameter in the order backward finishes them.
  std::vector<std::pair<int, int>> BackwardReadyOrder() const;

  const ModelConfig& config() const { return config_; }
  const std::vector<std::unique_ptr<Piece>>& pieces() const { return pieces_; }

 private:
  Param Lookup(const std::string& name) const;

  ModelConfig config_;
  memory::FlatBuffer params_[2];
  memory::FlatBuffer grads_[2];
  std::vector<std::pair<int, int>> where_;   // per declared param: (group, index)
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<Piece>> pieces_;
  std::vector<std::vector<std::pair<int, int>>> piece_params_;
  at::Tensor loss_grad_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_GPT_H_
