#include "runtime/gpt.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "memory/activation_offload.h"
#include "runtime/gpt_pieces.h"

namespace shoal::runtime {

const char* ActivationModeName(ActivationMode mode) {
  switch (mode) {
    case ActivationMode::kKeep: return "keep";
    case ActivationMode::kRecompute: return "recompute";
    case ActivationMode::kOffload: return "offload";
  }
  return "?";
}

namespace {

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

// First vocabulary row of tensor-parallel rank r of t: floor(r V / t), so shards differ by at
// most one row when t does not divide V.
int64_t VocabBegin(int64_t vocab, int r, int t) { return vocab * r / t; }

// How rank r of a tensor-parallel group of t holds the declared parameter `s` (see gpt.h).
ShardSpec ShardFor(const ParamSpec& s, const ModelConfig& c, int r, int t) {
  ShardSpec spec;
  spec.full_shape = s.shape;
  if (t == 1) return spec;
  const int64_t C = c.n_embd;
  auto split = [&](int dim, int parts, int64_t offset, int64_t length) {
    spec.dim = dim;
    spec.parts = parts;
    spec.offset = offset;
    spec.length = length;
  };
  const std::string& n = s.name;
  if (n == "wte.weight") {
    const int64_t begin = VocabBegin(c.vocab_size, r, t);
    split(0, 1, begin, VocabBegin(c.vocab_size, r + 1, t) - begin);
  } else if (absl::EndsWith(n, ".attn.qkv.weight") || absl::EndsWith(n, ".attn.qkv.bias")) {
    // Heads [r H/t, (r+1) H/t) are the rows [r C/t, (r+1) C/t) of each of q, k and v.
    split(0, 3, r * C / t, C / t);
  } else if (absl::EndsWith(n, ".attn.proj.weight")) {
    split(1, 1, r * C / t, C / t);
  } else if (absl::EndsWith(n, ".mlp.fc.weight") || absl::EndsWith(n, ".mlp.fc.bias")) {
    split(0, 1, r * 4 * C / t, 4 * C / t);
  } else if (absl::EndsWith(n, ".mlp.proj.weight")) {
    split(1, 1, r * 4 * C / t, 4 * C / t);
  }
  return spec;
}

// Owner piece of a declared parameter in the full model: embeddings -> 0, blocks.<l>. -> l + 1,
// ln_f -> the head.
int OwnerPiece(const std::string& name, int n_layer) {
  if (name.rfind("blocks.", 0) == 0) return 1 + std::stoi(name.substr(7));
  if (name.rfind("ln_f.", 0) == 0) return n_layer + 1;
  return 0;
}

}  // namespace

std::vector<int64_t> ShardShape(const ShardSpec& spec) {
  std::vector<int64_t> shape = spec.full_shape;
  if (spec.dim >= 0) shape[spec.dim] = static_cast<int64_t>(spec.parts) * spec.length;
  return shape;
}

at::Tensor SliceShard(const at::Tensor& full, const ShardSpec& spec) {
  TORCH_CHECK(full.sizes() == at::IntArrayRef(spec.full_shape), "SliceShard: tensor of shape ",
              full.sizes(), " for a shard of ", at::IntArrayRef(spec.full_shape));
  if (spec.dim < 0) return full.clone(at::MemoryFormat::Contiguous);
  const int64_t block = spec.full_shape[spec.dim] / spec.parts;
  std::vector<at::Tensor> pieces;
  for (int p = 0; p < spec.parts; ++p) {
    pieces.push_back(full.narrow(spec.dim, p * block + spec.offset, spec.length));
  }
  return at::cat(pieces, spec.dim).contiguous();
}

void PlaceShard(const at::Tensor& local, const ShardSpec& spec, at::Tensor& full) {
  TORCH_CHECK(full.sizes() == at::IntArrayRef(spec.full_shape), "PlaceShard: tensor of shape ",
              full.sizes(), " for a shard of ", at::IntArrayRef(spec.full_shape));
  TORCH_CHECK(local.sizes() == at::IntArrayRef(ShardShape(spec)), "PlaceShard: shard of shape ",
              local.sizes(), ", expected ", at::IntArrayRef(ShardShape(spec)));
  if (spec.dim < 0) {
    full.copy_(local);
    return;
  }
  const int64_t block = spec.full_shape[spec.dim] / spec.parts;
  for (int p = 0; p < spec.parts; ++p) {
    full.narrow(spec.dim, p * block + spec.offset, spec.length)
        .copy_(local.narrow(spec.dim, p * spec.length, spec.length));
  }
}

Gpt::Gpt(const ModelConfig& config, uint64_t seed, int64_t pad_multiple, StatePager* pager)
    : Gpt(config, seed, 0, config.n_layer + 2, pad_multiple, TensorParallel{}, pager) {}

absl::StatusOr<std::unique_ptr<Gpt>> Gpt::CreateStage(const ModelConfig& config, uint64_t seed,
                                                      int first_piece, int end_piece,
                                                      int64_t pad_multiple,
                                                      const TensorParallel& tp) {
  const int n_pieces = config.n_layer + 2;
  if (first_piece < 0 || end_piece > n_pieces || first_piece >= end_piece) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pipeline stage pieces [", first_piece, ", ", end_piece,
        ") are not a non-empty range within [0, ", n_pieces, ") of a model with ", config.n_layer,
        " blocks (piece 0 = embedding, ", n_pieces - 1, " = head)"));
  }
  if (pad_multiple < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("pad_multiple ", pad_multiple, " must be at least 1"));
  }
  if (tp.group != nullptr) {
    const int t = tp.group->size();
    if (config.n_head % t != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor-parallel size ", t,
                                                     " does not divide model.n_head = ",
                                                     config.n_head));
    }
    if (t > config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("tensor-parallel size ", t,
                                                     " exceeds model.vocab_size = ",
                                                     config.vocab_size));
    }
  }
  return std::unique_ptr<Gpt>(
      new Gpt(config, seed, first_piece, end_piece, pad_multiple, tp));
}

Gpt::Gpt(const ModelConfig& config, uint64_t seed, int first_piece, int end_piece,
         int64_t pad_multiple, const TensorParallel& tp, StatePager* pager)
    : config_(config), first_piece_(first_piece), end_piece_(end_piece), tp_(tp), pager_(pager) {
  if (tp_.group != nullptr && tp_.group->size() == 1) tp_.group = nullptr;  // same as none
  if (tp_.group != nullptr) {
    tp_rank_ = tp_.group->rank();
    tp_size_ = tp_.group->size();
  }
  const TpGroup group{tp_.group, tp_.timeout};
  const std::vector<ParamSpec> specs = DeclareParameters(config);
  const int head = config.n_layer + 1;
  piece_params_.resize(end_piece - first_piece);
  // kept[i]: declared parameter i lives in this model. A stage holding the head but not the
  // embedding keeps its own wte for the tied head, owned by the head.
  std::vector<bool> kept(specs.size(), false);
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& s = specs[i];
    int piece = OwnerPiece(s.name, config.n_layer);
    if (s.name == "wte.weight" && first_piece > 0 && end_piece == head + 1) piece = head;
    if (piece < first_piece || piece >= end_piece) continue;
    kept[i] = true;
    shard_specs_.push_back(ShardFor(s, config, tp_rank_, tp_size_));
    const int group = s.decay ? kDecay : kNoDecay;
    where_.emplace_back(group, params_[group].Add(s.name, ShardShape(shard_specs_.back())));
    names_.push_back(s.name);
    piece_params_[piece - first_piece].push_back(where_.back());
  }
  if (pager_ != nullptr) {
    TORCH_CHECK(first_piece == 0 && end_piece == head + 1 && tp_size_ == 1,
                "a paged model is the whole model, without tensor parallelism");
    // Per piece, the decay tensors it is the first to use (the chunk groups), and all it uses:
    // the head multiplies by the tied wte.
    std::vector<std::vector<int>> uses(head + 1);
    std::vector<memory::ChunkGroup> groups;
    page_piece_.assign(names_.size(), -1);
    for (size_t k = 0; k < where_.size(); ++k) {
      if (where_[k].first != kDecay) continue;
      const int piece = OwnerPiece(names_[k], config.n_layer);
      page_piece_[k] = piece;
      if (uses[piece].empty()) groups.emplace_back();
      uses[piece].push_back(where_[k].second);
      const memory::FlatBuffer::Entry& e = params_[kDecay].entries()[where_[k].second];
      groups.back().push_back({e.name, e.numel});
    }
    uses[head].push_back(params_[kDecay].Find("wte.weight"));
    const memory::ChunkLayout layout = pager_->Layout(groups);
    const absl::Status laid = params_[kDecay].ApplyChunkLayout(layout);
    TORCH_CHECK(laid.ok(), laid.ToString());
    params_[kDecay].AllocateMapped(pad_multiple);
    TORCH_CHECK(params_[kDecay].numel() == layout.num_chunks() * layout.capacity(),
                "paged model: chunk capacity ", layout.capacity(),
                " is not a multiple of the padding ", pad_multiple);
    params_[kNoDecay].Allocate(pad_multiple);
    grads_[kDecay] = params_[kDecay].MakeLike();
    grads_[kNoDecay] = params_[kNoDecay].MakeLike();
    pager_->Attach(&params_[kDecay], &grads_[kDecay], std::move(uses));
  } else {
    for (int g = 0; g < 2; ++g) {
      params_[g].Allocate(pad_multiple);
      grads_[g] = params_[g].MakeLike();
    }
  }
  // The full model draws every normal parameter, in declaration order, from one generator. A
  // stage replays that sequence: a parameter it does not hold is drawn into scratch of the same
  // shape (the number of values a draw consumes depends on the shape), up to its last own one.
  // A tensor-parallel shard is drawn the same way, as its full tensor, and keeps its slice.
  size_t last_draw = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (kept[i] && specs[i].init == ParamSpec::Init::kNormal) last_draw = i + 1;
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor scratch;
  size_t k = 0;  // index into where_ of the next kept parameter
  int writing = -1;  // paged: the piece whose chunks are open for writing
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!kept[i]) {
      if (i < last_draw && specs[i].init == ParamSpec::Init::kNormal) {
        Ensure(scratch, specs[i].shape);
        scratch.normal_(0.0, specs[i].std, gen);
      }
      continue;
    }
    if (pager_ != nullptr && page_piece_[k] >= 0 && page_piece_[k] != writing) {
      if (writing >= 0) pager_->End(writing, StatePager::Pass::kWrite);
      writing = page_piece_[k];
      pager_->Begin(writing, StatePager::Pass::kWrite);
    }
    at::Tensor v = params_[where_[k].first].View(where_[k].second);
    const ShardSpec& shard = shard_specs_[k];
    ++k;
    switch (specs[i].init) {
      case ParamSpec::Init::kNormal:
        if (shard.dim < 0) {
          v.normal_(0.0, specs[i].std, gen);
        } else {
          Ensure(scratch, specs[i].shape);
          scratch.normal_(0.0, specs[i].std, gen);
          v.copy_(SliceShard(scratch, shard));
        }
        break;
      case ParamSpec::Init::kOnes: v.fill_(1.0); break;
      case ParamSpec::Init::kZeros: v.zero_(); break;
    }
  }
  if (writing >= 0) pager_->End(writing, StatePager::Pass::kWrite);
  const int64_t v_begin = VocabBegin(config.vocab_size, tp_rank_, tp_size_);
  if (first_piece == 0) {
    pieces_.push_back(MakeEmbeddingPiece(Lookup("wte.weight"), Lookup("wpe.weight"),
                                         config.vocab_size, v_begin, group));
  }
  for (int l = std::max(first_piece, 1) - 1; l < std::min(end_piece - 1, config.n_layer); ++l) {
    const std::string p = absl::StrCat("blocks.", l, ".");
    BlockParams bp{Lookup(p + "ln1.weight"),       Lookup(p + "ln1.bias"),
                          Lookup(p + "attn.qkv.weight"),  Lookup(p + "attn.qkv.bias"),
                          Lookup(p + "attn.proj.weight"), Lookup(p + "attn.proj.bias"),
                          Lookup(p + "ln2.weight"),       Lookup(p + "ln2.bias"),
                          Lookup(p + "mlp.fc.weight"),    Lookup(p + "mlp.fc.bias"),
                          Lookup(p + "mlp.proj.weight"),  Lookup(p + "mlp.proj.bias")};
    pieces_.push_back(MakeBlockPiece(std::move(bp), l, config.n_head / tp_size_,
                                     config.n_embd / config.n_head, group));
  }
  if (end_piece == head + 1) {
    pieces_.push_back(MakeHeadPiece(Lookup("ln_f.weight"), Lookup("ln_f.bias"),
                                    Lookup("wte.weight"), config.vocab_size, v_begin, group));
  }
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
  TORCH_CHECK(is_full_model(), "ForwardBackward needs the full model; a stage uses StageForward");
  MicroBatch mb{&targets, tokens.size(0), tokens.size(1)};
  at::Tensor x = tokens;
  for (size_t p = 0; p < pieces_.size(); ++p) x = RunForward(static_cast<int>(p), x, mb);
  const double loss = x.item<double>();
  loss_grad_.fill_(static_cast<double>(loss_scale));
  at::Tensor g = loss_grad_;
  // The last offloaded block's read overlaps the backward of the head and of the blocks after it.
  if (offloader_ != nullptr) offloader_->PrefetchNewest(0);
  for (int p = static_cast<int>(pieces_.size()) - 1; p >= 0; --p) {
    g = RunBackward(p, g, 0);
    if (on_piece_done) on_piece_done(p);
  }
  return loss;
}

at::Tensor Gpt::RunForward(int p, const at::Tensor& x, const MicroBatch& mb) {
  if (pager_ == nullptr) return pieces_[p]->Forward(x, mb);
  pager_->Begin(p, StatePager::Pass::kForward);
  at::Tensor y = pieces_[p]->Forward(x, mb);
  pager_->End(p, StatePager::Pass::kForward);
  return y;
}

at::Tensor Gpt::RunBackward(int p, const at::Tensor& g, int slot) {
  if (pager_ == nullptr) return pieces_[p]->Backward(g, slot);
  pager_->Begin(p, StatePager::Pass::kBackward);
  at::Tensor dx = pieces_[p]->Backward(g, slot);
  pager_->End(p, StatePager::Pass::kBackward);
  return dx;
}

at::Tensor Gpt::StageForward(const at::Tensor& input, const MicroBatch& mb) {
  const int64_t B = mb.batch, T = mb.seq, C = config_.n_embd;
  TORCH_CHECK(B > 0 && T > 0, "micro-batch shape (", B, ", ", T, ") must be positive");
  TORCH_CHECK(mb.slot >= 0, "micro-batch slot ", mb.slot, " is negative");
  TORCH_CHECK(input.defined(), "stage ", first_piece_, " got an undefined input");
  at::Tensor x;
  if (has_embedding()) {
    TORCH_CHECK(input.dim() == 2 && input.size(0) == B && input.size(1) == T,
                "first stage expects (", B, ", ", T, ") token ids, got ", input.sizes());
    x = input;
  } else {
    TORCH_CHECK(input.scalar_type() == at::kFloat && input.is_contiguous() && input.dim() == 3 &&
                    input.size(0) == B && input.size(1) == T && input.size(2) == C,
                "stage starting at piece ", first_piece_, " expects a contiguous float32 (", B,
                ", ", T, ", ", C, ") activation, got ", input.scalar_type(), " ", input.sizes());
    x = input.view({B * T, C});
  }
  TORCH_CHECK(!has_head() || mb.targets != nullptr, "the last stage needs the targets");
  for (size_t p = 0; p < pieces_.size(); ++p) x = RunForward(static_cast<int>(p), x, mb);
  if (static_cast<size_t>(mb.slot) >= slot_shapes_.size()) slot_shapes_.resize(mb.slot + 1);
  slot_shapes_[mb.slot] = {B, T};
  if (has_head()) return x;
  return x.view({B, T, C});
}

at::Tensor Gpt::StageBackward(const at::Tensor& grad_output, float loss_scale, int slot) {
  TORCH_CHECK(slot >= 0 && static_cast<size_t>(slot) < slot_shapes_.size() &&
                  slot_shapes_[slot].first > 0,
              "StageBackward of micro-batch slot ", slot, ", which has no StageForward");
  const auto [B, T] = slot_shapes_[slot];
  const int64_t C = config_.n_embd;
  slot_shapes_[slot] = {0, 0};
  at::Tensor g;
  if (has_head()) {
    TORCH_CHECK(!grad_output.defined(),
                "the last stage starts backward from its loss; grad_output must be undefined");
    loss_grad_.fill_(static_cast<double>(loss_scale));
    g = loss_grad_;
  } else {
    TORCH_CHECK(grad_output.defined() && grad_output.scalar_type() == at::kFloat &&
                    grad_output.is_contiguous() && grad_output.dim() == 3 &&
                    grad_output.size(0) == B && grad_output.size(1) == T &&
                    grad_output.size(2) == C,
                "stage ending at piece ", end_piece_, " expects a contiguous float32 (", B, ", ",
                T, ", ", C, ") output gradient for slot ", slot);
    g = grad_output.view({B * T, C});
  }
  if (offloader_ != nullptr) offloader_->PrefetchNewest(slot);
  for (int p = static_cast<int>(pieces_.size()) - 1; p >= 0; --p) g = RunBackward(p, g, slot);
  if (has_embedding()) return at::Tensor();
  return g.view({B, T, C});
}

std::vector<std::string> Gpt::SharedParameters() const {
  if (has_embedding() != has_head()) return {"wte.weight"};
  return {};
}

std::vector<std::pair<int, int>> Gpt::BackwardReadyOrder() const {
  std::vector<std::pair<int, int>> order;
  for (int p = static_cast<int>(piece_params_.size()) - 1; p >= 0; --p) {
    order.insert(order.end(), piece_params_[p].rbegin(), piece_params_[p].rend());
  }
  return order;
}

double Gpt::Loss(const at::Tensor& tokens, const at::Tensor& targets) {
  TORCH_CHECK(is_full_model(), "Loss needs the full model");
  MicroBatch mb{&targets, tokens.size(0), tokens.size(1)};
  mb.backward = false;
  at::Tensor x = tokens;
  for (size_t p = 0; p < pieces_.size(); ++p) x = RunForward(static_cast<int>(p), x, mb);
  return x.item<double>();
}

at::Tensor Gpt::Logits(const at::Tensor& tokens) {
  TORCH_CHECK(is_full_model(), "Logits needs the full model");
  TORCH_CHECK(tp_size_ == 1, "Logits is not implemented with tensor parallelism (size ", tp_size_,
              "): each rank holds a slice of the vocabulary");
  MicroBatch mb{nullptr, tokens.size(0), tokens.size(1)};
  mb.backward = false;
  at::Tensor x = tokens;
  for (size_t p = 0; p < pieces_.size(); ++p) x = RunForward(static_cast<int>(p), x, mb);
  // float32 whatever the compute type (a copy either way).
  return x.view({mb.batch, mb.seq, config_.vocab_size}).to(at::kFloat, false, true);
}

void Gpt::SetBlockActivationModes(const std::vector<ActivationMode>& modes,
                                  std::unique_ptr<ActivationOffloader> offloader) {
  TORCH_CHECK(static_cast<int>(modes.size()) == config_.n_layer, "SetBlockActivationModes: ",
              modes.size(), " entries for ", config_.n_layer, " blocks");
  for (size_t p = 0; p < pieces_.size(); ++p) {
    const int block = first_piece_ + static_cast<int>(p) - 1;  // piece 1 + l is block l
    TORCH_CHECK(block < 0 || block >= config_.n_layer || modes[block] != ActivationMode::kOffload ||
                    offloader != nullptr,
                "block ", block, " is to offload its activations, but no offloader was given");
  }
  offloader_ = std::move(offloader);
  for (size_t p = 0; p < pieces_.size(); ++p) {
    const int block = first_piece_ + static_cast<int>(p) - 1;
    if (block >= 0 && block < config_.n_layer) {
      pieces_[p]->SetActivationMode(modes[block], offloader_.get());
    }
  }
}

void Gpt::SetBlockRecompute(const std::vector<bool>& recompute) {
  TORCH_CHECK(static_cast<int>(recompute.size()) == config_.n_layer, "SetBlockRecompute: ",
              recompute.size(), " entries for ", config_.n_layer, " blocks");
  std::vector<ActivationMode> modes;
  for (bool on : recompute) modes.push_back(on ? ActivationMode::kRecompute : ActivationMode::kKeep);
  SetBlockActivationModes(modes);
}

void Gpt::SetKernels(Kernels kernels) {
  for (auto& piece : pieces_) piece->SetOps(OpsFor(kernels));
}

void Gpt::SetPrecision(Precision precision) {
  TORCH_CHECK(precision == Precision::kFp32 || tp_size_ == 1, "train.dtype = '",
              PrecisionName(precision), "' is not implemented with tensor parallelism (size ",
              tp_size_, ")");
  for (auto& piece : pieces_) piece->SetComputeType(ComputeType(precision));
}

int64_t Gpt::ActivationBytes() const {
  int64_t n = 0;
  for (const auto& piece : pieces_) n += piece->ActivationBytes();
  return n;
}

void Gpt::ZeroGrad() {
  if (pager_ != nullptr) {
    pager_->ZeroGrads();
  } else {
    grads_[kDecay].flat().zero_();
  }
  grads_[kNoDecay].flat().zero_();
}

std::vector<std::pair<std::string, at::Tensor>> Gpt::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < names_.size(); ++i) {
    at::Tensor v = params_[where_[i].first].View(where_[i].second);
    if (pager_ != nullptr && page_piece_[i] >= 0) {
      // Paged: a copy, read while its chunk is resident.
      pager_->Begin(page_piece_[i], StatePager::Pass::kRead);
      v = v.clone();
      pager_->End(page_piece_[i], StatePager::Pass::kRead);
    }
    out.emplace_back(names_[i], std::move(v));
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> Gpt::NamedGradients() const {
  TORCH_CHECK(pager_ == nullptr, "NamedGradients of a paged model");
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < names_.size(); ++i) {
    out.emplace_back(names_[i], grads_[where_[i].first].View(where_[i].second));
  }
  return out;
}

int Gpt::tp_rank() const { return tp_rank_; }
int Gpt::tp_size() const { return tp_size_; }

std::vector<ShardSpec> Gpt::ShardSpecs() const { return shard_specs_; }

absl::Status Gpt::LoadParameters(const std::vector<std::pair<std::string, at::Tensor>>& named) {
  std::map<std::string, at::Tensor> by_name(named.begin(), named.end());
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (local view, model-wide source)
  for (size_t i = 0; i < names_.size(); ++i) {
    const std::string& name = names_[i];
    const at::IntArrayRef full_shape(shard_specs_[i].full_shape);
    auto it = by_name.find(name);
    if (it == by_name.end()) return absl::DataLossError(absl::StrCat("missing tensor ", name));
    if (it->second.scalar_type() != at::kFloat || it->second.sizes() != full_shape) {
      return absl::DataLossError(absl::StrCat(
          "tensor ", name, " has shape ", c10::str(it->second.sizes()), " and dtype ",
          c10::toString(it->second.scalar_type()), "; the model needs ", c10::str(full_shape),
          " float32", tp_size_ > 1 ? " (model-wide; this tensor-parallel rank keeps its slice)"
                                   : ""));
    }
    copies.emplace_back(params_[where_[i].first].View(where_[i].second), it->second);
  }
  for (size_t i = 0; i < copies.size(); ++i) {
    const ShardSpec& spec = shard_specs_[i];
    const bool paged = pager_ != nullptr && page_piece_[i] >= 0;
    if (paged) pager_->Begin(page_piece_[i], StatePager::Pass::kWrite);
    copies[i].first.copy_(spec.dim < 0 ? copies[i].second : SliceShard(copies[i].second, spec));
    if (paged) pager_->End(page_piece_[i], StatePager::Pass::kWrite);
  }
  return absl::OkStatus();
}

int64_t Gpt::NumParameters() const {
  int64_t n = 0;
  for (int g : {kDecay, kNoDecay}) {
    for (const memory::FlatBuffer::Entry& e : params_[g].entries()) n += e.numel;
  }
  return n;
}

int64_t Gpt::NumParametersNoPos() const {
  if (!has_embedding()) return NumParameters();
  return NumParameters() - static_cast<int64_t>(config_.block_size) * config_.n_embd;
}

double Gpt::FlopsPerToken() const {
  // The first stage of a pipeline only looks wte up (its local rows); the head's copy is the
  // matmul.
  const double lookup_only =
      has_embedding() && !has_head() ? static_cast<double>(Lookup("wte.weight").value.numel())
                                     : 0.0;
  const int blocks = std::min(end_piece_ - 1, config_.n_layer) - std::max(first_piece_, 1) + 1;
  // Attention scores and their product with v: 12 L C T for the model, n_head / t of the heads
  // (so C / t of the width) here.
  return 6.0 * (NumParametersNoPos() - lookup_only) +
         12.0 * blocks * (config_.n_embd / tp_size_) * static_cast<double>(config_.block_size);
}

}  // namespace shoal::runtime
