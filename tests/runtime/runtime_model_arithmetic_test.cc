// The model arithmetic (common/gpt_arithmetic.h) that the layout solver, the trainer's plans, MFU
// and `shoal bench memory` share, held to the real model: the parameters it allocates, the FLOPs
// it reports from its own buffers, and the activation bytes its blocks measurably hold after a
// forward. Per-token closed forms written out by hand for one small shape anchor the formulas
// themselves.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "common/gpt_arithmetic.h"
#include "runtime/config.h"
#include "runtime/gpt.h"

namespace shoal::runtime {
namespace {

std::vector<ModelConfig> Shapes() {
  // n_layer, n_head, n_embd, block_size, vocab_size: odd vocabularies, widths not a power of two.
  return {ModelConfig{1, 1, 8, 4, 11}, ModelConfig{2, 2, 16, 8, 32}, ModelConfig{3, 4, 24, 16, 97},
          ModelConfig{4, 3, 48, 32, 257}};
}

int64_t EntryElements(const memory::FlatBuffer& b) {
  int64_t n = 0;
  for (const memory::FlatBuffer::Entry& e : b.entries()) n += e.numel;
  return n;
}

TEST(ModelArithmeticTest, HandWrittenClosedFormsForOneShape) {
  // C = 16, H = 2, T = 8, V = 32, L = 2.
  const GptShape s = ShapeOf(ModelConfig{2, 2, 16, 8, 32});
  EXPECT_EQ(GptBlockParameters(s), 12 * 256 + 13 * 16);          // 3280
  EXPECT_EQ(GptEmbeddingParameters(s), 32 * 16 + 8 * 16);        // 640
  EXPECT_EQ(GptParameters(s), 2 * 3280 + 640 + 32);              // 7232
  EXPECT_EQ(GptDecayParameters(s) + GptNoDecayParameters(s), 7232);
  // Per block and token: ln1 16, mean/rstd 2, q|k|v 48, probabilities H·T = 16, attention
  // output 16, x1 16, ln2 16, mean/rstd 2, MLP hidden 64, GELU 64, output 16: 276 floats.
  EXPECT_DOUBLE_EQ(GptBlockActivationBytesPerToken(s), 4.0 * 276);
  // With t = 2: the sharded ones halve (48 + 16 + 16 + 128 -> 104), the rest (68) stays.
  EXPECT_DOUBLE_EQ(GptBlockActivationBytesPerToken(s, 2), 4.0 * (68 + 104));
  EXPECT_DOUBLE_EQ(GptBlockOutputBytesPerToken(s), 4.0 * 16);
  EXPECT_DOUBLE_EQ(GptHeadActivationBytesPerToken(s, 2), 2 * 4.0 * 16);
  // 6 N without the positions + 12 L C T.
  EXPECT_DOUBLE_EQ(GptFlopsPerToken(s), 6.0 * (7232 - 128) + 12.0 * 2 * 16 * 8);
}

TEST(ModelArithmeticTest, ParametersAndFlopsMatchTheRealModel) {
  for (const ModelConfig& c : Shapes()) {
    SCOPED_TRACE(testing::Message() << "L " << c.n_layer << " H " << c.n_head << " C " << c.n_embd
                                    << " T " << c.block_size << " V " << c.vocab_size);
    const GptShape s = ShapeOf(c);
    Gpt model(c, /*seed=*/7);
    EXPECT_EQ(model.NumParameters(), GptParameters(s));
    EXPECT_EQ(EntryElements(model.params(Gpt::kDecay)), GptDecayParameters(s));
    EXPECT_EQ(EntryElements(model.params(Gpt::kNoDecay)), GptNoDecayParameters(s));
    EXPECT_DOUBLE_EQ(model.FlopsPerToken(), GptFlopsPerToken(s));
    // A stage of blocks only, and one holding just the head (with its copy of wte).
    auto blocks = Gpt::CreateStage(c, 7, 1, c.n_layer + 1);
    ASSERT_TRUE(blocks.ok()) << blocks.status();
    EXPECT_EQ((*blocks)->NumParameters(), c.n_layer * GptBlockParameters(s));
    EXPECT_DOUBLE_EQ((*blocks)->FlopsPerToken(), c.n_layer * GptBlockFlopsPerToken(s));
    auto head = Gpt::CreateStage(c, 7, c.n_layer + 1, c.n_layer + 2);
    ASSERT_TRUE(head.ok()) << head.status();
    EXPECT_DOUBLE_EQ((*head)->FlopsPerToken(), GptHeadFlopsPerToken(s));
  }
}

TEST(ModelArithmeticTest, BlockActivationBytesAreWhatTheModelHolds) {
  for (const ModelConfig& c : Shapes()) {
    SCOPED_TRACE(testing::Message() << "C " << c.n_embd << " H " << c.n_head << " T "
                                    << c.block_size);
    const GptShape s = ShapeOf(c);
    const int64_t batch = 3, tokens = batch * c.block_size;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
    const at::Tensor x = at::randint(c.vocab_size, {batch, c.block_size}, gen, at::kLong);
    const at::Tensor y = at::randint(c.vocab_size, {batch, c.block_size}, gen, at::kLong);
    MicroBatch mb{&y, batch, c.block_size, /*slot=*/0};
    for (bool recompute : {false, true}) {
      auto model = Gpt::CreateStage(c, 7, 0, c.n_layer + 2);
      ASSERT_TRUE(model.ok()) << model.status();
      (*model)->SetBlockRecompute(std::vector<bool>(c.n_layer, recompute));
      (*model)->StageForward(x, mb);
      // Between forward and backward: every block keeps all it needs, or only its output.
      const double per_token = recompute ? GptBlockOutputBytesPerToken(s)
                                         : GptBlockActivationBytesPerToken(s);
      EXPECT_EQ((*model)->ActivationBytes(),
                static_cast<int64_t>(c.n_layer * tokens * per_token))
          << (recompute ? "recomputing" : "keeping");
    }
  }
}

TEST(ModelArithmeticTest, UniformSplitGivesTheRemainderToTheFirstStages) {
  EXPECT_EQ(UniformSplit(10, 4), (std::vector<int>{3, 3, 2, 2}));
  EXPECT_EQ(UniformSplit(3, 3), (std::vector<int>{1, 1, 1}));
  EXPECT_TRUE(UniformSplit(3, 0).empty());
}

}  // namespace
}  // namespace shoal::runtime
