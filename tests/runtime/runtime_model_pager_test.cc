// The model pager against an unpaged model: the same losses and parameters bit for bit over
// several AdamW steps with two micro-batches each, while the pages of the paged buffers that are
// actually resident (counted with mincore, independently of the pager's own counters) never
// exceed its budget; and the refusal of a budget too small to page at all.
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
#include "runtime/gpt.h"
#include "runtime/model_pager.h"
#include "tests/test_util.h"

namespace shoal::runtime {
namespace {

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
    const int64_t bytes = params_->flat().numel() * 4;
    const int64_t resident = ResidentBytes(params_->flat().data_ptr<float>(), bytes) +
                             ResidentBytes(grads_->flat().data_ptr<float>(), bytes);
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

TEST(ModelPagerTest, PagedTrainingIsBitIdenticalAndStaysWithinItsBudget) {
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
    paged_opt.Step(1e-3, 1.0);
  }
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

TEST(ActivationPlanTest, RecomputedBlocksGiveBitIdenticalGradientsAndHoldLess) {
  ModelConfig config = SmallModel();
  config.n_layer = 4;
  Gpt keep(config, 3), redo(config, 3);
  redo.SetBlockRecompute({true, true, false, true});
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const int64_t B = 2, T = config.block_size, C = config.n_embd;
  for (int m = 0; m < 2; ++m) {
    const at::Tensor x = at::randint(0, config.vocab_size, {B, T}, gen);
    const at::Tensor y = at::randint(0, config.vocab_size, {B, T}, gen);
    EXPECT_EQ(keep.ForwardBackward(x, y, 0.5f), redo.ForwardBackward(x, y, 0.5f));
  }
  const auto a = keep.NamedGradients(), b = redo.NamedGradients();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a[i].second.equal(b[i].second)) << a[i].first;
  }
  // Held between forward and backward (after a forward pass): a recomputing block keeps only its
  // output, B T C floats; a keeping one also its 12 inner tensors.
  const at::Tensor x = at::randint(0, config.vocab_size, {B, T}, gen);
  keep.Loss(x, x);
  redo.Loss(x, x);
  const int64_t H = config.n_head;
  const int64_t inner = 4 * B * T * (15 * C + H * T + 4);  // ln1 .. g
  const int64_t out = 4 * B * T * C;
  const int64_t blocks_keep = 4 * (inner + out), blocks_redo = 1 * (inner + out) + 3 * out;
  EXPECT_EQ(keep.ActivationBytes() - redo.ActivationBytes(), blocks_keep - blocks_redo);
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
