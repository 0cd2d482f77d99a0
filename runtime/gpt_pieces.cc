#include "runtime/gpt_pieces.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "memory/activation_offload.h"

namespace shoal::runtime {
namespace {

constexpr float kLnEps = 1e-5f;


// A float32 parameter as an operand of a matrix multiply in `type` (the compute type): itself at
// fp32, rounded to bfloat16 at each use under mixed precision (the master weights stay float32).
at::Tensor Operand(const at::Tensor& value, at::ScalarType type) {
  return value.scalar_type() == type ? value : value.to(type);
}

// Activation tensors: the compute type, on the parameters' device; float32 there for statistics.
at::TensorOptions ActOptions(const Param& p, at::ScalarType type) {
  return p.value.options().dtype(type);
}
at::TensorOptions StatOptions(const Param& p) { return p.value.options().dtype(at::kFloat); }

// grad (float32) += a @ b, where a and b are in the compute type: in place at fp32; under mixed
// precision the product is formed in bfloat16 (float32 accumulation inside) and added.
void AddMatmul(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == grad.scalar_type()) {
    grad.addmm_(a, b);
  } else {
    grad.add_(at::mm(a, b));
  }
}

// y (N, out) = x (N, in) @ W^T + b, in x's type.
void LinearForward(const at::Tensor& x, const Param& w, const Param& b, at::Tensor& y) {
  at::addmm_out(y, Operand(b.value, x.scalar_type()), x,
                Operand(w.value, x.scalar_type()).t());
}

// dx = dy @ W (written, unless dx is null); dW += dy^T @ x; db += dy^T @ 1 (`ones`: N float32
// ones on dy's device; the sum is taken in float32 under mixed precision).
void LinearBackward(const at::Tensor& dy, const at::Tensor& x, const Param& w, const Param* b,
                    const at::Tensor& ones, at::Tensor* dx) {
  if (dx != nullptr) at::mm_out(*dx, dy, Operand(w.value, dy.scalar_type()));
  AddMatmul(w.grad, dy.t(), x);
  if (b == nullptr) return;
  if (dy.scalar_type() == b->grad.scalar_type()) {
    b->grad.addmv_(dy.t(), ones);
  } else {
    b->grad.add_(at::sum(dy, {0}, false, b->grad.scalar_type()));
  }
}


// Row-parallel linear: x (N, in / t) holds this rank's slice of the input features and W its
// matching columns, so x @ W^T is this rank's partial sum of y (N, out); the bias is added once,
// after the sum. Without tensor parallelism, plain LinearForward.
void RowParallelLinearForward(const at::Tensor& x, const Param& w, const Param& b,
                              const TpGroup& tp, const char* where, at::Tensor& y) {
  if (!tp.active()) {
    LinearForward(x, w, b, y);
    return;
  }
  at::mm_out(y, x, Operand(w.value, x.scalar_type()).t());
  tp.AllReduce(y, comm::ReduceOp::kSum, where);
  y.add_(b.value);
}

// The activations of `slot`, grown on first use; slots are small integers (micro-batches in
// flight), so a vector indexed by slot costs nothing on the single-slot path.
template <typename Acts>
Acts& ForwardSlot(std::vector<Acts>& slots, int slot) {
  TORCH_CHECK(slot >= 0, "micro-batch slot ", slot, " is negative");
  if (static_cast<size_t>(slot) >= slots.size()) slots.resize(slot + 1);
  return slots[slot];
}

template <typename Acts>
Acts& BackwardSlot(std::vector<Acts>& slots, int slot) {
  TORCH_CHECK(slot >= 0 && static_cast<size_t>(slot) < slots.size() && slots[slot].batch > 0,
              "backward of micro-batch slot ", slot, ", which has no forward");
  return slots[slot];
}

class EmbeddingPiece final : public Piece {
 public:
  // wte: rows [v_begin, v_begin + wte.size(0)) of the vocabulary of `vocab` ids (all of them
  // without tensor parallelism).
  EmbeddingPiece(Param wte, Param wpe, int vocab, int64_t v_begin, TpGroup tp)
      : wte_(wte), wpe_(wpe), vocab_(vocab), v_begin_(v_begin), tp_(tp) {}

  at::Tensor Forward(const at::Tensor& tokens, const MicroBatch& mb) override {
    TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.dim() == 2,
                "embedding expects contiguous (B, T) int64 token ids");
    const int64_t c = wte_.value.size(1);
    TORCH_CHECK(mb.seq <= wpe_.value.size(0), "sequence length ", mb.seq,
                " exceeds block_size ", wpe_.value.size(0));
    const int64_t* ids = tokens.data_ptr<int64_t>();
    for (int64_t i = 0; i < tokens.numel(); ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < vocab_, "token id ", ids[i], " out of range [0, ",
                  vocab_, ")");
    }
    Acts& a = ForwardSlot(slots_, mb.slot);
    a.tokens = tokens;
    Ensure(a.out, {mb.batch * mb.seq, c}, ActOptions(wte_, compute_type()));
    if (!tp_.active()) {
      ops().EmbeddingForward(tokens, wte_.value, wpe_.value, a.out);
    } else {
      // Vocabulary-parallel: each id's row lives on exactly one rank, the others contribute
      // zeros, so the sum is wte[id] exactly; wpe is added after it, as the unsharded kernel does.
      ops().EmbeddingShardForward(tokens, wte_.value, v_begin_, a.out);
      tp_.AllReduce(a.out, comm::ReduceOp::kSum, "the embedding");
      ops().AddPositionEmbedding(wpe_.value, mb.batch, mb.seq, a.out);
    }
    a.batch = mb.batch;
    a.seq = mb.seq;
    return a.out;
  }

  at::Tensor Backward(const at::Tensor& dout, int slot) override {
    const Acts& a = BackwardSlot(slots_, slot);
    TORCH_CHECK(dout.is_contiguous() && dout.dim() == 2 && dout.size(0) == a.batch * a.seq &&
                    dout.size(1) == wte_.value.size(1),
                "embedding backward expects a contiguous (B*T, C) gradient");
    if (!tp_.active()) {
      ops().EmbeddingBackward(a.tokens, dout, wte_.grad, wpe_.grad);
    } else {
      // dout is the same on every rank: each takes the rows of its own ids, and all the (same)
      // wpe gradient.
      ops().EmbeddingShardBackward(a.tokens, dout, v_begin_, wte_.grad, wpe_.grad);
    }
    return at::Tensor();
  }

 private:
  struct Acts {
    at::Tensor tokens, out;
    int64_t batch = 0, seq = 0;
  };
  Param wte_, wpe_;
  int vocab_;
  int64_t v_begin_;
  TpGroup tp_;
  std::vector<Acts> slots_;
};

class BlockPiece final : public Piece {
 private:
  struct Acts;

 public:
  using Params = BlockParams;
  // n_head: the heads this piece computes (n_head / t of the model's with tensor parallelism),
  // head_dim: D = n_embd / model n_head. With tensor parallelism, qkv and fc are column-parallel
  // (this rank's heads, this rank's slice of the 4C hidden units) and the two projections
  // row-parallel: the block all-reduces twice forward (after each projection) and twice
  // backward (the input gradients of qkv and fc, before the LayerNorms' backward).
  // `block`: its index in the whole model (names its activations on the offloader).
  BlockPiece(Params p, int block, int n_head, int64_t head_dim, TpGroup tp)
      : p_(std::move(p)), block_(block), n_head_(n_head), head_dim_(head_dim), tp_(tp) {}

  at::Tensor Forward(const at::Tensor& x, const MicroBatch& mb) override {
    Acts& a = ForwardSlot(slots_, mb.slot);
    Compute(x, mb.batch, mb.seq, a);
    // Recompute and offload: only the input (kept by reference anyway) and the output (the next
    // piece's input) stay. Recompute runs this forward again at the start of backward (the
    // kernels are deterministic, so the activations, and the gradients, are bit-identical);
    // offload writes the rest to disk now and reads the same bytes back then. A forward-only pass
    // needs neither: its activations are dropped (and an older offloaded set with them).
    if (mode_ == ActivationMode::kOffload && mb.backward) {
      offloader_->Offload(block_, mb.slot, a.Inner());
    } else if (mode_ != ActivationMode::kKeep) {
      if (mode_ == ActivationMode::kOffload) offloader_->Forget(block_, mb.slot);
      a.DropInner();
    }
    return a.out;
  }

  void SetActivationMode(ActivationMode mode, ActivationOffloader* offloader) override {
    TORCH_CHECK(mode != ActivationMode::kOffload || offloader != nullptr,
                "block ", block_, " cannot offload its activations without an offloader");
    mode_ = mode;
    offloader_ = mode == ActivationMode::kOffload ? offloader : nullptr;
  }

  int64_t ActivationBytes() const override {
    int64_t n = 0;
    for (const Acts& a : slots_) {
      for (const at::Tensor* t : {&a.ln1, &a.mean1, &a.rstd1, &a.qkvh, &a.att, &a.y, &a.x1,
                                  &a.ln2, &a.mean2, &a.rstd2, &a.h, &a.g, &a.out}) {
        if (t->defined()) n += t->nbytes();
      }
    }
    return n;
  }

  // The forward pass into `a` (its tensors grown to fit).
  void Compute(const at::Tensor& x, int64_t B, int64_t T, Acts& a) {
    // C: model width; CL = H * D: this rank's attention width (C without tensor parallelism);
    // the MLP's hidden width is fc's row count.
    const int64_t N = B * T, C = x.size(1), H = n_head_, D = head_dim_, CL = H * D,
                  HID = p_.fc_w.value.size(0);
    a.x = x;
    const at::TensorOptions act = ActOptions(p_.qkv_w, compute_type()),
                            stat = StatOptions(p_.qkv_w);
    Ensure(a.ln1, {N, C}, act);
    Ensure(a.mean1, {N}, stat);
    Ensure(a.rstd1, {N}, stat);
    ops().LayerNormForward(x, p_.ln1_w.value, p_.ln1_b.value, kLnEps, a.ln1, a.mean1, a.rstd1);
    // qkv (N, 3CL) -> heads (3, B*H, T, D)
    Ensure(qkv_, {N, 3 * CL}, act);
    LinearForward(a.ln1, p_.qkv_w, p_.qkv_b, qkv_);
    Ensure(a.qkvh, {3, B * H, T, D}, act);
    a.qkvh.view({3, B, H, T, D}).copy_(qkv_.view({B, T, 3, H, D}).permute({2, 0, 3, 1, 4}));
    const at::Tensor q = a.qkvh[0], k = a.qkvh[1], v = a.qkvh[2];
    // att (B*H, T, T) = softmax(q k^T / sqrt(D)) with the causal mask
    Ensure(a.att, {B * H, T, T}, act);
    at::bmm_out(a.att, q, k.transpose(1, 2));
    ops().CausalSoftmaxForward(a.att, 1.0f / std::sqrt(static_cast<float>(D)));
    Ensure(yh_, {B * H, T, D}, act);
    at::bmm_out(yh_, a.att, v);
    // merge heads -> (N, CL), project to (N, C), add the residual
    Ensure(a.y, {N, CL}, act);
    a.y.view({B, T, H, D}).copy_(yh_.view({B, H, T, D}).permute({0, 2, 1, 3}));
    Ensure(a.x1, {N, C}, act);
    RowParallelLinearForward(a.y, p_.proj_w, p_.proj_b, tp_, "attention output projection",
                             a.x1);
    a.x1.add_(x);
    // MLP: LayerNorm, fc (N, HID), GELU, proj, residual
    Ensure(a.ln2, {N, C}, act);
    Ensure(a.mean2, {N}, stat);
    Ensure(a.rstd2, {N}, stat);
    ops().LayerNormForward(a.x1, p_.ln2_w.value, p_.ln2_b.value, kLnEps, a.ln2, a.mean2,
                           a.rstd2);
    Ensure(a.h, {N, HID}, act);
    LinearForward(a.ln2, p_.fc_w, p_.fc_b, a.h);
    Ensure(a.g, {N, HID}, act);
    ops().GeluForward(a.h, a.g);
    Ensure(a.out, {N, C}, act);
    RowParallelLinearForward(a.g, p_.mproj_w, p_.mproj_b, tp_, "MLP output projection", a.out);
    a.out.add_(a.x1);
    a.batch = B;
    a.seq = T;
  }

  at::Tensor Backward(const at::Tensor& dout, int slot) override {
    Acts& a = BackwardSlot(slots_, slot);
    if (!a.ln1.defined()) {
      if (offloader_ != nullptr && offloader_->Holds(block_, slot)) {
        // Offloaded after forward: read back into fresh tensors of the recorded shapes (and
        // start the read of the block whose backward comes next).
        offloader_->Restore(block_, slot, a.Inner());
      } else {
        // Dropped after forward: recompute from the kept input. a.out gets the same values,
        // which the next piece (whose backward has run) no longer needs anyway.
        const at::Tensor x = a.x;
        Compute(x, a.batch, a.seq, a);
      }
    }
    struct DropAfter {
      Acts& a;
      bool on;
      ~DropAfter() {
        if (on) a.DropInner();
      }
    } drop_after{a, mode_ != ActivationMode::kKeep};
    const int64_t B = a.batch, T = a.seq, N = B * T, C = a.x.size(1), H = n_head_, D = head_dim_,
                  CL = H * D, HID = p_.fc_w.value.size(0);
    TORCH_CHECK(dout.is_contiguous() && dout.dim() == 2 && dout.size(0) == N && dout.size(1) == C,
                "block backward expects a contiguous (B*T, C) gradient");
    const at::TensorOptions act = ActOptions(p_.qkv_w, compute_type());
    if (!ones_.defined() || ones_.size(0) != N || ones_.device() != act.device()) {
      ones_ = at::ones({N}, StatOptions(p_.qkv_w));
    }
    // MLP. dout is the same on every rank of a tensor-parallel group, so the replicated
    // mproj bias gets the same gradient everywhere; dln is a partial sum over the hidden units.
    Ensure(dg_, {N, HID}, act);
    LinearBackward(dout, a.g, p_.mproj_w, &p_.mproj_b, ones_, &dg_);
    ops().GeluBackward(a.h, dg_);
    Ensure(dln_, {N, C}, act);
    LinearBackward(dg_, a.ln2, p_.fc_w, &p_.fc_b, ones_, &dln_);
    if (tp_.active()) tp_.AllReduce(dln_, comm::ReduceOp::kSum, "MLP backward");
    Ensure(dx1_, {N, C}, act);
    dx1_.copy_(dout);  // residual path
    ops().LayerNormBackward(dln_, a.x1, p_.ln2_w.value, a.mean2, a.rstd2, dx1_, p_.ln2_w.grad,
                            p_.ln2_b.grad);
    // attention output projection
    Ensure(dy_, {N, CL}, act);
    LinearBackward(dx1_, a.y, p_.proj_w, &p_.proj_b, ones_, &dy_);
    Ensure(dyh_, {B * H, T, D}, act);
    dyh_.view({B, H, T, D}).copy_(dy_.view({B, T, H, D}).permute({0, 2, 1, 3}));
    const at::Tensor q = a.qkvh[0], k = a.qkvh[1], v = a.qkvh[2];
    Ensure(dqkvh_, {3, B * H, T, D}, act);
    // dv = att^T dy;  datt = dy v^T;  dS = softmax backward;  dq = dS k;  dk = dS^T q
    at::Tensor dq = dqkvh_[0], dk = dqkvh_[1], dv = dqkvh_[2];
    at::bmm_out(dv, a.att.transpose(1, 2), dyh_);
    Ensure(datt_, {B * H, T, T}, act);
    at::bmm_out(datt_, dyh_, v.transpose(1, 2));
    ops().CausalSoftmaxBackward(a.att, datt_, 1.0f / std::sqrt(static_cast<float>(D)));
    at::bmm_out(dq, datt_, k);
    at::bmm_out(dk, datt_.transpose(1, 2), q);
    Ensure(dqkv_, {N, 3 * CL}, act);
    dqkv_.view({B, T, 3, H, D}).copy_(dqkvh_.view({3, B, H, T, D}).permute({1, 3, 0, 2, 4}));
    LinearBackward(dqkv_, a.ln1, p_.qkv_w, &p_.qkv_b, ones_, &dln_);
    if (tp_.active()) tp_.AllReduce(dln_, comm::ReduceOp::kSum, "attention backward");
    Ensure(dx_, {N, C}, act);
    dx_.copy_(dx1_);  // residual path
    ops().LayerNormBackward(dln_, a.x, p_.ln1_w.value, a.mean1, a.rstd1, dx_, p_.ln1_w.grad,
                            p_.ln1_b.grad);
    return dx_;
  }

 private:
  // What backward needs from one forward (x is the previous piece's output, kept alive by
  // reference). The forward-only temporaries qkv_ and yh_ are shared by all slots.
  struct Acts {
    at::Tensor x, ln1, mean1, rstd1, qkvh, att, y, x1, ln2, mean2, rstd2, h, g, out;
    int64_t batch = 0, seq = 0;
    // What backward can recompute (all but the input and the output), in the order of
    // BlockInnerActivationShapes.
    std::vector<at::Tensor*> Inner() {
      return {&ln1, &mean1, &rstd1, &qkvh, &att, &y, &x1, &ln2, &mean2, &rstd2, &h, &g};
    }
    void DropInner() {
      for (at::Tensor* t : Inner()) t->reset();
    }
  };
  ActivationMode mode_ = ActivationMode::kKeep;
  ActivationOffloader* offloader_ = nullptr;  // kOffload only; owned by the model
  Params p_;
  int block_;
  int n_head_;
  int64_t head_dim_;
  TpGroup tp_;
  std::vector<Acts> slots_;
  at::Tensor qkv_, yh_;
  // backward scratch
  at::Tensor ones_, dg_, dln_, dx1_, dy_, dyh_, dqkvh_, datt_, dqkv_, dx_;
};

class HeadPiece final : public Piece {
 public:
  // wte: rows [v_begin, v_begin + wte.size(0)) of the vocabulary of `vocab` ids. With tensor
  // parallelism the cross-entropy is vocabulary-parallel: each rank has the logits of its rows
  // only, and the softmax's row maxima and sums (and the target's logit) are all-reduced.
  HeadPiece(Param lnf_w, Param lnf_b, Param wte, int vocab, int64_t v_begin, TpGroup tp)
      : lnf_w_(lnf_w), lnf_b_(lnf_b), wte_(wte), vocab_(vocab), v_begin_(v_begin), tp_(tp) {}

  // Returns the mean loss as a 0-dim tensor, or the logits (B*T, V) when mb.targets is null.
  at::Tensor Forward(const at::Tensor& x, const MicroBatch& mb) override {
    // V: this rank's vocabulary rows (all of them without tensor parallelism).
    const int64_t N = x.size(0), C = x.size(1), V = wte_.value.size(0);
    Acts& a = ForwardSlot(slots_, mb.slot);
    a.x = x;
    a.batch = 0;  // no backward until the loss is known
    const at::TensorOptions act = ActOptions(wte_, compute_type());
    Ensure(a.ln, {N, C}, act);
    Ensure(a.mean, {N}, StatOptions(wte_));
    Ensure(a.rstd, {N}, StatOptions(wte_));
    ops().LayerNormForward(x, lnf_w_.value, lnf_b_.value, kLnEps, a.ln, a.mean, a.rstd);
    Ensure(a.probs, {N, V}, act);
    at::mm_out(a.probs, a.ln, Operand(wte_.value, compute_type()).t());
    if (mb.targets == nullptr) {
      TORCH_CHECK(!tp_.active(), "logits of a tensor-parallel head are not implemented (this rank "
                  "holds vocabulary rows [", v_begin_, ", ", v_begin_ + V, ") of ", vocab_, ")");
      return a.probs;
    }
    a.targets = *mb.targets;
    TORCH_CHECK(a.targets.scalar_type() == at::kLong && a.targets.is_contiguous() &&
                    a.targets.numel() == N,
                "head expects contiguous int64 targets with one id per token");
    const int64_t* t = a.targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(t[i] >= 0 && t[i] < vocab_, "target id ", t[i], " out of range [0, ", vocab_,
                  ")");
    }
    double loss;
    if (!tp_.active()) {
      loss = ops().CrossEntropyForward(a.probs, a.targets);
    } else {
      Ensure(row_max_, {N}, StatOptions(wte_));
      Ensure(stats_, {2, N}, StatOptions(wte_));
      ops().CrossEntropyShardMax(a.probs, row_max_);
      tp_.AllReduce(row_max_, comm::ReduceOp::kMax, "the loss (logit maxima)");
      ops().CrossEntropyShardExp(a.probs, a.targets, v_begin_, row_max_, stats_);
      tp_.AllReduce(stats_, comm::ReduceOp::kSum, "the loss (softmax sums)");
      loss = ops().CrossEntropyShardFinish(a.probs, stats_);
    }
    a.batch = N;
    return at::scalar_tensor(loss, at::kDouble);
  }

  // grad_output: 0-dim, d(objective)/d(loss).
  at::Tensor Backward(const at::Tensor& dloss, int slot) override {
    Acts& a = BackwardSlot(slots_, slot);
    const int64_t N = a.x.size(0), C = a.x.size(1), V = wte_.value.size(0);
    // The probabilities become the logits' gradient in place: one backward per forward.
    a.batch = 0;
    const float scale = static_cast<float>(dloss.item<double>());
    if (!tp_.active()) {
      ops().CrossEntropyBackward(a.probs, a.targets, scale);
    } else {
      ops().CrossEntropyShardBackward(a.probs, a.targets, v_begin_, scale);
    }
    const at::TensorOptions act = ActOptions(wte_, compute_type());
    Ensure(dln_, {N, C}, act);
    at::mm_out(dln_, a.probs, Operand(wte_.value, compute_type()));
    // A sum over the vocabulary: each rank has its rows' share.
    if (tp_.active()) tp_.AllReduce(dln_, comm::ReduceOp::kSum, "the head backward");
    AddMatmul(wte_.grad, a.probs.t(), a.ln);
    Ensure(dx_, {N, C}, act);
    dx_.zero_();
    ops().LayerNormBackward(dln_, a.x, lnf_w_.value, a.mean, a.rstd, dx_, lnf_w_.grad,
                            lnf_b_.grad);
    return dx_;
  }

 private:
  struct Acts {
    at::Tensor x, ln, mean, rstd, probs, targets;
    int64_t batch = 0;  // rows; 0 while the slot holds no loss to differentiate
  };
  Param lnf_w_, lnf_b_, wte_;
  int vocab_;
  int64_t v_begin_;
  TpGroup tp_;
  std::vector<Acts> slots_;
  at::Tensor row_max_, stats_;  // forward-only scratch of the vocabulary-parallel loss
  at::Tensor dln_, dx_;
};

}  // namespace

std::vector<std::vector<int64_t>> BlockInnerActivationShapes(const ModelConfig& config,
                                                              int64_t batch, int64_t seq,
                                                              int tp_size) {
  // As BlockPiece::Compute makes them: CL = this rank's attention width, HID its MLP width.
  const int64_t N = batch * seq, C = config.n_embd, H = config.n_head / tp_size,
                D = config.n_embd / config.n_head, CL = H * D, HID = 4 * C / tp_size;
  return {{N, C}, {N}, {N}, {3, batch * H, seq, D}, {batch * H, seq, seq}, {N, CL},
          {N, C}, {N, C}, {N}, {N}, {N, HID}, {N, HID}};
}

std::unique_ptr<Piece> MakeEmbeddingPiece(Param wte, Param wpe, int vocab, int64_t v_begin,
                                          TpGroup tp) {
  return std::make_unique<EmbeddingPiece>(wte, wpe, vocab, v_begin, tp);
}

std::unique_ptr<Piece> MakeBlockPiece(BlockParams p, int block, int n_head, int64_t head_dim,
                                      TpGroup tp) {
  return std::make_unique<BlockPiece>(std::move(p), block, n_head, head_dim, tp);
}

std::unique_ptr<Piece> MakeHeadPiece(Param lnf_w, Param lnf_b, Param wte, int vocab,
                                     int64_t v_begin, TpGroup tp) {
  return std::make_unique<HeadPiece>(lnf_w, lnf_b, wte, vocab, v_begin, tp);
}

}  // namespace shoal::runtime
