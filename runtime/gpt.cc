#include "runtime/gpt.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "runtime/kernels.h"

namespace shoal::runtime {
namespace {

constexpr float kLnEps = 1e-5f;

// (Re)allocates `t` only when the shape changes, so steady-state steps allocate nothing.
void Ensure(at::Tensor& t, at::IntArrayRef shape) {
  if (!t.defined() || t.sizes() != shape) t = at::empty(shape, at::kFloat);
}

float* F(const at::Tensor& t) { return t.data_ptr<float>(); }

// y (N, out) = x (N, in) @ W^T + b
void LinearForward(const at::Tensor& x, const Param& w, const Param& b, at::Tensor& y) {
  at::addmm_out(y, b.value, x, w.value.t());
}

// dx = dy @ W (written, unless dx is null); dW += dy^T @ x; db += dy^T @ 1.
void LinearBackward(const at::Tensor& dy, const at::Tensor& x, const Param& w, const Param* b,
                    const at::Tensor& ones, at::Tensor* dx) {
  if (dx != nullptr) at::mm_out(*dx, dy, w.value);
  w.grad.addmm_(dy.t(), x);
  if (b != nullptr) b->grad.addmv_(dy.t(), ones);
}

class EmbeddingPiece final : public Piece {
 public:
  EmbeddingPiece(Param wte, Param wpe, int vocab) : wte_(wte), wpe_(wpe), vocab_(vocab) {}

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
    tokens_ = tokens;
    Ensure(out_, {mb.batch * mb.seq, c});
    kernels::EmbeddingForward(ids, F(wte_.value), F(wpe_.value), mb.batch, mb.seq, c, F(out_));
    batch_ = mb.batch;
    seq_ = mb.seq;
    return out_;
  }

  at::Tensor Backward(const at::Tensor& dout) override {
    kernels::EmbeddingBackward(tokens_.data_ptr<int64_t>(), F(dout), batch_, seq_,
                               wte_.value.size(1), F(wte_.grad), F(wpe_.grad));
    return at::Tensor();
  }

 private:
  Param wte_, wpe_;
  int vocab_;
  at::Tensor tokens_, out_;
  int64_t batch_ = 0, seq_ = 0;
};

class BlockPiece final : public Piece {
 public:
  struct Params {
    Param ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b;
  };
  BlockPiece(Params p, int n_head) : p_(std::move(p)), n_head_(n_head) {}

  at::Tensor Forward(const at::Tensor& x, const MicroBatch& mb) override {
    const int64_t B = mb.batch, T = mb.seq, N = B * T, C = x.size(1), H = n_head_, D = C / H;
    x_ = x;
    Ensure(ln1_, {N, C});
    Ensure(mean1_, {N});
    Ensure(rstd1_, {N});
    kernels::LayerNormForward(F(x), F(p_.ln1_w.value), F(p_.ln1_b.value), N, C, kLnEps, F(ln1_),
                              F(mean1_), F(rstd1_));
    // qkv (N, 3C) -> heads (3, B*H, T, D)
    Ensure(qkv_, {N, 3 * C});
    LinearForward(ln1_, p_.qkv_w, p_.qkv_b, qkv_);
    Ensure(qkvh_, {3, B * H, T, D});
    qkvh_.view({3, B, H, T, D}).copy_(qkv_.view({B, T, 3, H, D}).permute({2, 0, 3, 1, 4}));
    const at::Tensor q = qkvh_[0], k = qkvh_[1], v = qkvh_[2];
    // att (B*H, T, T) = softmax(q k^T / sqrt(D)) with the causal mask
    Ensure(att_, {B * H, T, T});
    at::bmm_out(att_, q, k.transpose(1, 2));
    kernels::CausalSoftmaxForward(F(att_), B * H, T, 1.0f / std::sqrt(static_cast<float>(D)));
    Ensure(yh_, {B * H, T, D});
    at::bmm_out(yh_, att_, v);
    // merge heads -> (N, C), project, add the residual
    Ensure(y_, {N, C});
    y_.view({B, T, H, D}).copy_(yh_.view({B, H, T, D}).permute({0, 2, 1, 3}));
    Ensure(x1_, {N, C});
    LinearForward(y_, p_.proj_w, p_.proj_b, x1_);
    x1_.add_(x);
    // MLP: LayerNorm, fc (N, 4C), GELU, proj, residual
    Ensure(ln2_, {N, C});
    Ensure(mean2_, {N});
    Ensure(rstd2_, {N});
    kernels::LayerNormForward(F(x1_), F(p_.ln2_w.value), F(p_.ln2_b.value), N, C, kLnEps,
                              F(ln2_), F(mean2_), F(rstd2_));
    Ensure(h_, {N, 4 * C});
    LinearForward(ln2_, p_.fc_w, p_.fc_b, h_);
    Ensure(g_, {N, 4 * C});
    kernels::GeluForward(F(h_), N * 4 * C, F(g_));
    Ensure(out_, {N, C});
    LinearForward(g_, p_.mproj_w, p_.mproj_b, out_);
    out_.add_(x1_);
    batch_ = B;
    seq_ = T;
    return out_;
  }

  at::Tensor Backward(const at::Tensor& dout) override {
    const int64_t B = batch_, T = seq_, N = B * T, C = dout.size(1), H = n_head_, D = C / H;
    if (!ones_.defined() || ones_.size(0) != N) ones_ = at::ones({N}, at::kFloat);
    // MLP
    Ensure(dg_, {N, 4 * C});
    LinearBackward(dout, g_, p_.mproj_w, &p_.mproj_b, ones_, &dg_);
    kernels::GeluBackward(F(h_), F(dg_), N * 4 * C, F(dg_));
    Ensure(dln_, {N, C});
    LinearBackward(dg_, ln2_, p_.fc_w, &p_.fc_b, ones_, &dln_);
    Ensure(dx1_, {N, C});
    dx1_.copy_(dout);  // residual path
    kernels::LayerNormBackward(F(dln_), F(x1_), F(p_.ln2_w.value), F(mean2_), F(rstd2_), N, C,
                               F(dx1_), F(p_.ln2_w.grad), F(p_.ln2_b.grad));
    // attention output projection
    Ensure(dy_, {N, C});
    LinearBackward(dx1_, y_, p_.proj_w, &p_.proj_b, ones_, &dy_);
    Ensure(dyh_, {B * H, T, D});
    dyh_.view({B, H, T, D}).copy_(dy_.view({B, T, H, D}).permute({0, 2, 1, 3}));
    const at::Tensor q = qkvh_[0], k = qkvh_[1], v = qkvh_[2];
    Ensure(dqkvh_, {3, B * H, T, D});
    // dv = att^T dy;  datt = dy v^T;  dS = softmax backward;  dq = dS k;  dk = dS^T q
    at::Tensor dq = dqkvh_[0], dk = dqkvh_[1], dv = dqkvh_[2];
    at::bmm_out(dv, att_.transpose(1, 2), dyh_);
    Ensure(datt_, {B * H, T, T});
    at::bmm_out(datt_, dyh_, v.transpose(1, 2));
    kernels::CausalSoftmaxBackward(F(att_), F(datt_), B * H, T,
                                   1.0f / std::sqrt(static_cast<float>(D)));
    at::bmm_out(dq, datt_, k);
    at::bmm_out(dk, datt_.transpose(1, 2), q);
    Ensure(dqkv_, {N, 3 * C});
    dqkv_.view({B, T, 3, H, D}).copy_(dqkvh_.view({3, B, H, T, D}).permute({1, 3, 0, 2, 4}));
    LinearBackward(dqkv_, ln1_, p_.qkv_w, &p_.qkv_b, ones_, &dln_);
    Ensure(dx_, {N, C});
    dx_.copy_(dx1_);  // residual path
    kernels::LayerNormBackward(F(dln_), F(x_), F(p_.ln1_w.value), F(mean1_), F(rstd1_), N, C,
                               F(dx_), F(p_.ln1_w.grad), F(p_.ln1_b.grad));
    return dx_;
  }

 private:
  Params p_;
  int n_head_;
  int64_t batch_ = 0, seq_ = 0;
  // forward activations (x_ is the previous piece's output, kept alive by reference)
  at::Tensor x_, ln1_, mean1_, rstd1_, qkv_, qkvh_, att_, yh_, y_, x1_, ln2_, mean2_, rstd2_, h_,
      g_, out_;
  // backward scratch
  at::Tensor ones_, dg_, dln_, dx1_, dy_, dyh_, dqkvh_, datt_, dqkv_, dx_;
};

class HeadPiece final : public Piece {
 public:
  HeadPiece(Param lnf_w, Param lnf_b, Param wte) : lnf_w_(lnf_w), lnf_b_(lnf_b), wte_(wte) {}

  // Returns the mean loss as a 0-dim tensor, or the logits (B*T, V) when mb.targets is null.
  at::Tensor Forward(const at::Tensor& x, const MicroBatch& mb) override {
    const int64_t N = x.size(0), C = x.size(1), V = wte_.value.size(0);
    x_ = x;
    Ensure(ln_, {N, C});
    Ensure(mean_, {N});
    Ensure(rstd_, {N});
    kernels::LayerNormForward(F(x), F(lnf_w_.value), F(lnf_b_.value), N, C, kLnEps, F(ln_),
                              F(mean_), F(rstd_));
    Ensure(probs_, {N, V});
    at::mm_out(probs_, ln_, wte_.value.t());
    if (mb.targets == nullptr) return probs_;
    targets_ = *mb.targets;
    TORCH_CHECK(targets_.scalar_type() == at::kLong && targets_.is_contiguous() &&
                    targets_.numel() == N,
                "head expects contiguous int64 targets with one id per token");
    const int64_t* t = targets_.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(t[i] >= 0 && t[i] < V, "target id ", t[i], " out of range [0, ", V, ")");
    }
    const double loss = kernels::CrossEntropyForward(F(probs_), t, N, V);
    return at::scalar_tensor(loss, at::kDouble);
  }

  // grad_output: 0-dim, d(objective)/d(loss).
  at::Tensor Backward(const at::Tensor& dloss) override {
    const int64_t N = x_.size(0), C = x_.size(1), V = wte_.value.size(0);
    kernels::CrossEntropyBackward(F(probs_), targets_.data_ptr<int64_t>(), N, V,
                                  static_cast<float>(dloss.item<double>()));
    Ensure(dln_, {N, C});
    at::mm_out(dln_, probs_, wte_.value);
    wte_.grad.addmm_(probs_.t(), ln_);
    Ensure(dx_, {N, C});
    dx_.zero_();
    kernels::LayerNormBackward(F(dln_), F(x_), F(lnf_w_.value), F(mean_), F(rstd_), N, C,
                               F(dx_), F(lnf_w_.grad), F(lnf_b_.grad));
    return dx_;
  }

 private:
  Param lnf_w_, lnf_b_, wte_;
  at::Tensor x_, ln_, mean_, rstd_, probs_, targets_, dln_, dx_;
};

std::vector<ParamSpec> DeclareParameters(const ModelConfig& c) {
  using Init = ParamSpec::Init;
  const double kStd = 0.02;
  const double kResidualStd = kStd / std::sqrt(2.0 * c.n_layer);
  const int64_t C = c.n_embd;
  std::vector<ParamSpec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape, Init init, double std = 0) {
    specs.push_back({std::move(name), shape, init, std, shape.size() == 2});
  };
  add("wte.weight", {c.vocab_size, C}, Init::kNormal, kStd);
  add("wpe.weight", {c.block_size, C}, Init::kNormal, kStd);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("blocks.", l, ".");
    add(p + "ln1.weight", {C}, Init::kOnes);
    add(p + "ln1.bias", {C}, Init::kZeros);
    add(p + "attn.qkv.weight", {3 * C, C}, Init::kNormal, kStd);
    add(p + "attn.qkv.bias", {3 * C}, Init::kZeros);
    add(p + "attn.proj.weight", {C, C}, Init::kNormal, kResidualStd);
    add(p + "attn.proj.bias", {C}, Init::kZeros);
    add(p + "ln2.weight", {C}, Init::kOnes);
    add(p + "ln2.bias", {C}, Init::kZeros);
    add(p + "mlp.fc.weight", {4 * C, C}, Init::kNormal, kStd);
    add(p + "mlp.fc.bias", {4 * C}, Init::kZeros);
    add(p + "mlp.proj.weight", {C, 4 * C}, Init::kNormal, kResidualStd);
    add(p + "mlp.proj.bias", {C}, Init::kZeros);
  }
  add("ln_f.weight", {C}, Init::kOnes);
  add("ln_f.bias", {C}, Init::kZeros);
  return specs;
}

}  // namespace

Gpt::Gpt(const ModelConfig& config, uint64_t seed, int64_t pad_multiple) : config_(config) {
  const std::vector<ParamSpec> specs = DeclareParameters(config);
  piece_params_.resize(config.n_layer + 2);
  for (const ParamSpec& s : specs) {
    const int group = s.decay ? kDecay : kNoDecay;
    where_.emplace_back(group, params_[group].Add(s.name, s.shape));
    names_.push_back(s.name);
    // Owner piece: embeddings -> 0, blocks.<l>. -> l + 1, ln_f -> the head.
    int piece = 0;
    if (s.name.rfind("blocks.", 0) == 0) piece = 1 + std::stoi(s.name.substr(7));
    if (s.name.rfind("ln_f.", 0) == 0) piece = config.n_layer + 1;
    piece_params_[piece].push_back(where_.back());
  }
  for (int g = 0; g < 2; ++g) {
    params_[g].Allocate(pad_multiple);
    grads_[g] = params_[g].MakeLike();
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (size_t i = 0; i < specs.size(); ++i) {
    at::Tensor v = params_[where_[i].first].View(where_[i].second);
    switch (specs[i].init) {
      case ParamSpec::Init::kNormal: v.normal_(0.0, specs[i].std, gen); break;
      case ParamSpec::Init::kOnes: v.fill_(1.0); break;
      case ParamSpec::Init::kZeros: v.zero_(); break;
    }
  }
  pieces_.push_back(std::make_unique<EmbeddingPiece>(Lookup("wte.weight"), Lookup("wpe.weight"),
                                                     config.vocab_size));
  for (int l = 0; l < config.n_layer; ++l) {
    const std::string p = absl::StrCat("blocks.", l, ".");
    BlockPiece::Params bp{Lookup(p + "ln1.weight"),       Lookup(p + "ln1.bias"),
                          Lookup(p + "attn.qkv.weight"),  Lookup(p + "attn.qkv.bias"),
                          Lookup(p + "attn.proj.weight"), Lookup(p + "attn.proj.bias"),
                          Lookup(p + "ln2.weight"),       Lookup(p + "ln2.bias"),
                          Lookup(p + "mlp.fc.weight"),    Lookup(p + "mlp.fc.bias"),
                          Lookup(p + "mlp.proj.weight"),  Lookup(p + "mlp.proj.bias")};
    pieces_.push_back(std::make_unique<BlockPiece>(std::move(bp), config.n_head));
  }
  pieces_.push_back(std::make_unique<HeadPiece>(Lookup("ln_f.weight"), Lookup("ln_f.bias"),
                                                Lookup("wte.weight")));
  loss_grad_ = at::empty({}, at::kDouble);
}

Gpt::~Gpt() = default;

Param Gpt::Lookup(const std::string& name) const {
  for (size_t i = 0; i < names_.size(); ++i) {
    if (names_[i] == name) {
      const auto [g, idx] = where_[i];
      return Param{params_[g].View(idx), grads_[g].View(idx)};
    }
  }
  TORCH_CHECK(false, "no parameter named ", name);
}

double Gpt::ForwardBackward(const at::Tensor& tokens, const at::Tensor& targets,
                            float loss_scale, const std::function<void(int piece)>& on_piece_done) {
  MicroBatch mb{&targets, tokens.size(0), tokens.size(1)};
  at::Tensor x = tokens;
  for (auto& piece : pieces_) x = piece->Forward(x, mb);
  const double loss = x.item<double>();
  loss_grad_.fill_(static_cast<double>(loss_scale));
  at::Tensor g = loss_grad_;
  for (int p = static_cast<int>(pieces_.size()) - 1; p >= 0; --p) {
    g = pieces_[p]->Backward(g);
    if (on_piece_done) on_piece_done(p);
  }
  return loss;
}

std::vector<std::pair<int, int>> Gpt::BackwardReadyOrder() const {
  std::vector<std::pair<int, int>> order;
  for (int p = static_cast<int>(piece_params_.size()) - 1; p >= 0; --p) {
    order.insert(order.end(), piece_params_[p].rbegin(), piece_params_[p].rend());
  }
  return order;
}

double Gpt::Loss(const at::Tensor& tokens, const at::Tensor& targets) {
  MicroBatch mb{&targets, tokens.size(0), tokens.size(1)};
  at::Tensor x = tokens;
  for (auto& piece : pieces_) x = piece->Forward(x, mb);
  return x.item<double>();
}

at::Tensor Gpt::Logits(const at::Tensor& tokens) {
  MicroBatch mb{nullptr, tokens.size(0), tokens.size(1)};
  at::Tensor x = tokens;
  for (auto& piece : pieces_) x = piece->Forward(x, mb);
  return x.view({mb.batch, mb.seq, config_.vocab_size}).clone();
}

void Gpt::ZeroGrad() {
  grads_[0].flat().zero_();
  grads_[1].flat().zero_();
}

std::vector<std::pair<std::string, at::Tensor>> Gpt::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < names_.size(); ++i) {
    out.emplace_back(names_[i], params_[where_[i].first].View(where_[i].second));
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> Gpt::NamedGradients() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < names_.size(); ++i) {
    out.emplace_back(names_[i], grads_[where_[i].first].View(where_[i].second));
  }
  return out;
}

absl::Status Gpt::LoadParameters(const std::vector<std::pair<std::string, at::Tensor>>& named) {
  std::map<std::string, at::Tensor> by_name(named.begin(), named.end());
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (const auto& [name, dst] : NamedParameters()) {
    auto it = by_name.find(name);
    if (it == by_name.end()) return absl::DataLossError(absl::StrCat("missing tensor ", name));
    if (it->second.scalar_type() != at::kFloat || it->second.sizes() != dst.sizes()) {
      return absl::DataLossError(absl::StrCat(
          "tensor ", name, " has shape ", c10::str(it->second.sizes()), " and dtype ",
          c10::toString(it->second.scalar_type()), "; the model needs ", c10::str(dst.sizes()),
          " float32"));
    }
    copies.emplace_back(dst, it->second);
  }
  for (auto& [dst, src] : copies) dst.copy_(src);
  return absl::OkStatus();
}

int64_t Gpt::NumParameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : NamedParameters()) n += t.numel();
  return n;
}

int64_t Gpt::NumParametersNoPos() const {
  return NumParameters() - static_cast<int64_t>(config_.block_size) * config_.n_embd;
}

double Gpt::FlopsPerToken() const {
  return 6.0 * NumParametersNoPos() +
         12.0 * config_.n_layer * config_.n_embd * static_cast<double>(config_.block_size);
}

}  // namespace shoal::runtime
