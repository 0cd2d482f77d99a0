#include "runtime/piece_ops.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/kernels.h"

namespace shoal::runtime {
namespace {

float* F(const at::Tensor& t) { return t.data_ptr<float>(); }
const int64_t* I(const at::Tensor& t) { return t.data_ptr<int64_t>(); }

// The fused CPU kernels (runtime/kernels.h) on the tensors' storage: contiguous float32 (int64
// ids) on the CPU, as the pieces make them.
class FusedOps final : public PieceOps {
 public:
  void LayerNormForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, float eps,
                        at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) const override {
    kernels::LayerNormForward(F(x), F(w), F(b), x.size(0), x.size(1), eps, F(out), F(mean),
                              F(rstd));
  }
  void LayerNormBackward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                         at::Tensor& dw, at::Tensor& db) const override {
    kernels::LayerNormBackward(F(dout), F(x), F(w), F(mean), F(rstd), x.size(0), x.size(1), F(dx),
                               F(dw), F(db));
  }
  void GeluForward(const at::Tensor& x, at::Tensor& out) const override {
    kernels::GeluForward(F(x), x.numel(), F(out));
  }
  void GeluBackward(const at::Tensor& x, at::Tensor& dout_to_dx) const override {
    kernels::GeluBackward(F(x), F(dout_to_dx), x.numel(), F(dout_to_dx));
  }
  void CausalSoftmaxForward(at::Tensor& scores, float scale) const override {
    kernels::CausalSoftmaxForward(F(scores), scores.size(0), scores.size(1), scale);
  }
  void CausalSoftmaxBackward(const at::Tensor& p, at::Tensor& dp, float scale) const override {
    kernels::CausalSoftmaxBackward(F(p), F(dp), p.size(0), p.size(1), scale);
  }
  double CrossEntropyForward(at::Tensor& logits_to_probs,
                             const at::Tensor& targets) const override {
    return kernels::CrossEntropyForward(F(logits_to_probs), I(targets), logits_to_probs.size(0),
                                        logits_to_probs.size(1));
  }
  void CrossEntropyBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                            float dloss) const override {
    kernels::CrossEntropyBackward(F(probs_to_grad), I(targets), probs_to_grad.size(0),
                                  probs_to_grad.size(1), dloss);
  }
  void EmbeddingForward(const at::Tensor& tokens, const at::Tensor& wte, const at::Tensor& wpe,
                        at::Tensor& out) const override {
    kernels::EmbeddingForward(I(tokens), F(wte), F(wpe), tokens.size(0), tokens.size(1),
                              wte.size(1), F(out));
  }
  void EmbeddingBackward(const at::Tensor& tokens, const at::Tensor& dout, at::Tensor& dwte,
                         at::Tensor& dwpe) const override {
    kernels::EmbeddingBackward(I(tokens), F(dout), tokens.size(0), tokens.size(1), dwte.size(1),
                               F(dwte), F(dwpe));
  }
  void EmbeddingShardForward(const at::Tensor& tokens, const at::Tensor& wte_shard,
                             int64_t v_begin, at::Tensor& out) const override {
    kernels::EmbeddingShardForward(I(tokens), F(wte_shard), v_begin, wte_shard.size(0),
                                   tokens.numel(), out.size(1), F(out));
  }
  void AddPositionEmbedding(const at::Tensor& wpe, int64_t batch, int64_t seq,
                            at::Tensor& out) const override {
    kernels::AddPositionEmbedding(F(wpe), batch, seq, out.size(1), F(out));
  }
  void EmbeddingShardBackward(const at::Tensor& tokens, const at::Tensor& dout, int64_t v_begin,
                              at::Tensor& dwte_shard, at::Tensor& dwpe) const override {
    kernels::EmbeddingShardBackward(I(tokens), F(dout), tokens.size(0), tokens.size(1),
                                    dout.size(1), v_begin, dwte_shard.size(0), F(dwte_shard),
                                    F(dwpe));
  }
  void CrossEntropyShardMax(const at::Tensor& logits, at::Tensor& row_max) const override {
    kernels::CrossEntropyShardMax(F(logits), logits.size(0), logits.size(1), F(row_max));
  }
  void CrossEntropyShardExp(at::Tensor& logits_to_exp, const at::Tensor& targets,
                            int64_t v_begin, const at::Tensor& row_max,
                            at::Tensor& stats) const override {
    kernels::CrossEntropyShardExp(F(logits_to_exp), I(targets), v_begin, logits_to_exp.size(0),
                                  logits_to_exp.size(1), F(row_max), F(stats));
  }
  double CrossEntropyShardFinish(at::Tensor& exp_to_probs,
                                 const at::Tensor& stats) const override {
    return kernels::CrossEntropyShardFinish(F(exp_to_probs), F(stats), exp_to_probs.size(0),
                                            exp_to_probs.size(1));
  }
  void CrossEntropyShardBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                                 int64_t v_begin, float dloss) const override {
    kernels::CrossEntropyShardBackward(F(probs_to_grad), I(targets), v_begin,
                                       probs_to_grad.size(0), probs_to_grad.size(1), dloss);
  }
};

// `t` as float32: itself when it is, else a float32 copy (mixed precision: see piece_ops.h).
at::Tensor Up(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// Device-generic ATen calls: no raw pointers, so the same code runs on any device's tensors.
// Activations may be bfloat16 (train.dtype): each operation computes in float32 (Up) and writes
// its result back in the destination's type; float32 tensors take no extra copy.
class AtenOps final : public PieceOps {
 public:
  void LayerNormForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, float eps,
                        at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) const override {
    auto [y, m, r] = at::native_layer_norm(Up(x), {x.size(1)}, w, b, eps);
    out.copy_(y);
    mean.copy_(m.view({-1}));
    rstd.copy_(r.view({-1}));
  }
  void LayerNormBackward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                         at::Tensor& dw, at::Tensor& db) const override {
    const int64_t n = x.size(0);
    const at::Tensor d = Up(dout);
    auto [gx, gw, unused] = at::native_layer_norm_backward(
        d, Up(x), {x.size(1)}, mean.view({n, 1}), rstd.view({n, 1}), w, at::Tensor(),
        {true, true, false});
    dx.add_(gx);
    dw.add_(gw);
    db.add_(d.sum(0));
  }
  void GeluForward(const at::Tensor& x, at::Tensor& out) const override {
    if (x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat) {
      at::gelu_out(out, x, "tanh");
    } else {
      out.copy_(at::gelu(Up(x), "tanh"));
    }
  }
  void GeluBackward(const at::Tensor& x, at::Tensor& dout_to_dx) const override {
    dout_to_dx.copy_(at::gelu_backward(Up(dout_to_dx), Up(x), "tanh"));
  }
  void CausalSoftmaxForward(at::Tensor& scores, float scale) const override {
    at::Tensor s = Up(scores);  // scores itself when float32
    s.mul_(scale).masked_fill_(Above(scores), -std::numeric_limits<float>::infinity());
    scores.copy_(at::_softmax(s, -1, false));
  }
  void CausalSoftmaxBackward(const at::Tensor& p, at::Tensor& dp, float scale) const override {
    // P is 0 above the diagonal, so the gradient is too.
    dp.copy_(at::_softmax_backward_data(Up(dp), Up(p), -1, at::kFloat).mul_(scale));
  }
  double CrossEntropyForward(at::Tensor& logits_to_probs,
                             const at::Tensor& targets) const override {
    at::Tensor l = Up(logits_to_probs);  // logits_to_probs itself when float32
    const at::Tensor lse = at::logsumexp(l, {1});
    const at::Tensor target_logit = l.gather(1, targets.view({-1, 1})).view({-1});
    const double loss = (lse.to(at::kDouble) - target_logit.to(at::kDouble)).mean().item<double>();
    l.sub_(lse.unsqueeze(1)).exp_();
    if (!l.is_same(logits_to_probs)) logits_to_probs.copy_(l);
    return loss;
  }
  void CrossEntropyBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                            float dloss) const override {
    const float scale = dloss / static_cast<float>(probs_to_grad.size(0));
    probs_to_grad.mul_(scale);
    probs_to_grad.scatter_add_(1, targets.view({-1, 1}),
                               at::full({targets.numel(), 1}, -scale, probs_to_grad.options()));
  }
  void EmbeddingForward(const at::Tensor& tokens, const at::Tensor& wte, const at::Tensor& wpe,
                        at::Tensor& out) const override {
    const int64_t b = tokens.size(0), t = tokens.size(1), c = wte.size(1);
    if (out.scalar_type() == wte.scalar_type()) {
      at::index_select_out(out, wte, 0, tokens.view({-1}));
      out.view({b, t, c}).add_(wpe.narrow(0, 0, t));
    } else {  // summed in float32, rounded once
      out.view({b, t, c})
          .copy_(wte.index_select(0, tokens.view({-1})).view({b, t, c}).add_(wpe.narrow(0, 0, t)));
    }
  }
  void EmbeddingBackward(const at::Tensor& tokens, const at::Tensor& dout, at::Tensor& dwte,
                         at::Tensor& dwpe) const override {
    const at::Tensor d = Up(dout);
    dwte.index_add_(0, tokens.view({-1}), d);
    AddPositionGrad(d, tokens.size(0), tokens.size(1), dwpe);
  }
  void EmbeddingShardForward(const at::Tensor& tokens, const at::Tensor& wte_shard,
                             int64_t v_begin, at::Tensor& out) const override {
    const int64_t v = wte_shard.size(0);
    if (v == 0) {
      out.zero_();
      return;
    }
    const at::Tensor local = tokens.view({-1}) - v_begin;
    const at::Tensor mine = local.ge(0).logical_and_(local.lt(v));
    at::index_select_out(out, wte_shard, 0, local.clamp(0, v - 1));
    out.masked_fill_(mine.logical_not().unsqueeze(1), 0.0);
  }
  void AddPositionEmbedding(const at::Tensor& wpe, int64_t batch, int64_t seq,
                            at::Tensor& out) const override {
    out.view({batch, seq, out.size(1)}).add_(wpe.narrow(0, 0, seq));
  }
  void EmbeddingShardBackward(const at::Tensor& tokens, const at::Tensor& dout, int64_t v_begin,
                              at::Tensor& dwte_shard, at::Tensor& dwpe) const override {
    const at::Tensor local = tokens.view({-1}) - v_begin;
    const at::Tensor rows =
        local.ge(0).logical_and_(local.lt(dwte_shard.size(0))).nonzero().view({-1});
    dwte_shard.index_add_(0, local.index_select(0, rows), dout.index_select(0, rows));
    AddPositionGrad(dout, tokens.size(0), tokens.size(1), dwpe);
  }
  void CrossEntropyShardMax(const at::Tensor& logits, at::Tensor& row_max) const override {
    if (logits.size(1) == 0) {
      row_max.fill_(-std::numeric_limits<float>::infinity());
    } else {
      at::amax_out(row_max, logits, {1});
    }
  }
  void CrossEntropyShardExp(at::Tensor& logits_to_exp, const at::Tensor& targets,
                            int64_t v_begin, const at::Tensor& row_max,
                            at::Tensor& stats) const override {
    const int64_t v = logits_to_exp.size(1);
    // The target's shifted logit, taken before the row is overwritten (where this shard has it).
    if (v == 0) {
      stats[1].zero_();
    } else {
      const at::Tensor local = targets.view({-1}) - v_begin;
      const at::Tensor mine = local.ge(0).logical_and_(local.lt(v));
      const at::Tensor picked =
          logits_to_exp.gather(1, local.clamp(0, v - 1).view({-1, 1})).view({-1}) - row_max;
      stats[1].copy_(picked.masked_fill_(mine.logical_not(), 0.0));
    }
    logits_to_exp.sub_(row_max.unsqueeze(1)).exp_();
    at::Tensor sums = stats[0];
    at::sum_out(sums, logits_to_exp, {1});
  }
  double CrossEntropyShardFinish(at::Tensor& exp_to_probs,
                                 const at::Tensor& stats) const override {
    const double loss =
        (stats[0].to(at::kDouble).log() - stats[1].to(at::kDouble)).mean().item<double>();
    exp_to_probs.div_(stats[0].unsqueeze(1));
    return loss;
  }
  void CrossEntropyShardBackward(at::Tensor& probs_to_grad, const at::Tensor& targets,
                                 int64_t v_begin, float dloss) const override {
    const float scale = dloss / static_cast<float>(probs_to_grad.size(0));
    probs_to_grad.mul_(scale);
    const int64_t v = probs_to_grad.size(1);
    const at::Tensor local = targets.view({-1}) - v_begin;
    const at::Tensor rows = local.ge(0).logical_and_(local.lt(v)).nonzero().view({-1});
    probs_to_grad.view({-1}).index_add_(
        0, rows * v + local.index_select(0, rows),
        at::full({rows.numel()}, -scale, probs_to_grad.options()));
  }

 private:
  // The positions above the diagonal of scores (R, T, T): a (T, T) mask, broadcast.
  static at::Tensor Above(const at::Tensor& scores) {
    const int64_t t = scores.size(1);
    return at::ones({t, t}, scores.options().dtype(at::kBool)).triu_(1);
  }
  // dwpe[t] += sum over the batch of dout[b, t].
  static void AddPositionGrad(const at::Tensor& dout, int64_t batch, int64_t seq,
                              at::Tensor& dwpe) {
    dwpe.narrow(0, 0, seq).add_(dout.view({batch, seq, dout.size(1)}).sum(0));
  }
};

}  // namespace

const char* KernelsName(Kernels k) { return k == Kernels::kAten ? "aten" : "fused"; }

const char* PrecisionName(Precision p) { return p == Precision::kBf16 ? "bf16" : "fp32"; }

at::ScalarType ComputeType(Precision p) {
  return p == Precision::kBf16 ? at::kBFloat16 : at::kFloat;
}

absl::StatusOr<Precision> ParsePrecision(const std::string& name) {
  for (Precision p : {Precision::kFp32, Precision::kBf16}) {
    if (name == PrecisionName(p)) return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "train.dtype = '", name, "': must be 'fp32' or 'bf16' (bfloat16 activations and matrix "
      "multiplies, float32 weights and optimizer state)"));
}

absl::StatusOr<Kernels> ParseKernels(const std::string& name, Precision precision) {
  if (name == "auto") return precision == Precision::kFp32 ? Kernels::kFused : Kernels::kAten;
  for (Kernels k : {Kernels::kFused, Kernels::kAten}) {
    if (name != KernelsName(k)) continue;
    if (k == Kernels::kFused && precision != Precision::kFp32) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.kernels = 'fused' with train.dtype = '", PrecisionName(precision),
          "': the fused CPU kernels are float32 only; use 'aten' or 'auto'"));
    }
    return k;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "train.kernels = '", name, "': must be 'auto' (fused at fp32, aten at bf16), 'fused' (the "
      "CPU kernels) or 'aten' (ATen calls, any device)"));
}

absl::StatusOr<Compute> ParseCompute(const std::string& kernels, const std::string& dtype) {
  Compute c;
  absl::StatusOr<Precision> precision = ParsePrecision(dtype);
  if (!precision.ok()) return precision.status();
  c.precision = *precision;
  absl::StatusOr<Kernels> k = ParseKernels(kernels, c.precision);
  if (!k.ok()) return k.status();
  c.kernels = *k;
  return c;
}

const PieceOps& OpsFor(Kernels k) {
  static const FusedOps fused;
  static const AtenOps aten;
  if (k == Kernels::kAten) return aten;
  return fused;
}

}  // namespace shoal::runtime
