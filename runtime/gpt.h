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
// Pipeline stages: Gpt::CreateStage builds the pieces [first_piece, end_piece) only, with the
// full model's parameter names and initial values. A stage that holds the head but not the
// embedding keeps its own copy of wte (SharedParameters()); the two copies' gradients must be
// summed between the first and the last stage every step.
//
// Tensor parallelism (Megatron style): with a tensor-parallel group of size t (t divides n_head),
// rank r of it holds heads [r H/t, (r+1) H/t) of every block's attention (the matching rows of the
// fused qkv weight and bias, the matching columns of attn.proj.weight), rows [r 4C/t, (r+1) 4C/t)
// of mlp.fc and the matching columns of mlp.proj, and vocabulary rows [r V/t, (r+1) V/t) (floor)
// of wte, for the embedding and for the tied head with its vocabulary-parallel cross-entropy.
// Every other parameter (LayerNorms, wpe, the biases of attn.proj and mlp.proj) is replicated and
// gets the same gradient on every rank of the group. Forward all-reduces the partial outputs of
// the row-parallel linears and of the embedding, and the softmax statistics of the loss; backward
// all-reduces the input gradients of the column-parallel linears and of the head. Every rank of
// the group must run the same passes on the same micro-batches. A failed collective throws
// c10::Error naming it (the trainer turns that into a status). Parameters keep the full model's
// names; ShardSpecs() says how each local tensor relates to the model-wide one, and
// initialisation draws the full tensor and keeps the slice, so a sharded model starts from
// exactly the values of the unsharded one.
//
// Not thread-safe. A piece keeps the activations of the last forward of each micro-batch slot for
// that slot's backward; slots let a pipeline keep several micro-batches in flight (1F1B) without
// copying activations. The kernels inside use the LibTorch/OpenMP pool and BLAS threads.
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
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend.h"
#include "memory/flat_buffer.h"
#include "memory/state_paging.h"
#include "runtime/config.h"
#include "runtime/piece_ops.h"

namespace shoal::runtime {

}  // namespace shoal::runtime
namespace shoal::memory {
class ActivationOffloader;  // memory/activation_offload.h
}  // namespace shoal::memory
namespace shoal::runtime {
using memory::ActivationOffloader;

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
  // Activation slot: a piece keeps one set of activations per slot, so a pipeline can run the
  // forwards of several micro-batches before their backwards. Slot 0 is the single-process path.
  int slot = 0;
  // False for a forward-only pass (Loss, Logits): no backward will read this forward's
  // activations, so a block that offloads them does not write them out.
  bool backward = true;
};

// The activation plan's choice for one transformer block, between its forward and its backward.
enum class ActivationMode {
  kKeep,       // hold every activation its backward reads
  kRecompute,  // hold only its output; run the forward again at the start of the backward
  kOffload,    // hold only its output; write the rest to the disk tier and read it back
};
const char* ActivationModeName(ActivationMode mode);

// Shapes of the activations a block frees between forward and backward unless it keeps them
// (ln1, mean1, rstd1, qkvh, att, y, x1, ln2, mean2, rstd2, h, g), for a micro-batch of
// (batch, seq) tokens; `tp_size`: this rank's share of the heads and hidden units.
std::vector<std::vector<int64_t>> BlockInnerActivationShapes(const ModelConfig& config,
                                                              int64_t batch, int64_t seq,
                                                              int tp_size = 1);

class Piece {
 public:
  virtual ~Piece() = default;
  // Forward: input -> output. The returned tensor stays valid until the next Forward in the same
  // slot. `input` is kept by reference for the backward: it must not change until then.
  virtual at::Tensor Forward(const at::Tensor& input, const MicroBatch& mb) = 0;
  // Backward of the last Forward in `slot`: gradient of the output -> gradient of the input
  // (undefined for the embedding), valid until the next Backward of this piece. Adds the
  // parameter gradients into their gradient views.
  virtual at::Tensor Backward(const at::Tensor& grad_output, int slot = 0) = 0;
  // Activation plan: a piece that recomputes or offloads keeps only its input and output between
  // its forward and its backward, which either runs the forward again first or reads the rest
  // back from `offloader` (not owned; needed for kOffload). Either way the backward sees the same
  // bits, so gradients are identical. Only transformer blocks do; other pieces ignore it.
  virtual void SetActivationMode(ActivationMode mode, ActivationOffloader* offloader) {
    (void)mode;
    (void)offloader;
  }
  void SetRecompute(bool on) {
    SetActivationMode(on ? ActivationMode::kRecompute : ActivationMode::kKeep, nullptr);
  }
  // Bytes of activations the piece holds now in tensors (all slots; its input not counted; an
  // offloader's staging buffers not counted).
  virtual int64_t ActivationBytes() const { return 0; }
  // The operations it computes with (runtime/piece_ops.h); the fused CPU kernels until set.
  void SetOps(const PieceOps& ops) { ops_ = &ops; }
  // The type of its activations and matrix multiplies (at::kFloat until set; at::kBFloat16 needs
  // the aten operations). Parameters and their gradients stay float32.
  void SetComputeType(at::ScalarType type) { compute_type_ = type; }

 protected:
  const PieceOps& ops() const { return *ops_; }
  at::ScalarType compute_type() const { return compute_type_; }

 private:
  const PieceOps* ops_ = &OpsFor(Kernels::kFused);
  at::ScalarType compute_type_ = at::kFloat;
};

// Parameter declaration used while laying out the flat buffers.
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  enum class Init { kNormal, kZeros, kOnes } init = Init::kZeros;
  double std = 0.0;   // for kNormal
  bool decay = false; // 2-D weights
};

// How a local parameter relates to the model-wide tensor of the same name: the local tensor is
// `full` narrowed along `dim` to [offset, offset + length) within each of `parts` equal blocks of
// that dimension, concatenated (the fused q|k|v rows are 3 blocks). dim == -1: replicated, the
// local tensor is the full one.
struct ShardSpec {
  std::vector<int64_t> full_shape;
  int dim = -1;
  int parts = 1;
  int64_t offset = 0;
  int64_t length = 0;
};

// The shape of the local tensor `spec` describes.
std::vector<int64_t> ShardShape(const ShardSpec& spec);
// The local shard of `full` (a new contiguous tensor). REQUIRES: full.sizes() == spec.full_shape.
at::Tensor SliceShard(const at::Tensor& full, const ShardSpec& spec);
// Writes `local` into its place in `full`. REQUIRES: shapes as above.
void PlaceShard(const at::Tensor& local, const ShardSpec& spec, at::Tensor& full);

// The tensor-parallel group of a model (see above). A null group, or one of size 1, means none.
struct TensorParallel {
  comm::Backend* group = nullptr;              // not owned; outlives the model
  absl::Duration timeout = absl::Seconds(60);  // of each collective
};

// Paged parameters and gradients (memory/state_paging.h; implemented by memory/model_pager.h).
using memory::StatePager;

class Gpt {
 public:
  // Lays out and initialises the parameters: GPT-2 init, N(0, 0.02) for weights and embeddings,
  // N(0, 0.02 / sqrt(2 n_layer)) for the two residual projections of every block, zero biases,
  // unit LayerNorm gains; drawn from a generator seeded with `seed`, in declaration order.
  // `pad_multiple`: each flat buffer's size is rounded up to a multiple of it (the data-parallel
  // group size, so ZeRO-1 shards are equal).
  // With `pager` (not owned; outlives the model): the decay group is paged (see StatePager).
  Gpt(const ModelConfig& config, uint64_t seed, int64_t pad_multiple = 1,
      StatePager* pager = nullptr);
  ~Gpt();

  // A pipeline stage: pieces [first_piece, end_piece) of the full model (piece 0 = embedding,
  // 1..n_layer = blocks, n_layer + 1 = head). Its parameters are exactly those of its pieces (plus
  // a copy of wte when it holds the head but not the embedding), named as in the full model and
  // initialised to the values the full model gives them for `seed`. kInvalidArgument names the
  // numbers of a bad range.
  // With `tp`: this rank's tensor-parallel shard of those pieces (kInvalidArgument when the
  // group's size does not divide n_head, or exceeds vocab_size, naming both numbers).
  static absl::StatusOr<std::unique_ptr<Gpt>> CreateStage(const ModelConfig& config,
                                                          uint64_t seed, int first_piece,
                                                          int end_piece,
                                                          int64_t pad_multiple = 1,
                                                          const TensorParallel& tp = {});

  // Stage-level passes for a pipeline executor. Forward: `input` is the (B, T) int64 token ids on
  // the stage holding the embedding, else the previous stage's activation (B, T, C) float32,
  // which must stay unchanged until this micro-batch's StageBackward. mb.targets is needed on the
  // last stage, which returns the mean loss (0-dim double); other stages return their output
  // activation (B, T, C), valid until the next StageForward in the same slot.
  at::Tensor StageForward(const at::Tensor& input, const MicroBatch& mb);
  // Backward of slot `slot`'s last StageForward. grad_output: the gradient of this stage's output
  // (B, T, C); undefined on the last stage, where backward starts from the loss scaled by
  // `loss_scale`. Adds into the gradient buffers; returns the gradient of the stage's input
  // (B, T, C), valid until the next StageBackward, or an undefined tensor on the first stage.
  at::Tensor StageBackward(const at::Tensor& grad_output, float loss_scale, int slot = 0);

  int first_piece() const { return first_piece_; }
  int end_piece() const { return end_piece_; }
  bool has_embedding() const { return first_piece_ == 0; }
  bool has_head() const { return end_piece_ == config_.n_layer + 2; }
  bool is_full_model() const { return has_embedding() && has_head(); }
  // Parameters that another stage holds a copy of and whose gradients must be summed across the
  // stages every step: {"wte.weight"} on a stage holding exactly one of embedding and head.
  std::vector<std::string> SharedParameters() const;

  // Full model only (as are Loss and Logits). One micro-batch: forward, loss, backward with the
  // loss scaled by `loss_scale` (1 / grad_accum for a mean over micro-batches). Gradients are ADDED to the gradient buffers.
  // tokens, targets: (B, T) int64 with T <= block_size. Returns the (unscaled) mean loss.
  // `on_piece_done(p)`, if given, runs right after piece p's backward (pieces run in reverse),
  // when the gradients of PieceParams(p) are final: data parallelism starts its all-reduce there.
  double ForwardBackward(const at::Tensor& tokens, const at::Tensor& targets, float loss_scale,
                         const std::function<void(int piece)>& on_piece_done = nullptr);
  // Forward only; returns the mean loss. Gradients untouched.
  double Loss(const at::Tensor& tokens, const at::Tensor& targets);
  // Forward only; the logits (B, T, V) as a new tensor. Not with tensor parallelism (each rank
  // holds a slice of the vocabulary): throws c10::Error.
  at::Tensor Logits(const at::Tensor& tokens);

  void ZeroGrad();

  // The activation plan: `modes[l]` for block l (n_layer entries on the full model; a stage
  // takes its own blocks' entries). kOffload needs `offloader`, opened for those blocks, which
  // the model keeps (replacing any earlier one); call between steps, not between a forward and
  // its backward. SetBlockRecompute is the keep-or-recompute form. Throws c10::Error for a wrong
  // number of entries or kOffload without an offloader.
  void SetBlockActivationModes(const std::vector<ActivationMode>& modes,
                               std::unique_ptr<ActivationOffloader> offloader = nullptr);
  void SetBlockRecompute(const std::vector<bool>& recompute);
  // The operations every piece computes with (`train.kernels`; runtime/piece_ops.h): the fused
  // CPU kernels until set. Call between steps.
  void SetKernels(Kernels kernels);
  // The pieces' compute type (`train.dtype`): fp32 until set. With bf16, activations and matrix
  // multiplies are bfloat16 (the weights rounded at each use) and need the aten kernels;
  // parameters, gradients and the loss stay float32 (a stage's boundary activations are
  // bfloat16). Call between steps. Throws c10::Error for bf16 with tensor parallelism.
  void SetPrecision(Precision precision);
  // Bytes of activations its pieces hold now in tensors (the offloader's staging buffers, at most
  // its staging_buffers x slot_bytes, apart).
  int64_t ActivationBytes() const;
  // The offloader SetBlockActivationModes was given, or null.
  ActivationOffloader* activation_offloader() const { return offloader_.get(); }

  memory::FlatBuffer& params(int group) { return params_[group]; }
  memory::FlatBuffer& grads(int group) { return grads_[group]; }
  static constexpr int kDecay = 0;
  static constexpr int kNoDecay = 1;

  // All parameters (or their gradients) by name, in declaration order; views (copies, read
  // through the pager, when the model is paged: then NamedGradients is not available).
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  std::vector<std::pair<std::string, at::Tensor>> NamedGradients() const;
  // For each of NamedParameters(), in the same order: how it relates to the model-wide tensor.
  std::vector<ShardSpec> ShardSpecs() const;
  // Tensor-parallel rank and size (0 and 1 without tensor parallelism).
  int tp_rank() const;
  int tp_size() const;

  // Copies values in by name. Every parameter must be present, float32, with the MODEL-WIDE
  // shape (its ShardSpec's full_shape; this rank keeps its slice); kDataLoss names the first that
  // is not. Nothing is copied unless all are right.
  absl::Status LoadParameters(const std::vector<std::pair<std::string, at::Tensor>>& named);

  // Parameter count N (everything this model holds, tied head counted once) and N without
  // position embeddings. With tensor parallelism: this rank's shards, plus the replicated
  // parameters in full.
  int64_t NumParameters() const;
  int64_t NumParametersNoPos() const;
  // Model FLOPs per token of a training step: 6 N + 12 n_layer n_embd block_size, where N
  // excludes the position embeddings (they cost no matmul). On a stage: its own blocks, and wte
  // only where the head multiplies by it (the embedding's use is a lookup). With tensor
  // parallelism: this rank's share (its shards, and its n_head / t heads of attention).
  double FlopsPerToken() const;

  // Parameters as (group, entry index into params(group)) whose gradients are final once piece
  // p's backward has run; p indexes pieces() (on a stage, piece first_piece() + p of the full
  // model). The tied wte belongs to the embedding (piece 0), which runs last; on a stage holding
  // the head but not the embedding, its wte copy belongs to the head.
  const std::vector<std::pair<int, int>>& PieceParams(int piece) const {
    return piece_params_[piece];
  }
  // Every parameter in the order backward finishes them.
  std::vector<std::pair<int, int>> BackwardReadyOrder() const;

  const ModelConfig& config() const { return config_; }
  const std::vector<std::unique_ptr<Piece>>& pieces() const { return pieces_; }

 private:
  // `tp`: already validated (its size divides n_head); a null group or one of size 1 is none.
  Gpt(const ModelConfig& config, uint64_t seed, int first_piece, int end_piece,
      int64_t pad_multiple, const TensorParallel& tp, StatePager* pager = nullptr);
  // Runs piece p's pass between the pager's Begin and End (directly without a pager).
  at::Tensor RunForward(int p, const at::Tensor& x, const MicroBatch& mb);
  at::Tensor RunBackward(int p, const at::Tensor& g, int slot);
  Param Lookup(const std::string& name) const;

  ModelConfig config_;
  int first_piece_ = 0;
  int end_piece_ = 0;
  TensorParallel tp_;  // group null without tensor parallelism
  StatePager* pager_ = nullptr;  // not owned; null: nothing paged
  // Paged: the piece whose Begin(kRead / kWrite) covers each declared parameter (index as
  // names_), -1 for the no-decay group, which is never paged.
  std::vector<int> page_piece_;
  int tp_rank_ = 0;
  int tp_size_ = 1;
  std::vector<ShardSpec> shard_specs_;  // per parameter, in NamedParameters() order
  memory::FlatBuffer params_[2];
  memory::FlatBuffer grads_[2];
  std::vector<std::pair<int, int>> where_;   // per declared param: (group, index)
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<Piece>> pieces_;
  std::vector<std::vector<std::pair<int, int>>> piece_params_;
  at::Tensor loss_grad_;
  std::unique_ptr<ActivationOffloader> offloader_;  // blocks that offload use it; may be null
  // Per micro-batch slot, (B, T) of the StageForward awaiting its StageBackward; (0, 0) if none.
  std::vector<std::pair<int64_t, int64_t>> slot_shapes_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_GPT_H_
