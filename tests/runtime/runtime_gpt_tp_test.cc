// Megatron-style tensor parallelism of the GPT: a model sharded over a group of t ranks must
// compute what the unsharded model computes. Each rank is a real process (rank_launcher.h) in a
// Gloo group over a TCP store on 127.0.0.1, and builds in the same process the unsharded model
// from the same seed as its reference (the unsharded model's own correctness is pinned by the
// golden test). Checked: parameters are exactly the slices of the unsharded ones, losses and
// gradients match through several SGD steps, replicated parameters get bit-identical gradients
// on every rank, pipeline stages over tensor-parallel shards match too, and bad sizes, bad
// tensors and a dead peer give errors that name them. ShardSpec's slicing itself is checked in
// this process against hand-computed index sets.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/backend.h"
#include "common/status.h"
#include "comm/store.h"
#include "runtime/config.h"
#include "runtime/gpt.h"
#include "tests/comm/rank_launcher.h"
#include "tests/comm/store_ranks.h"
#include "tests/test_util.h"

namespace shoal::runtime {
namespace {

constexpr uint64_t kSeed = 4321;
constexpr char kCaseEnv[] = "SHOAL_GPT_TP_CASE";
constexpr char kWorldEnv[] = "SHOAL_GPT_TP_WORLD";
constexpr char kPortEnv[] = "SHOAL_GPT_TP_PORT";

// n_head 4 allows t = 1, 2, 4; vocab 102 splits unevenly over 4 ranks (25, 26, 25, 26 rows).
ModelConfig TpModel() {
  return ModelConfig{/*n_layer=*/2, /*n_head=*/4, /*n_embd=*/32, /*block_size=*/16,
                     /*vocab_size=*/102};
}
constexpr int kPieces = 4;  // embedding, 2 blocks, head
constexpr int64_t kBatch = 2;
constexpr int64_t kSeq = 16;

// A failed expectation inside a rank process: the rank prints it and exits non-zero.
#define RANK_EXPECT(cond, ...)                                                            \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      return absl::InternalError(c10::str("line ", __LINE__, ": ", #cond, ": ", __VA_ARGS__)); \
    }                                                                                     \
  } while (0)

struct Batch {
  at::Tensor tokens, targets;
};

// The same on every rank (a tensor-parallel group sees the same micro-batches).
Batch RandomBatch(uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {at::randint(TpModel().vocab_size, {kBatch, kSeq}, gen, at::kLong),
          at::randint(TpModel().vocab_size, {kBatch, kSeq}, gen, at::kLong)};
}

// The sharding the issue specifies, written out per name for rank r of t (independent of
// runtime/gpt.cc's code for it).
ShardSpec ExpectedSpec(const std::string& name, const std::vector<int64_t>& full_shape, int r,
                       int t) {
  const ModelConfig c = TpModel();
  const int64_t C = c.n_embd, V = c.vocab_size;
  ShardSpec s;
  s.full_shape = full_shape;
  if (t == 1) return s;
  if (name == "wte.weight") {
    s.dim = 0;
    s.offset = r * V / t;
    s.length = (r + 1) * V / t - r * V / t;
  } else if (absl::EndsWith(name, "attn.qkv.weight") || absl::EndsWith(name, "attn.qkv.bias")) {
    s.dim = 0;
    s.parts = 3;
    s.offset = r * C / t;
    s.length = C / t;
  } else if (absl::EndsWith(name, "attn.proj.weight")) {
    s.dim = 1;
    s.offset = r * C / t;
    s.length = C / t;
  } else if (absl::EndsWith(name, "mlp.fc.weight") || absl::EndsWith(name, "mlp.fc.bias")) {
    s.dim = 0;
    s.offset = r * 4 * C / t;
    s.length = 4 * C / t;
  } else if (absl::EndsWith(name, "mlp.proj.weight")) {
    s.dim = 1;
    s.offset = r * 4 * C / t;
    s.length = 4 * C / t;
  }
  return s;
}

bool SameSpec(const ShardSpec& a, const ShardSpec& b) {
  return a.full_shape == b.full_shape && a.dim == b.dim &&
         (a.dim < 0 || (a.parts == b.parts && a.offset == b.offset && a.length == b.length));
}

std::string Describe(const ShardSpec& s) {
  return c10::str("{full ", at::IntArrayRef(s.full_shape), ", dim ", s.dim, ", parts ", s.parts,
                  ", offset ", s.offset, ", length ", s.length, "}");
}

// max |got - want| <= 1e-5 max |want| + 1e-7, in double.
bool Close(const at::Tensor& got, const at::Tensor& want, double* err = nullptr) {
  const double scale = want.numel() == 0 ? 0.0 : want.abs().max().item<double>();
  const double diff =
      got.numel() == 0 ? 0.0
                       : (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  if (err != nullptr) *err = diff;
  return got.sizes() == want.sizes() && diff <= 1e-5 * scale + 1e-7;
}

std::map<std::string, at::Tensor> ByName(const std::vector<std::pair<std::string, at::Tensor>>& v) {
  return std::map<std::string, at::Tensor>(v.begin(), v.end());
}

// The model's specs equal the table, and its parameters are exactly the slices of the
// unsharded model's.
absl::Status CheckShardsOfFull(const Gpt& sharded, const Gpt& full, int r, int t) {
  const std::vector<ShardSpec> specs = sharded.ShardSpecs();
  const auto params = sharded.NamedParameters();
  const std::map<std::string, at::Tensor> full_params = ByName(full.NamedParameters());
  RANK_EXPECT(specs.size() == params.size(), specs.size(), " specs for ", params.size(),
              " parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, local] = params[i];
    auto it = full_params.find(name);
    RANK_EXPECT(it != full_params.end(), "the unsharded model has no ", name);
    const ShardSpec want = ExpectedSpec(name, it->second.sizes().vec(), r, t);
    RANK_EXPECT(SameSpec(specs[i], want), name, ": spec ", Describe(specs[i]), ", want ",
                Describe(want));
    RANK_EXPECT(local.equal(SliceShard(it->second, specs[i])), name,
                " is not the slice of the unsharded model's");
  }
  return absl::OkStatus();
}

// Every gradient of `sharded` equals the slice of the matching one in `want_full` (by name).
absl::Status CheckGradients(const Gpt& sharded, const std::map<std::string, at::Tensor>& want_full,
                            const std::string& what) {
  const std::vector<ShardSpec> specs = sharded.ShardSpecs();
  const auto grads = sharded.NamedGradients();
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& [name, g] = grads[i];
    auto it = want_full.find(name);
    RANK_EXPECT(it != want_full.end(), what, ": no reference gradient for ", name);
    const at::Tensor want = SliceShard(it->second, specs[i]);
    RANK_EXPECT(want.abs().max().item<double>() > 0, what, ": reference gradient of ", name,
                " is zero, the check would be vacuous");
    double err = 0;
    RANK_EXPECT(Close(g, want, &err), what, ": gradient of ", name, " off by ", err,
                " (max |want| ", want.abs().max().item<double>(), ")");
  }
  return absl::OkStatus();
}

// Replicated parameters must get bit-identical gradients on every rank (else their copies drift
// apart under the optimizer): rank 0's are broadcast and compared exactly.
absl::Status CheckReplicatedGradientsIdentical(const Gpt& sharded, comm::Backend& group) {
  const std::vector<ShardSpec> specs = sharded.ShardSpecs();
  const auto grads = sharded.NamedGradients();
  for (size_t i = 0; i < grads.size(); ++i) {
    if (specs[i].dim >= 0) continue;
    at::Tensor root = grads[i].second.clone();
    const absl::Status s = group.Broadcast(root, 0)->Wait();
    if (!s.ok()) return s;
    RANK_EXPECT(root.equal(grads[i].second), "replicated gradient of ", grads[i].first,
                " differs from rank 0's by ",
                (root - grads[i].second).abs().max().item<double>());
  }
  return absl::OkStatus();
}

void SgdStep(Gpt& model, float lr) {
  for (int g = 0; g < 2; ++g) model.params(g).flat().add_(model.grads(g).flat(), -lr);
}

// The whole model sharded over the group against the unsharded model, through 5 SGD steps. The
// sharded model computes with `kernels`; the unsharded one with the fused CPU kernels.
absl::Status RunMatchCase(comm::Backend& group, Kernels kernels) {
  const int r = group.rank(), t = group.size();
  const ModelConfig cfg = TpModel();
  Gpt full(cfg, kSeed);
  auto made = Gpt::CreateStage(cfg, kSeed, 0, kPieces, 1, TensorParallel{&group});
  if (!made.ok()) return made.status();
  Gpt& sharded = **made;
  sharded.SetKernels(kernels);
  RANK_EXPECT(sharded.tp_rank() == r && sharded.tp_size() == t, "tp rank/size ",
              sharded.tp_rank(), "/", sharded.tp_size());
  SHOAL_RETURN_IF_ERROR(CheckShardsOfFull(sharded, full, r, t));

  // The slicing by hand for two tensors: the first local row of each of q, k and v is the model
  // row of this rank's first head in that block; wte's first local row is row floor(r V / t).
  const auto fp = ByName(full.NamedParameters());
  const auto sp = ByName(sharded.NamedParameters());
  const int64_t C = cfg.n_embd, cl = C / t;
  for (int part = 0; part < 3; ++part) {
    RANK_EXPECT(sp.at("blocks.1.attn.qkv.weight")[part * cl].equal(
                    fp.at("blocks.1.attn.qkv.weight")[part * C + r * cl]),
                "qkv block ", part);
  }
  RANK_EXPECT(sp.at("wte.weight")[0].equal(fp.at("wte.weight")[r * cfg.vocab_size / t]),
              "wte's first row");
  RANK_EXPECT(sp.at("blocks.0.mlp.proj.weight").size(1) == 4 * C / t, "mlp.proj local width");

  // The vocabulary-parallel embedding is exact: one rank contributes wte[id], the rest zeros.
  {
    const Batch b = RandomBatch(99);
    const MicroBatch mb{nullptr, kBatch, kSeq, 0};
    const at::Tensor got = sharded.pieces()[0]->Forward(b.tokens, mb).clone();
    RANK_EXPECT(got.equal(full.pieces()[0]->Forward(b.tokens, mb)),
                "embedding differs from the unsharded one");
  }

  constexpr float kLr = 0.5f;
  constexpr float kScale = 0.5f;
  for (int step = 0; step < 5; ++step) {
    const Batch b = RandomBatch(100 + step);
    full.ZeroGrad();
    sharded.ZeroGrad();
    const double want = full.ForwardBackward(b.tokens, b.targets, kScale);
    const double got = sharded.ForwardBackward(b.tokens, b.targets, kScale);
    RANK_EXPECT(std::abs(got - want) <= 1e-5 * std::abs(want), "step ", step, ": loss ", got,
                ", unsharded ", want);
    SHOAL_RETURN_IF_ERROR(CheckGradients(sharded, ByName(full.NamedGradients()),
                                                 c10::str("step ", step)));
    SHOAL_RETURN_IF_ERROR(CheckReplicatedGradientsIdentical(sharded, group));
    SgdStep(full, kLr);
    SgdStep(sharded, kLr);
    std::printf("rank %d step %d: loss %.7f (unsharded %.7f)\n", r, step, got, want);
  }
  const Batch eval = RandomBatch(7);
  const double want = full.Loss(eval.tokens, eval.targets);
  const double got = sharded.Loss(eval.tokens, eval.targets);
  RANK_EXPECT(std::abs(got - want) <= 1e-5 * std::abs(want), "Loss ", got, ", unsharded ", want);

  // Logits are refused rather than returning a slice of the vocabulary.
  bool threw = false;
  try {
    sharded.Logits(eval.tokens);
  } catch (const c10::Error& e) {
    threw = absl::StrContains(e.what_without_backtrace(), "tensor parallelism");
  }
  RANK_EXPECT(threw, "Logits did not refuse with tensor parallelism");

  // LoadParameters takes model-wide tensors and keeps this rank's slices.
  Gpt donor(cfg, kSeed + 1);
  const auto donor_params = donor.NamedParameters();
  SHOAL_RETURN_IF_ERROR(sharded.LoadParameters(donor_params));
  SHOAL_RETURN_IF_ERROR(CheckShardsOfFull(sharded, donor, r, t));
  // A local-shaped (not model-wide) tensor is refused, naming it, and nothing is copied.
  std::vector<std::pair<std::string, at::Tensor>> bad;
  for (const auto& [name, v] : full.NamedParameters()) {
    bad.emplace_back(name, name == "blocks.0.attn.qkv.weight" ? sp.at(name).clone() : v);
  }
  const absl::Status s = sharded.LoadParameters(bad);
  RANK_EXPECT(absl::IsDataLoss(s), "loading a shard-shaped tensor: ", s.ToString());
  RANK_EXPECT(absl::StrContains(s.message(), "blocks.0.attn.qkv.weight"), s.ToString());
  SHOAL_RETURN_IF_ERROR(CheckShardsOfFull(sharded, donor, r, t));
  return absl::OkStatus();
}

// Pipeline stages [0, 2) and [2, 4), each tensor-parallel over the group, chained in this process
// with two micro-batches in flight, against the unsharded model's accumulated gradients.
absl::Status RunStagesCase(comm::Backend& group) {
  const int r = group.rank(), t = group.size();
  const ModelConfig cfg = TpModel();
  Gpt full(cfg, kSeed);
  auto first = Gpt::CreateStage(cfg, kSeed, 0, 2, 1, TensorParallel{&group});
  auto last = Gpt::CreateStage(cfg, kSeed, 2, kPieces, 1, TensorParallel{&group});
  if (!first.ok()) return first.status();
  if (!last.ok()) return last.status();
  std::vector<Gpt*> stages = {first->get(), last->get()};
  for (Gpt* stage : stages) {
    SHOAL_RETURN_IF_ERROR(CheckShardsOfFull(*stage, full, r, t));
  }
  RANK_EXPECT(stages[1]->SharedParameters() == std::vector<std::string>{"wte.weight"},
              "the head stage keeps a wte copy");

  constexpr float kScale = 0.5f;
  const Batch batches[2] = {RandomBatch(11), RandomBatch(12)};
  full.ZeroGrad();
  double want[2];
  for (int m = 0; m < 2; ++m) {
    want[m] = full.ForwardBackward(batches[m].tokens, batches[m].targets, kScale);
  }
  // Both forwards, then both backwards (the last micro-batch first), as 1F1B's warm-up does.
  double got[2];
  for (int m = 0; m < 2; ++m) {
    const MicroBatch mb{&batches[m].targets, kBatch, kSeq, m};
    const at::Tensor act = stages[0]->StageForward(batches[m].tokens, mb).clone();
    got[m] = stages[1]->StageForward(act, mb).item<double>();
  }
  for (int m = 1; m >= 0; --m) {
    const at::Tensor g = stages[1]->StageBackward(at::Tensor(), kScale, m).clone();
    RANK_EXPECT(!stages[0]->StageBackward(g, kScale, m).defined(), "first stage's input grad");
  }
  for (int m = 0; m < 2; ++m) {
    RANK_EXPECT(std::abs(got[m] - want[m]) <= 1e-5 * std::abs(want[m]), "micro-batch ", m,
                ": loss ", got[m], ", unsharded ", want[m]);
  }
  // The two wte copies' gradients summed, as the pipeline does between its first and last stage.
  std::map<std::string, at::Tensor> summed = ByName(stages[0]->NamedGradients());
  for (auto& [name, g] : summed) g = g.clone();
  for (const auto& [name, g] : stages[1]->NamedGradients()) {
    auto it = summed.find(name);
    if (it == summed.end()) {
      summed.emplace(name, g.clone());
    } else {
      it->second.add_(g);
    }
  }
  const std::map<std::string, at::Tensor> want_grads = ByName(full.NamedGradients());
  RANK_EXPECT(summed.size() == want_grads.size(), summed.size(), " gradients, want ",
              want_grads.size());
  const std::vector<ShardSpec> specs0 = stages[0]->ShardSpecs();
  const auto names0 = stages[0]->NamedParameters();
  for (size_t i = 0; i < names0.size(); ++i) {
    const auto& name = names0[i].first;
    const at::Tensor want_g = SliceShard(want_grads.at(name), specs0[i]);
    double err = 0;
    RANK_EXPECT(Close(summed.at(name), want_g, &err), "gradient of ", name, " off by ", err);
  }
  const std::vector<ShardSpec> specs1 = stages[1]->ShardSpecs();
  const auto names1 = stages[1]->NamedParameters();
  for (size_t i = 0; i < names1.size(); ++i) {
    const auto& name = names1[i].first;
    const at::Tensor want_g = SliceShard(want_grads.at(name), specs1[i]);
    double err = 0;
    RANK_EXPECT(Close(summed.at(name), want_g, &err), "gradient of ", name, " off by ", err);
  }
  return absl::OkStatus();
}

// A group of 3 cannot split 4 heads.
absl::Status RunBadSizeCase(comm::Backend& group) {
  auto made = Gpt::CreateStage(TpModel(), kSeed, 0, kPieces, 1, TensorParallel{&group});
  RANK_EXPECT(absl::IsInvalidArgument(made.status()), made.status().ToString());
  RANK_EXPECT(absl::StrContains(made.status().message(),
                                "tensor-parallel size 3 does not divide model.n_head = 4"),
              made.status().ToString());
  return absl::OkStatus();
}

// Rank 1 leaves after the models are built; rank 0's first collective must fail and throw,
// naming where, instead of hanging.
absl::Status RunPeerDiesCase(comm::Backend& group) {
  TensorParallel tp{&group, absl::Seconds(10)};
  auto made = Gpt::CreateStage(TpModel(), kSeed, 0, kPieces, 1, tp);
  if (!made.ok()) return made.status();
  const absl::Status barrier = group.Barrier()->Wait();
  if (!barrier.ok()) return barrier;
  if (group.rank() == 1) return absl::OkStatus();  // the caller destroys the group: gone
  const Batch b = RandomBatch(3);
  std::string error;
  try {
    (*made)->ForwardBackward(b.tokens, b.targets, 1.0f);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  RANK_EXPECT(absl::StrContains(error, "tensor-parallel all-reduce in the embedding failed"),
              "error: '", error, "'");
  return absl::OkStatus();
}

// ---- Inside a rank process. ----

int RunRank() {
  ::alarm(60);  // a rank never outlives its test by much, whatever happens
  at::set_num_threads(1);  // up to 4 ranks share this machine's cores
  const std::string name = ::shoal::testing::EnvString(kCaseEnv);
  const int rank = ::shoal::testing::EnvInt(::shoal::testing::kRankEnv, -1);
  const int world = ::shoal::testing::EnvInt(kWorldEnv, -1);
  const int port = ::shoal::testing::EnvInt(kPortEnv, -1);
  if (rank < 0 || world < 1 || port <= 0) {
    std::fprintf(stderr, "rank process: bad environment\n");
    return 2;
  }
  comm::TcpStoreOptions so;
  so.port = port;
  so.world_size = world;
  so.timeout = absl::Seconds(30);
  absl::StatusOr<std::shared_ptr<comm::Store>> store = comm::MakeTcpStore(so);
  if (!store.ok()) {
    std::printf("rank %d: store: %s\n", rank, store.status().ToString().c_str());
    return 1;
  }
  comm::BackendOptions bo;
  bo.rank = rank;
  bo.world_size = world;
  bo.store = comm::MakePrefixStore(name, *store);
  bo.timeout = absl::Seconds(30);
  bo.gloo_hostname = "127.0.0.1";
  absl::StatusOr<std::unique_ptr<comm::Backend>> backend = comm::CreateBackend(bo);
  if (!backend.ok()) {
    std::printf("rank %d: CreateBackend: %s\n", rank, backend.status().ToString().c_str());
    return 1;
  }
  absl::Status s;
  try {
    if (name == "match") {
      s = RunMatchCase(**backend, Kernels::kFused);
    } else if (name == "match_aten") {
      s = RunMatchCase(**backend, Kernels::kAten);
    } else if (name == "stages") {
      s = RunStagesCase(**backend);
    } else if (name == "bad_size") {
      s = RunBadSizeCase(**backend);
    } else if (name == "peer_dies") {
      s = RunPeerDiesCase(**backend);
    } else {
      s = absl::InvalidArgumentError("unknown case " + name);
    }
  } catch (const c10::Error& e) {
    s = absl::InternalError(e.what_without_backtrace());
  }
  if (s.ok() && name != "peer_dies") {
    // Nobody leaves before everyone is done: a rank that exits right after a case with no
    // collective (bad_size) could otherwise close its sockets while a slower peer is still
    // finishing the rendezvous, which that peer reports as a failure.
    s = (*backend)->Barrier({absl::Seconds(60)})->Wait();
  }
  std::printf("rank %d: %s: %s\n", rank, name.c_str(), s.ToString().c_str());
  std::fflush(stdout);
  backend->reset();
  return s.ok() ? 0 : 1;
}

// ---- The tests. ----

// Runs `name` on `world` rank processes; every rank must exit 0.
void RunRanks(const std::string& name, int world) {
  const auto results = ::shoal::testing::LaunchRanksWithStore(
      world, {{kCaseEnv, name}, {kWorldEnv, std::to_string(world)}}, kPortEnv,
      std::chrono::seconds(90));
  ASSERT_TRUE(results.ok()) << results.status();
  for (const auto& r : *results) {
    EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                              << ::shoal::testing::DescribeRanks(*results);
  }
}

TEST(GptTensorParallelTest, TwoRanksMatchTheUnshardedModel) { RunRanks("match", 2); }

TEST(GptTensorParallelTest, FourRanksWithUnevenVocabularyMatchTheUnshardedModel) {
  RunRanks("match", 4);
}

// The vocabulary-parallel embedding and loss through ATen's calls (train.kernels = "aten"),
// with the uneven split: some ranks' shards miss most targets.
TEST(GptTensorParallelTest, FourRanksWithAtenKernelsMatchTheUnshardedModel) {
  RunRanks("match_aten", 4);
}

TEST(GptTensorParallelTest, PipelineStagesOverTwoRanksMatchTheUnshardedModel) {
  RunRanks("stages", 2);
}

TEST(GptTensorParallelTest, SizeNotDividingHeadsIsInvalidArgument) { RunRanks("bad_size", 3); }

TEST(GptTensorParallelTest, DeadPeerThrowsNamingTheCollective) { RunRanks("peer_dies", 2); }

// A group of one is no tensor parallelism: bit for bit the plain model.
TEST(GptTensorParallelTest, GroupOfOneIsThePlainModel) {
  ::shoal::testing::TempDir dir;
  auto store = comm::MakeFileStore(dir / "store", 1, absl::Seconds(10));
  ASSERT_TRUE(store.ok()) << store.status();
  comm::BackendOptions o;
  o.store = *store;
  o.gloo_hostname = "127.0.0.1";
  auto group = comm::CreateBackend(o);
  ASSERT_TRUE(group.ok()) << group.status();
  Gpt plain(TpModel(), kSeed);
  auto one = Gpt::CreateStage(TpModel(), kSeed, 0, kPieces, 1, TensorParallel{group->get()});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ((*one)->tp_size(), 1);
  EXPECT_EQ((*one)->tp_rank(), 0);
  for (const ShardSpec& s : (*one)->ShardSpecs()) EXPECT_EQ(s.dim, -1);
  const Batch b = RandomBatch(5);
  EXPECT_EQ(plain.ForwardBackward(b.tokens, b.targets, 1.0f),
            (*one)->ForwardBackward(b.tokens, b.targets, 1.0f));
  const auto want = plain.NamedGradients();
  const auto got = (*one)->NamedGradients();
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(got[i].second.equal(want[i].second)) << want[i].first;
  }
  EXPECT_TRUE((*one)->Logits(b.tokens).equal(plain.Logits(b.tokens)));
}

TEST(GptTensorParallelTest, LoadParametersNamesAWronglyShapedTensor) {
  Gpt model(TpModel(), kSeed);
  std::vector<std::pair<std::string, at::Tensor>> named;
  for (const auto& [name, v] : model.NamedParameters()) {
    named.emplace_back(name, name == "blocks.1.mlp.fc.weight" ? at::zeros({64, 32}) : v.clone());
  }
  const absl::Status s = model.LoadParameters(named);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "blocks.1.mlp.fc.weight")) << s;
}

// ---- ShardSpec slicing, in this process. ----

ShardSpec Spec(std::vector<int64_t> full, int dim, int parts, int64_t offset, int64_t length) {
  ShardSpec s;
  s.full_shape = std::move(full);
  s.dim = dim;
  s.parts = parts;
  s.offset = offset;
  s.length = length;
  return s;
}

at::Tensor Arange(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return at::arange(n, at::kFloat).view(shape);
}

TEST(ShardSpecTest, SliceTakesTheRowsOfEachPart) {
  // Fused q|k|v of C = 8 (24 rows of 2), rank 1 of 2: rows 4..7 of each block of 8.
  const at::Tensor full = Arange({24, 2});
  const at::Tensor got = SliceShard(full, Spec({24, 2}, 0, 3, 4, 4));
  std::vector<int64_t> rows;
  for (int64_t block : {0, 8, 16}) {
    for (int64_t i = 4; i < 8; ++i) rows.push_back(block + i);
  }
  const at::Tensor want = full.index_select(0, at::tensor(rows, at::kLong));
  EXPECT_TRUE(got.equal(want));
  EXPECT_TRUE(got.is_contiguous());
  // Columns [2, 4) of a (3, 8).
  const at::Tensor cols = SliceShard(Arange({3, 8}), Spec({3, 8}, 1, 1, 2, 2));
  EXPECT_TRUE(cols.equal(at::tensor({2.f, 3.f, 10.f, 11.f, 18.f, 19.f}).view({3, 2})));
  // Replicated: a copy, not a view.
  const at::Tensor rep = SliceShard(full, Spec({24, 2}, -1, 1, 0, 0));
  EXPECT_TRUE(rep.equal(full));
  rep.fill_(0);
  EXPECT_NE(full.sum().item<float>(), 0);
}

TEST(ShardSpecTest, PlacingEveryRanksSliceReassemblesTheTensor) {
  struct Layout {
    std::vector<int64_t> shape;
    int dim;
    int parts;
    int64_t extent;  // of one part along dim
  };
  // qkv rows (C = 32), proj columns, fc rows and a 102-row vocabulary (uneven over 4).
  const std::vector<Layout> layouts = {
      {{96, 32}, 0, 3, 32}, {{96}, 0, 3, 32}, {{32, 32}, 1, 1, 32},
      {{128, 32}, 0, 1, 128}, {{32, 128}, 1, 1, 128}, {{102, 32}, 0, 1, 102}};
  for (const Layout& l : layouts) {
    for (int t : {1, 2, 4}) {
      const at::Tensor full = Arange(l.shape);
      at::Tensor out = at::full(l.shape, NAN, at::kFloat);
      for (int r = 0; r < t; ++r) {
        const int64_t begin = r * l.extent / t, end = (r + 1) * l.extent / t;
        const ShardSpec spec = Spec(l.shape, l.dim, l.parts, begin, end - begin);
        const at::Tensor local = SliceShard(full, spec);
        EXPECT_EQ(local.size(l.dim), l.parts * (end - begin));
        PlaceShard(local, spec, out);
      }
      EXPECT_TRUE(out.equal(full)) << "shape " << at::IntArrayRef(l.shape) << " over " << t;
    }
  }
}

TEST(ShardSpecTest, WrongShapesThrow) {
  const ShardSpec spec = Spec({8, 4}, 0, 1, 0, 4);
  EXPECT_THROW(SliceShard(at::zeros({4, 4}), spec), c10::Error);
  at::Tensor full = at::zeros({8, 4});
  EXPECT_THROW(PlaceShard(at::zeros({3, 4}), spec, full), c10::Error);
}

}  // namespace
}  // namespace shoal::runtime

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::runtime::RunRank();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
