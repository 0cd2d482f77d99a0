// Swarm stage policy: where a joiner goes (the weakest stage it can hold, empty stages first,
// syncing peers as pending capacity) and what a stage costs (against parameters counted tensor by
// tensor for a tiny model).
#include "scheduler/swarm_policy.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace shoal::scheduler {
namespace {

using Code = absl::StatusCode;

SwarmStageLoad Stage(int index, std::vector<double> serving, int syncing = 0, int64_t bytes = 100) {
  SwarmStageLoad s;
  s.index = index;
  s.bytes = bytes;
  s.serving_throughputs = std::move(serving);
  s.syncing_peers = syncing;
  return s;
}

int Chosen(const std::vector<SwarmStageLoad>& stages, int64_t free_bytes = 1000) {
  auto c = ChooseStage(stages, free_bytes);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? c->index : -1;
}

TEST(ChooseStage, WeakestStageByItsSummedThroughput) {
  // Capacities 10, 3, 8: stage 1, although its one peer is faster than any of stage 0's.
  EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {3}), Stage(2, {4, 4})}), 1);
  auto c = ChooseStage({Stage(0, {5, 5}), Stage(1, {3}), Stage(2, {4, 4})}, 1000);
  EXPECT_DOUBLE_EQ(c->capacity, 3);
  EXPECT_FALSE(c->empty);
  // Ties go to the lower index, whatever the order of the list.
  EXPECT_EQ(Chosen({Stage(2, {2, 2}), Stage(0, {4}), Stage(1, {1, 3})}), 0);
}

TEST(ChooseStage, EmptyStagesFirst) {
  // An empty stage beats a weak one, the lowest empty index first.
  EXPECT_EQ(Chosen({Stage(0, {0.1}), Stage(1, {}), Stage(2, {9}), Stage(3, {})}), 1);
  auto c = ChooseStage({Stage(0, {0.1}), Stage(3, {})}, 1000);
  EXPECT_EQ(c->index, 3);
  EXPECT_TRUE(c->empty);
}

TEST(ChooseStage, SyncingPeersCountAsPendingCapacity) {
  // Three joiners arrive one after another into a swarm with three empty stages: each sync makes
  // its stage non-empty, so they spread over the stages.
  std::vector<SwarmStageLoad> stages = {Stage(0, {}), Stage(1, {}), Stage(2, {})};
  std::vector<int> order;
  for (int j = 0; j < 3; ++j) {
    const int s = Chosen(stages);
    order.push_back(s);
    ++stages[s].syncing_peers;
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));

  // A stage nobody serves yet but one peer syncs for counts that peer at the swarm's mean
  // throughput ((2 + 2) / 2 = 2): a tie with the other stages, so the second joiner does not go
  // there again but to the lowest index.
  EXPECT_EQ(Chosen({Stage(0, {2}), Stage(1, {}, 1), Stage(2, {2})}), 0);
  // With a weaker served stage, that one: the mean is (2 + 1) / 2 = 1.5 > 1.
  EXPECT_EQ(Chosen({Stage(0, {2}), Stage(1, {}, 1), Stage(2, {1})}), 2);
  // A syncing peer of a served stage is expected to match the stage's own peers: 1 + 2 x 1 = 3
  // against 2.5.
  auto c = ChooseStage({Stage(0, {1}, 2), Stage(1, {2.5})}, 1000);
  EXPECT_EQ(c->index, 1);
  EXPECT_EQ(Chosen({Stage(0, {1}, 1), Stage(1, {2.5})}), 0);  // 2 < 2.5
  // Nobody serves anywhere: a syncing peer counts 1, so the stage with fewer of them.
  EXPECT_EQ(Chosen({Stage(0, {}, 2), Stage(1, {}, 1), Stage(2, {}, 3)}), 1);
}

TEST(ChooseStage, SkipsStagesTooBigForTheJoiner) {
  // The empty stage 0 needs 900 bytes; the joiner has 500: it takes the weakest that fits.
  EXPECT_EQ(Chosen({Stage(0, {}, 0, 900), Stage(1, {7}, 0, 400), Stage(2, {3}, 0, 600),
                    Stage(3, {5}, 0, 500)},
                   500),
            3);
}

TEST(ChooseStage, RefusalNamesTheBytes) {
  auto c =
      ChooseStage({Stage(0, {1}, 0, 7000), Stage(1, {}, 0, 6000), Stage(2, {}, 0, 9000)}, 5999);
  ASSERT_EQ(c.status().code(), Code::kResourceExhausted);
  const std::string message(c.status().message());
  EXPECT_NE(message.find("5999"), std::string::npos) << message;
  EXPECT_NE(message.find("6000"), std::string::npos) << message;
  EXPECT_NE(message.find("(1)"), std::string::npos) << message;  // the smallest stage's index
}

TEST(ChooseStage, RefusesBadInput) {
  EXPECT_EQ(ChooseStage({}, 10).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {1})}, -1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {1}), Stage(0, {2})}, 1000).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(-1, {1})}, 1000).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {1}, -1)}, 1000).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {1}, 0, -5)}, 1000).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {-1})}, 1000).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ChooseStage({Stage(0, {NAN})}, 1000).status().code(), Code::kInvalidArgument);
}

// --- SwarmStageBytes against the model counted by hand -------------------------------------------

// A tiny GPT: 4 blocks, C = 8, T = 16, V = 32, 2 heads.
GptShape Tiny() {
  GptShape s;
  s.n_layer = 4;
  s.n_head = 2;
  s.n_embd = 8;
  s.block_size = 16;
  s.vocab_size = 32;
  return s;
}

// Its tensors, one by one (runtime/gpt.cc's names).
constexpr int64_t kC = 8, kT = 16, kV = 32;
constexpr int64_t kBlock = /*ln_1*/ 2 * kC + /*attn.qkv*/ kC * 3 * kC + 3 * kC +
                           /*attn.proj*/ kC * kC + kC + /*ln_2*/ 2 * kC +
                           /*mlp.fc*/ kC * 4 * kC + 4 * kC + /*mlp.proj*/ 4 * kC * kC + kC;
constexpr int64_t kWte = kV * kC, kWpe = kT * kC, kLnF = 2 * kC;
static_assert(kBlock == 872, "a block of the tiny model, counted by hand");

TEST(SwarmStageBytes, StagesOfTheTinyModel) {
  // Split {2, 1, 1} (the even split): the first stage has the embeddings, the last its own copy
  // of the tied wte and the final LayerNorm.
  ASSERT_EQ(UniformSplit(4, 3), (std::vector<int>{2, 1, 1}));
  EXPECT_EQ(*SwarmStageParameters(Tiny(), 0, 2), 2 * kBlock + kWte + kWpe);
  EXPECT_EQ(*SwarmStageParameters(Tiny(), 2, 3), kBlock);
  EXPECT_EQ(*SwarmStageParameters(Tiny(), 3, 4), kBlock + kLnF + kWte);
  // One stage for the whole model: wte counted once.
  EXPECT_EQ(*SwarmStageParameters(Tiny(), 0, 4), 4 * kBlock + kWte + kWpe + kLnF);

  // Parameter, gradient and two AdamW moments, fp32: 16 bytes each, plus the activation budget.
  EXPECT_EQ(*SwarmStageBytes(Tiny(), 2, 3, 0), 16 * kBlock);
  EXPECT_EQ(*SwarmStageBytes(Tiny(), 3, 4, 4096), 16 * (kBlock + kLnF + kWte) + 4096);
  EXPECT_EQ(*SwarmStageBytesInSplit(Tiny(), {2, 1, 1}, 0, 100),
            16 * (2 * kBlock + kWte + kWpe) + 100);
  EXPECT_EQ(*SwarmStageBytesInSplit(Tiny(), {2, 1, 1}, 1, 100), 16 * kBlock + 100);
  EXPECT_EQ(*SwarmStageBytesInSplit(Tiny(), {2, 1, 1}, 2, 100), 16 * (kBlock + kLnF + kWte) + 100);
  EXPECT_EQ(*SwarmStageBytesInSplit(Tiny(), {4}, 0, 0), 16 * (4 * kBlock + kWte + kWpe + kLnF));
}

TEST(SwarmStageBytes, RefusesBadInput) {
  EXPECT_EQ(SwarmStageParameters(Tiny(), 2, 2).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageParameters(Tiny(), -1, 2).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageParameters(Tiny(), 3, 5).status().code(), Code::kInvalidArgument);
  GptShape bad = Tiny();
  bad.vocab_size = 0;
  EXPECT_EQ(SwarmStageParameters(bad, 0, 4).status().code(), Code::kInvalidArgument);
  GptShape huge = Tiny();
  huge.n_embd = int64_t{1} << 32;
  EXPECT_EQ(SwarmStageParameters(huge, 0, 4).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageBytes(Tiny(), 0, 4, -1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageBytes(Tiny(), 0, 4, INT64_MAX).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageBytesInSplit(Tiny(), {2, 1}, 0, 0).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageBytesInSplit(Tiny(), {2, 2, 0}, 0, 0).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(SwarmStageBytesInSplit(Tiny(), {2, 2}, 2, 0).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace shoal::scheduler
