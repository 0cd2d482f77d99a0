// Pipeline stages of the GPT: a model cut into contiguous ranges of pieces must compute exactly
// what the full model computes. The reference is the full model itself (whose own correctness the
// golden test pins against PyTorch): chained stage losses equal its loss, stage gradients (wte
// summed over its two copies) equal its gradients, and stage parameters are a subset of its
// parameters with the same names and bit-identical initial values.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/config.h"
#include "runtime/gpt.h"
#include "tests/runtime/tensor_compare.h"

namespace shoal::runtime {
namespace {

constexpr uint64_t kSeed = 1234;
constexpr int kLayers = 4;
constexpr int kPieces = kLayers + 2;  // embedding, 4 blocks, head

ModelConfig SmallModel() {
  return ModelConfig{/*n_layer=*/kLayers, /*n_head=*/2, /*n_embd=*/16, /*block_size=*/8,
                     /*vocab_size=*/32};
}

struct Batch {
  at::Tensor tokens, targets;
};

Batch RandomBatch(int64_t b, int64_t t, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {at::randint(SmallModel().vocab_size, {b, t}, gen, at::kLong),
          at::randint(SmallModel().vocab_size, {b, t}, gen, at::kLong)};
}

// Stages for the cut points `bounds` = {0, b1, ..., kPieces}.
std::vector<std::unique_ptr<Gpt>> MakeStages(const std::vector<int>& bounds) {
  std::vector<std::unique_ptr<Gpt>> stages;
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    auto stage = Gpt::CreateStage(SmallModel(), kSeed, bounds[s], bounds[s + 1]);
    EXPECT_TRUE(stage.ok()) << stage.status();
    if (!stage.ok()) return {};
    stages.push_back(std::move(*stage));
  }
  return stages;
}

// Forward of one micro-batch through all stages; activations are copied between stages as a
// transfer between processes would. Returns the loss.
double ChainForward(std::vector<std::unique_ptr<Gpt>>& stages, const Batch& batch, int slot) {
  MicroBatch mb{&batch.targets, batch.tokens.size(0), batch.tokens.size(1), slot};
  at::Tensor x = batch.tokens;
  for (size_t s = 0; s < stages.size(); ++s) {
    x = stages[s]->StageForward(x, mb);
    if (s + 1 < stages.size()) x = x.clone();
  }
  return x.item<double>();
}

void ChainBackward(std::vector<std::unique_ptr<Gpt>>& stages, float loss_scale, int slot) {
  at::Tensor g;
  for (int s = static_cast<int>(stages.size()) - 1; s >= 0; --s) {
    g = stages[s]->StageBackward(g, loss_scale, slot);
    if (s > 0) {
      ASSERT_TRUE(g.defined()) << "stage " << s << " returned no input gradient";
      g = g.clone();
    } else {
      EXPECT_FALSE(g.defined());
    }
  }
}

// Gradients of all stages by name, the copies of a shared parameter summed.
std::map<std::string, at::Tensor> SummedGradients(const std::vector<std::unique_ptr<Gpt>>& stages) {
  std::map<std::string, at::Tensor> sum;
  for (const auto& stage : stages) {
    for (const auto& [name, g] : stage->NamedGradients()) {
      auto it = sum.find(name);
      if (it == sum.end()) {
        sum.emplace(name, g.clone());
      } else {
        it->second.add_(g);
      }
    }
  }
  return sum;
}

void ExpectGradientsMatch(const Gpt& full, const std::vector<std::unique_ptr<Gpt>>& stages,
                          const std::string& what) {
  const std::map<std::string, at::Tensor> got = SummedGradients(stages);
  const auto want = full.NamedGradients();
  EXPECT_EQ(got.size(), want.size()) << what;
  for (const auto& [name, g] : want) {
    auto it = got.find(name);
    ASSERT_NE(it, got.end()) << what << ": no stage holds " << name;
    EXPECT_GT(g.abs().max().item<double>(), 0.0) << what << ": " << name;  // test is not vacuous
    EXPECT_LE(RelMaxError(it->second, g), 1e-6) << what << ": gradient of " << name;
  }
}

const std::vector<std::vector<int>>& Splits() {
  static const std::vector<std::vector<int>> splits = {
      {0, kPieces},                                      // one stage = the full model
      {0, 1, kPieces},                                   // embedding alone
      {0, kPieces - 1, kPieces},                         // head alone
      {0, 3, kPieces},                                   // even
      {0, 2, kPieces},                                   // uneven
      {0, 1, kPieces - 1, kPieces},                      // embedding alone, head alone
      {0, 2, 3, kPieces},                                // uneven, one block in the middle
      {0, 4, 5, kPieces},                                // head stage holds the last block
      {0, 1, 2, kPieces},                                // embedding alone, one block
  };
  return splits;
}

std::string Describe(const std::vector<int>& bounds) {
  std::string s = "split";
  for (int b : bounds) s += " " + std::to_string(b);
  return s;
}

TEST(GptStageTest, ParametersAreANamedSubsetWithTheFullModelsInitialValues) {
  Gpt full(SmallModel(), kSeed);
  std::map<std::string, at::Tensor> full_params;
  for (const auto& [name, t] : full.NamedParameters()) full_params.emplace(name, t);
  for (const auto& bounds : Splits()) {
    auto stages = MakeStages(bounds);
    ASSERT_EQ(stages.size(), bounds.size() - 1);
    std::map<std::string, int> holders;
    int64_t total = 0;
    double flops = 0;
    for (size_t s = 0; s < stages.size(); ++s) {
      const Gpt& stage = *stages[s];
      EXPECT_EQ(stage.pieces().size(), static_cast<size_t>(bounds[s + 1] - bounds[s]));
      for (const auto& [name, t] : stage.NamedParameters()) {
        auto it = full_params.find(name);
        ASSERT_NE(it, full_params.end()) << Describe(bounds) << ": unknown name " << name;
        EXPECT_TRUE(at::equal(t, it->second)) << Describe(bounds) << ": value of " << name;
        ++holders[name];
      }
      // wte is shared exactly when the stage holds one of the embedding and the head.
      const bool one_end = (bounds[s] == 0) != (bounds[s + 1] == kPieces);
      EXPECT_EQ(stage.SharedParameters(),
                one_end ? std::vector<std::string>{"wte.weight"} : std::vector<std::string>{})
          << Describe(bounds) << " stage " << s;
      total += stage.NumParameters();
      flops += stage.FlopsPerToken();
    }
    // Every parameter is held once, except wte twice once the two ends are apart.
    EXPECT_EQ(holders.size(), full_params.size()) << Describe(bounds);
    for (const auto& [name, n] : holders) {
      EXPECT_EQ(n, name == "wte.weight" && stages.size() > 1 ? 2 : 1) << name;
    }
    const int64_t wte = SmallModel().vocab_size * SmallModel().n_embd;
    EXPECT_EQ(total, full.NumParameters() + (stages.size() > 1 ? wte : 0)) << Describe(bounds);
    // The wte lookup costs no matmul, so the stages' FLOPs add up to the model's.
    EXPECT_NEAR(flops, full.FlopsPerToken(), 1e-9 * full.FlopsPerToken()) << Describe(bounds);
  }
}

TEST(GptStageTest, ChainedStagesGiveTheFullModelsLossAndGradients) {
  const Batch batch = RandomBatch(/*b=*/3, /*t=*/8, /*seed=*/5);
  const float scale = 0.5f;
  Gpt full(SmallModel(), kSeed);
  full.ZeroGrad();
  const double want_loss = full.ForwardBackward(batch.tokens, batch.targets, scale);
  // At init the loss is near ln(vocab): a sanity bound that the reference itself is sound.
  EXPECT_NEAR(want_loss, std::log(32.0), 0.5);
  for (const auto& bounds : Splits()) {
    auto stages = MakeStages(bounds);
    ASSERT_EQ(stages.size(), bounds.size() - 1);
    for (auto& st : stages) st->ZeroGrad();
    const double loss = ChainForward(stages, batch, /*slot=*/0);
    EXPECT_NEAR(loss, want_loss, 1e-6 * want_loss) << Describe(bounds);
    ChainBackward(stages, scale, /*slot=*/0);
    ExpectGradientsMatch(full, stages, Describe(bounds));
  }
}

// Runs `batches` through 3-stage pipelines one at a time, then all in flight (one slot each) with
// backward in reverse order and in order; each must match the full model run one at a time.
void CheckInFlight(const std::vector<Batch>& batches, const std::string& name) {
  const float scale = 1.0f / static_cast<float>(batches.size());
  Gpt full(SmallModel(), kSeed);
  full.ZeroGrad();
  std::vector<double> want;
  for (const Batch& b : batches) want.push_back(full.ForwardBackward(b.tokens, b.targets, scale));

  for (const std::vector<int>& bounds :
       std::vector<std::vector<int>>{{0, 2, 4, kPieces}, {0, 1, kPieces - 1, kPieces}}) {
    auto stages = MakeStages(bounds);
    ASSERT_EQ(stages.size(), 3u);
    for (const std::string order : {"sequential", "reverse", "in-order"}) {
      const std::string what = name + ", " + Describe(bounds) + ", " + order;
      for (auto& st : stages) st->ZeroGrad();
      std::vector<double> got(batches.size());
      if (order == "sequential") {
        for (size_t m = 0; m < batches.size(); ++m) {
          got[m] = ChainForward(stages, batches[m], 0);
          ChainBackward(stages, scale, 0);
        }
      } else {
        for (size_t m = 0; m < batches.size(); ++m) {
          got[m] = ChainForward(stages, batches[m], static_cast<int>(m));
        }
        for (size_t i = 0; i < batches.size(); ++i) {
          const size_t m = order == "reverse" ? batches.size() - 1 - i : i;
          ChainBackward(stages, scale, static_cast<int>(m));
        }
      }
      for (size_t m = 0; m < batches.size(); ++m) {
        EXPECT_NEAR(got[m], want[m], 1e-6 * want[m]) << what << " micro-batch " << m;
      }
      ExpectGradientsMatch(full, stages, what);
    }
  }
}

TEST(GptStageTest, MicroBatchesInFlightEqualOneAtATime) {
  // Equal shapes: only the numbers can tell the slots apart.
  CheckInFlight({RandomBatch(2, 8, 21), RandomBatch(2, 8, 22), RandomBatch(2, 8, 23)},
                "equal shapes");
  // Different shapes: each slot keeps its own (B, T) and buffers.
  CheckInFlight({RandomBatch(2, 8, 11), RandomBatch(3, 6, 12), RandomBatch(1, 8, 13)},
                "mixed shapes");
}

TEST(GptStageTest, BadRangesAreRefusedWithTheNumbers) {
  struct Case {
    int first, end;
    std::string text;
  };
  for (const Case& c : std::vector<Case>{{-1, 2, "[-1, 2)"},
                                         {3, 3, "[3, 3)"},
                                         {4, 2, "[4, 2)"},
                                         {0, 7, "[0, 7)"},
                                         {6, 7, "[6, 7)"}}) {
    auto stage = Gpt::CreateStage(SmallModel(), kSeed, c.first, c.end);
    ASSERT_FALSE(stage.ok()) << c.text;
    EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(stage.status().message().find(c.text), std::string::npos) << stage.status();
    EXPECT_NE(stage.status().message().find("[0, 6)"), std::string::npos) << stage.status();
  }
  auto pad = Gpt::CreateStage(SmallModel(), kSeed, 0, 2, /*pad_multiple=*/0);
  ASSERT_FALSE(pad.ok());
  EXPECT_NE(pad.status().message().find("pad_multiple 0"), std::string::npos) << pad.status();
}

// Returns the message of the c10::Error `f` throws, or "" if it throws none.
template <typename F>
std::string ErrorOf(F f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(GptStageTest, BadStageInputsAreRefused) {
  auto mid = Gpt::CreateStage(SmallModel(), kSeed, 2, 4);
  auto last = Gpt::CreateStage(SmallModel(), kSeed, 4, kPieces);
  ASSERT_TRUE(mid.ok() && last.ok());
  const Batch batch = RandomBatch(2, 8, 3);
  MicroBatch mb{&batch.targets, 2, 8, 0};
  // A (B, T, C) activation of the wrong width names the expected shape.
  EXPECT_NE(ErrorOf([&] { (*mid)->StageForward(at::zeros({2, 8, 15}), mb); }).find("(2, 8, 16)"),
            std::string::npos);
  // Backward of a slot that never ran forward names the slot.
  EXPECT_NE(ErrorOf([&] { (*mid)->StageBackward(at::zeros({2, 8, 16}), 1.0f, 5); })
                .find("slot 5"),
            std::string::npos);
  // The last stage needs targets, and refuses an output gradient.
  MicroBatch no_targets{nullptr, 2, 8, 0};
  EXPECT_NE(ErrorOf([&] { (*last)->StageForward(at::zeros({2, 8, 16}), no_targets); })
                .find("targets"),
            std::string::npos);
  (*last)->StageForward(at::zeros({2, 8, 16}), mb);
  EXPECT_NE(ErrorOf([&] { (*last)->StageBackward(at::zeros({2, 8, 16}), 1.0f, 0); })
                .find("undefined"),
            std::string::npos);
  // A wrong output gradient on a middle stage names the expected shape.
  (*mid)->StageForward(at::zeros({2, 8, 16}), mb);
  EXPECT_NE(ErrorOf([&] { (*mid)->StageBackward(at::zeros({2, 4, 16}), 1.0f, 0); })
                .find("(2, 8, 16)"),
            std::string::npos);
}

}  // namespace
}  // namespace shoal::runtime
