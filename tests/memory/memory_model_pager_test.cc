// The model pager against an unpaged model: the same losses and parameters bit for bit over
// several AdamW steps with two micro-batches each, while the pages of the paged buffers that are
// actually resident (counted with mincore, independently of the pager's own counters) never
// exceed its budget; and the refusal of a budget too small to page at all. Also the activation
// plan's blocks that recompute or offload: the same gradients bit for bit as keeping everything,
// less held, the packed bytes written, and a damaged offload slot refused by name.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "parallel/adamw.h"
#include "memory/activation_offload.h"
#include "memory/model_pager.h"
#include "runtime/gpt.h"
#include "tests/test_util.h"

namespace shoal::runtime {
namespace {

using memory::ActivationOffloadOptions;
using memory::ModelPager;
using memory::ModelPagerOptions;

ModelConfig SmallModel() {
  ModelConfig m;
  m.n_layer = 12;
  m.n_head = 2;
  m.n_embd = 64;
  m.block_size = 32;
  m.vocab_size = 256;
  return m;
}

// Resident pages of [p, p + bytes), counted by the kernel.
int64_t ResidentBytes(const float* p, int64_t bytes) {
  const int64_t page = sysconf(_SC_PAGESIZE);
  std::vector<unsigned char> v((bytes + page - 1) / page);
  EXPECT_EQ(mincore(const_cast<float*>(p), static_cast<size_t>(bytes), v.data()), 0);
  int64_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n * page;
}

// Forwards to a ModelPager and measures, after every call, what of the paged buffers is
// resident.
class MeasuringPager final : public StatePager {
 public:
  explicit MeasuringPager(ModelPager* pager) : pager_(pager) {}
  memory::ChunkLayout Layout(const std::vector<memory::ChunkGroup>& groups) override {
    return pager_->Layout(groups);
  }
  void Attach(memory::FlatBuffer* params, memory::FlatBuffer* grads,
              std::vector<std::vector<int>> piece_entries) override {
    params_ = params;
    grads_ = grads;
    pager_->Attach(params, grads, std::move(piece_entries));
    Measure();
  }
  void Begin(int piece, Pass pass) override {
    pager_->Begin(piece, pass);
    Measure();
  }
  void End(int piece, Pass pass) override {
    pager_->End(piece, pass);
    Measure();
  }
  void ZeroGrads() override {
    pager_->ZeroGrads();
    Measure();
  }
  void Measure() {
    // The store's loader thread may hand a victim's pages from one buffer's home to the other's
    // (mremap) while the two ranges are counted one after the other, which would count those
    // pages twice. Counting the parameters before and after the gradients and keeping the smaller
    // count counts a page that moved at most once.
    const int64_t bytes = params_->flat().numel() * 4;
    const float* params = params_->flat().data_ptr<float>();
    const int64_t params_before = ResidentBytes(params, bytes);
    const int64_t grads = ResidentBytes(grads_->flat().data_ptr<float>(), bytes);
    const int64_t resident = std::min(params_before, ResidentBytes(params, bytes)) + grads;
    peak = std::max(peak, resident);
    ++measurements;
  }
  int64_t peak = 0;
  int measurements = 0;

 private:
  ModelPager* pager_;
  memory::FlatBuffer* params_ = nullptr;
  memory::FlatBuffer* grads_ = nullptr;
};

// `optimizer_in_backward`: the paged AdamW steps each decay chunk as the last micro-batch's
// backward finalises it (the trainer's mode without clipping) instead of after backward.
void PagedTrainingRun(bool optimizer_in_backward) {
  const ModelConfig config = SmallModel();
  shoal::testing::TempDir dir;
  Gpt ref(config, 7);
  int64_t decay_elements = 0;
  for (const auto& e : ref.params(Gpt::kDecay).entries()) decay_elements += e.numel;
  // A quarter of the decay group's states (16 bytes per element).
  ModelPagerOptions po;
  po.budget_bytes = 16 * decay_elements / 4;
  po.disk_directory = dir.path();
  int64_t observed = 0, observed_peak = 0;
  po.allocation_observer = [&](int64_t delta) {
    observed += delta;
    observed_peak = std::max(observed_peak, observed);
  };
  ModelPager pager(po);
  MeasuringPager measuring(&pager);
  Gpt paged(config, 7, 1, &measuring);
  ASSERT_GE(2 * pager.num_chunks() * pager.chunk_elements() * 4, 2 * pager.paged_budget_bytes())
      << "most of the parameters and gradients live on disk";

  parallel::AdamWOptions ao;
  ao.weight_decay = 0.1;
  parallel::AdamW ref_opt({{&ref.params(Gpt::kDecay), &ref.grads(Gpt::kDecay), true},
                           {&ref.params(Gpt::kNoDecay), &ref.grads(Gpt::kNoDecay), false}},
                          ao);
  parallel::MomentOffload mo;
  mo.host_budget_bytes = pager.moment_budget_bytes();
  mo.chunk_elements = pager.chunk_elements();
  mo.disk_directory = dir.path();
  mo.residency = &pager;
  parallel::AdamW paged_opt(
      {{&paged.params(Gpt::kDecay), &paged.grads(Gpt::kDecay), true},
       {&paged.params(Gpt::kNoDecay), &paged.grads(Gpt::kNoDecay), false}},
      ao, parallel::Shard{}, mo);
  int chunks_stepped_in_backward = 0;
  if (optimizer_in_backward) {
    pager.SetOnGradientsFinal([&](int chunk) {
      paged_opt.StepChunk(chunk);
      ++chunks_stepped_in_backward;
    });
  }

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  int64_t loads_before = 0;
  for (int step = 0; step < 4; ++step) {
    SCOPED_TRACE(step);
    pager.BeginStep();
    if (step == 2) {
      loads_before = pager.store().stats().loads + pager.store().stats().zero_fills;
    }
    ref.ZeroGrad();
    paged.ZeroGrad();
    if (optimizer_in_backward) paged_opt.BeginStep(1e-3, 1.0);
    for (int m = 0; m < 2; ++m) {
      const at::Tensor x = at::randint(0, config.vocab_size, {3, config.block_size}, gen);
      const at::Tensor y = at::randint(0, config.vocab_size, {3, config.block_size}, gen);
      pager.BeginMicroBatch(m == 1);
      const double a = ref.ForwardBackward(x, y, 0.5f);
      const double b = paged.ForwardBackward(x, y, 0.5f);
      EXPECT_EQ(a, b) << "micro-batch " << m;
    }
    // The norm from the block sums taken during backward equals the norm of the whole buffer
    // when laid out the same way; across layouts it agrees to rounding.
    const double ref_norm = parallel::GlobalL2Norm(
        {ref.grads(Gpt::kDecay).flat(), ref.grads(Gpt::kNoDecay).flat()});
    const double paged_norm = std::sqrt(parallel::GlobalSumSquares(
        {paged.grads(Gpt::kNoDecay).flat()}, pager.DecayGradSumSquares()));
    EXPECT_NEAR(paged_norm, ref_norm, 1e-12 * ref_norm);
    ref_opt.Step(1e-3, 1.0);
    if (optimizer_in_backward) {
      paged_opt.FinishStep();
    } else {
      paged_opt.Step(1e-3, 1.0);
    }
  }
  // Every decay chunk was stepped inside backward, once per step.
  EXPECT_EQ(chunks_stepped_in_backward, optimizer_in_backward ? 4 * pager.num_chunks() : 0);
  EXPECT_TRUE(pager.traced());
  // The plan's prediction of loads per step (a simulation with one chunk in use at a time)
  // against what the steps after the warm-up did (several pinned, prefetches besides).
  const int64_t measured =
      (pager.store().stats().loads + pager.store().stats().zero_fills - loads_before) / 2;
  EXPECT_GT(pager.predicted_loads_per_step(), 0);
  EXPECT_GE(measured, pager.predicted_loads_per_step() / 2);
  EXPECT_LE(measured, 3 * pager.predicted_loads_per_step());
  std::printf("loads per step: predicted %lld, measured %lld\n",
              static_cast<long long>(pager.predicted_loads_per_step()),
              static_cast<long long>(measured));
  const auto want = ref.NamedParameters();
  const auto got = paged.NamedParameters();
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(want[i].first, got[i].first);
    EXPECT_TRUE(want[i].second.equal(got[i].second)) << want[i].first;
  }
  EXPECT_EQ(ref.Loss(at::zeros({1, 8}, at::kLong), at::ones({1, 8}, at::kLong)),
            paged.Loss(at::zeros({1, 8}, at::kLong), at::ones({1, 8}, at::kLong)));
  // The budget, measured two ways.
  EXPECT_GT(measuring.measurements, 100);
  EXPECT_LE(measuring.peak, pager.paged_budget_bytes());
  EXPECT_LE(observed_peak, pager.paged_budget_bytes());
  EXPECT_GT(pager.store().stats().loads, 0);
  EXPECT_GT(pager.store().stats().prefetch_hits, 0);
}

TEST(ModelPagerTest, PagedTrainingIsBitIdenticalAndStaysWithinItsBudget) {
  PagedTrainingRun(/*optimizer_in_backward=*/false);
}

TEST(ModelPagerTest, OptimizerInsideBackwardIsBitIdenticalToo) {
  PagedTrainingRun(/*optimizer_in_backward=*/true);
}

// The activation plan's tests: two models from the same seed, one keeping every activation
// (the reference) and one under a plan, train on the same micro-batches.
constexpr int64_t kPlanBatch = 2;

ModelConfig PlanModel() {
  ModelConfig config = SmallModel();
  config.n_layer = 4;
  return config;
}

// Two micro-batches of ForwardBackward on both models: equal losses, then bit-identical
// gradients.
void ExpectSameGradients(Gpt& keep, Gpt& planned) {
  const ModelConfig& config = keep.config();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int m = 0; m < 2; ++m) {
    const at::Tensor x = at::randint(0, config.vocab_size, {kPlanBatch, config.block_size}, gen);
    const at::Tensor y = at::randint(0, config.vocab_size, {kPlanBatch, config.block_size}, gen);
    EXPECT_EQ(keep.ForwardBackward(x, y, 0.5f), planned.ForwardBackward(x, y, 0.5f));
  }
  const auto a = keep.NamedGradients(), b = planned.NamedGradients();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a[i].second.equal(b[i].second)) << a[i].first;
  }
}

// What a model keeping all activations holds after a forward minus what one holds where the
// blocks `given_up` keep only their output: each such block's 12 inner tensors, (15 C + H T + 4)
// floats per token.
int64_t InnerBytes(const ModelConfig& config, int given_up) {
  const int64_t T = config.block_size, C = config.n_embd, H = config.n_head;
  return given_up * 4 * kPlanBatch * T * (15 * C + H * T + 4);
}

// The model `PlanModel()` with blocks 0, 1 and 3 offloading under `dir`.
std::unique_ptr<Gpt> OffloadingModel(const std::string& dir) {
  const ModelConfig config = PlanModel();
  ActivationOffloadOptions o;
  o.directory = dir;
  o.blocks = {0, 1, 3};
  o.slot_bytes = ActivationOffloader::PackedBytes(
      BlockInnerActivationShapes(config, kPlanBatch, config.block_size));
  absl::StatusOr<std::unique_ptr<ActivationOffloader>> offloader = ActivationOffloader::Open(o);
  EXPECT_TRUE(offloader.ok()) << offloader.status();
  auto model = std::make_unique<Gpt>(config, 3);
  using M = ActivationMode;
  model->SetBlockActivationModes({M::kOffload, M::kOffload, M::kKeep, M::kOffload},
                                 std::move(*offloader));
  return model;
}

TEST(ActivationPlanTest, RecomputedBlocksGiveBitIdenticalGradientsAndHoldLess) {
  const ModelConfig config = PlanModel();
  Gpt keep(config, 3), redo(config, 3);
  redo.SetBlockRecompute({true, true, false, true});
  ExpectSameGradients(keep, redo);
  // Held between forward and backward (after a forward pass): a recomputing block keeps only its
  // output, B T C floats; a keeping one also its 12 inner tensors.
  const at::Tensor x = at::randint(0, config.vocab_size, {kPlanBatch, config.block_size});
  keep.Loss(x, x);
  redo.Loss(x, x);
  EXPECT_EQ(keep.ActivationBytes() - redo.ActivationBytes(), InnerBytes(config, 3));
}

TEST(ActivationPlanTest, OffloadedBlocksGiveBitIdenticalGradientsHoldLessAndWriteWhatTheyPack) {
  const ModelConfig config = PlanModel();
  shoal::testing::TempDir dir;
  Gpt keep(config, 3);
  std::unique_ptr<Gpt> off = OffloadingModel(dir / "activations");
  ActivationOffloader& offloader = *off->activation_offloader();
  ExpectSameGradients(keep, *off);
  // Every offloaded block of both micro-batches went to disk and came back: its 12 tensors,
  // packed at 64-byte offsets.
  int64_t packed = 0;
  for (const auto& shape : BlockInnerActivationShapes(config, kPlanBatch, config.block_size)) {
    int64_t bytes = 4;
    for (int64_t d : shape) bytes *= d;
    packed += (bytes + 63) / 64 * 64;
  }
  EXPECT_EQ(offloader.disk_stats().bytes_written, 2 * 3 * packed);
  EXPECT_EQ(offloader.disk_stats().bytes_read, 2 * 3 * packed);
  EXPECT_EQ(offloader.disk_stats().failures, 0);
  EXPECT_LE(offloader.staging_bytes(), 2 * offloader.slot_bytes());

  // Between a forward and its backward an offloading block holds its output only, as a
  // recomputing one does.
  const at::Tensor x = at::randint(0, config.vocab_size, {kPlanBatch, config.block_size});
  const MicroBatch mb{&x, kPlanBatch, config.block_size};
  keep.StageForward(x, mb);
  off->StageForward(x, mb);
  EXPECT_EQ(keep.ActivationBytes() - off->ActivationBytes(), InnerBytes(config, 3));
  // The writes are asynchronous: the tier counts them once they are done.
  offloader.Drain();
  EXPECT_EQ(offloader.disk_stats().bytes_written, 3 * 3 * packed);
  keep.StageBackward(at::Tensor(), 1.0f);
  off->StageBackward(at::Tensor(), 1.0f);
  // A forward-only pass writes nothing: no backward will read it.
  off->Loss(x, x);
  EXPECT_EQ(offloader.disk_stats().bytes_written, 3 * 3 * packed);
  EXPECT_EQ(offloader.disk_stats().bytes_read, 3 * 3 * packed);
  const auto a = keep.NamedGradients(), b = off->NamedGradients();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a[i].second.equal(b[i].second)) << a[i].first;
  }
}

TEST(ActivationPlanTest, DamagedOffloadedActivationsFailNamingTheBlock) {
  const ModelConfig config = PlanModel();
  shoal::testing::TempDir dir;
  std::unique_ptr<Gpt> off = OffloadingModel(dir / "activations");
  ActivationOffloader& offloader = *off->activation_offloader();
  const at::Tensor x = at::randint(0, config.vocab_size, {kPlanBatch, config.block_size});
  const MicroBatch mb{&x, kPlanBatch, config.block_size};
  off->StageForward(x, mb);
  offloader.Drain();  // the writes are on the file: nothing overwrites the damage below
  // Flip bytes inside block 1's payload, behind the tier's back.
  const std::string path = offloader.path();
  std::FILE* f = std::fopen(path.c_str(), "r+b");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(std::fseek(f, offloader.PayloadOffset(1, 0) + 1000, SEEK_SET), 0);
  const char garbage[16] = {'d', 'a', 'm', 'a', 'g', 'e', 'd', '!'};
  ASSERT_EQ(std::fwrite(garbage, 1, sizeof(garbage), f), sizeof(garbage));
  std::fclose(f);
  try {
    off->StageBackward(at::Tensor(), 1.0f);
    FAIL() << "block 1's activations were damaged on disk";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("block 1 (micro-batch slot 0)"), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("memory.disk_path"), std::string::npos) << msg;
  }
}

TEST(ModelPagerTest, BudgetBelowTheWorkingSetIsRefusedWithTheNumbers) {
  shoal::testing::TempDir dir;
  ModelPagerOptions po;
  po.budget_bytes = 100000;
  po.disk_directory = dir.path();
  ModelPager pager(po);
  try {
    Gpt paged(SmallModel(), 7, 1, &pager);
    FAIL() << "a budget of 100000 bytes cannot page this model";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("memory.host_budget leaves 100000 bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("raise memory.host_budget by"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace shoal::runtime
