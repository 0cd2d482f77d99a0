// Swarm stage policy: where a joiner goes (the weakest stage it can hold, empty stages first, a
// stage on one peer near the weakest next, syncing peers as pending capacity) and what a stage
// costs (against parameters counted tensor by tensor for a tiny model).
#include "scheduler/swarm_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
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
  EXPECT_EQ(Chosen({Stage(0, {1}, 1), Stage(1, {3})}), 0);  // 2 < 3 (3 x 0.75 > 2)
  // Nobody serves anywhere: a syncing peer counts 1, so the stage with fewer of them.
  EXPECT_EQ(Chosen({Stage(0, {}, 2), Stage(1, {}, 1), Stage(2, {}, 3)}), 1);
}

TEST(ChooseStage, AStageOnOnePeerNearTheLowestCapacityComesFirst) {
  // The case of a swarm of 3 stages x 2 peers where a stage-1 peer died: stage 0 holds twice
  // stage 1's blocks, so its two peers together match stage 1's one (capacities 10, 10, 12). A
  // joiner sent to stage 0 would leave stage 1 one failure from a rollback, for no gain: the
  // bottleneck is 10 either way.
  EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {10}), Stage(2, {6, 6})}), 1);
  // Measured noise: stage 1's lone peer 20 % above stage 0's pair still counts as near.
  EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {12}), Stage(2, {6, 6})}), 1);
  // A joiner still syncing counts: stage 1 then has two peers, and the joiner goes to stage 0.
  EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {10}, 1), Stage(2, {6, 6})}), 0);

  // Near means within 1 / kJoinBalanceQuality of the lowest capacity: checked against every
  // capacity around the edge (lowest 10, edge 10 / 0.75 = 13.33...).
  for (double one : {10.0, 11.0, 13.0, 13.3, 13.4, 14.0, 20.0}) {
    const bool near = one * kJoinBalanceQuality <= 10;
    EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {one})}), near ? 1 : 0) << one;
  }
  // Among several single-peer stages near the lowest, the lowest capacity, then the index.
  EXPECT_EQ(Chosen({Stage(0, {6, 6}), Stage(1, {13}), Stage(2, {11}), Stage(3, {4, 7})}), 2);
  EXPECT_EQ(Chosen({Stage(0, {6, 6}), Stage(2, {11}), Stage(1, {11})}), 1);
  // An empty stage still comes before a single-peer one.
  EXPECT_EQ(Chosen({Stage(0, {5, 5}), Stage(1, {10}), Stage(2, {})}), 2);
  // The rule picks the single-peer stage only when it costs less than the threshold: against
  // brute force over small pools, the bottleneck it leaves is within kJoinBalanceQuality of the
  // best a joiner (matching its stage's mean peer) could give.
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> rate(1, 8);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<SwarmStageLoad> stages;
    for (int s = 0; s < 3; ++s) {
      std::vector<double> peers(1 + rng() % 3);
      for (double& p : peers) p = rate(rng);
      stages.push_back(Stage(s, peers));
    }
    auto bottleneck_with = [&](int chosen) {
      double b = std::numeric_limits<double>::infinity();
      for (const SwarmStageLoad& st : stages) {
        double sum = 0;
        for (double t : st.serving_throughputs) sum += t;
        if (st.index == chosen) sum += sum / st.serving_throughputs.size();
        b = std::min(b, sum);
      }
      return b;
    };
    double best = 0;
    for (int s = 0; s < 3; ++s) best = std::max(best, bottleneck_with(s));
    const int c = Chosen(stages);
    EXPECT_GE(bottleneck_with(c), best * kJoinBalanceQuality - 1e-12) << "trial " << trial;
  }
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

// ---- The rebalancer ----

// Seeded random pools: 2–4 stages of 1–4 peers, throughputs in [0.5, 10), some peers too small
// for some stages.
std::vector<SwarmPool> RandomPools(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> t(0.5, 10);
  const int stages = 2 + static_cast<int>(rng() % 3);
  std::vector<SwarmPool> pools(stages);
  int n = 0;
  for (int s = 0; s < stages; ++s) {
    pools[s].index = s;
    pools[s].bytes = 100 + static_cast<int64_t>(rng() % 3) * 100;
    const int peers = 1 + static_cast<int>(rng() % 4);
    for (int p = 0; p < peers; ++p) {
      pools[s].peers.push_back(
          SwarmPoolPeer{"p" + std::to_string(n++), t(rng), 100 + static_cast<int64_t>(rng() % 3) * 100,
                        0, -1});
    }
  }
  return pools;
}

// The bottleneck after the best single move, by trying every peer in every other stage.
double BruteForceBestBottleneck(const std::vector<SwarmPool>& pools) {
  auto bottleneck = [](const std::vector<SwarmPool>& ps) {
    double m = std::numeric_limits<double>::infinity();
    for (const SwarmPool& p : ps) {
      double c = 0;
      for (const SwarmPoolPeer& q : p.peers) c += q.throughput;
      m = std::min(m, c);
    }
    return m;
  };
  double best = bottleneck(pools);
  for (size_t s = 0; s < pools.size(); ++s) {
    if (pools[s].peers.size() < 2) continue;
    for (size_t i = 0; i < pools[s].peers.size(); ++i) {
      for (size_t to = 0; to < pools.size(); ++to) {
        if (to == s || pools[s].peers[i].free_bytes < pools[to].bytes) continue;
        std::vector<SwarmPool> moved = pools;
        moved[to].peers.push_back(moved[s].peers[i]);
        moved[s].peers.erase(moved[s].peers.begin() + static_cast<long>(i));
        best = std::max(best, bottleneck(moved));
      }
    }
  }
  return best;
}

TEST(SwarmRebalance, TheBestMoveIsTheBruteForcesOnSmallPools) {
  std::mt19937_64 rng(11);
  SwarmRebalanceOptions any;  // every gain counts, no transfer cost
  any.balance_quality = 1;
  int moves = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const std::vector<SwarmPool> pools = RandomPools(rng);
    double before = std::numeric_limits<double>::infinity();
    for (const SwarmPool& p : pools) {
      double c = 0;
      for (const SwarmPoolPeer& q : p.peers) c += q.throughput;
      before = std::min(before, c);
    }
    const double brute = BruteForceBestBottleneck(pools);
    absl::StatusOr<std::optional<SwarmMove>> got = BestSwarmMove(pools, 0, any);
    ASSERT_TRUE(got.ok()) << got.status();
    if (brute > before) {
      ASSERT_TRUE(got->has_value()) << "trial " << trial;
      EXPECT_DOUBLE_EQ((*got)->bottleneck_after, brute) << "trial " << trial;
      EXPECT_DOUBLE_EQ((*got)->bottleneck_before, before);
      ++moves;
    } else {
      EXPECT_FALSE(got->has_value()) << "trial " << trial;
    }
    // Petals' threshold: a move only where the brute force gains 1 / 0.75.
    absl::StatusOr<std::optional<SwarmMove>> strict = BestSwarmMove(pools, 0, {});
    ASSERT_TRUE(strict.ok());
    EXPECT_EQ(strict->has_value(), brute * 0.75 >= before && brute > before) << "trial " << trial;
  }
  EXPECT_GT(moves, 300);  // the trials exercise moves, not only refusals
}

TEST(SwarmRebalance, RulesKeepStagesServedTransfersPaidAndMovedPeersPut) {
  // Stage 0: 2 + 6; stage 1: 3. The 6 would leave stage 0 weaker (2) than stage 1 was; the 2 goes.
  std::vector<SwarmPool> pools = {{0, 100, {{"a", 2, 1000, 0, -1}, {"b", 6, 1000, 0, -1}}},
                                  {1, 100, {{"c", 3, 1000, 0, -1}}}};
  auto move = BestSwarmMove(pools, 10, {});
  ASSERT_TRUE(move.ok() && move->has_value());
  EXPECT_EQ((*move)->peer, "a");
  EXPECT_EQ((*move)->to, 1);
  EXPECT_DOUBLE_EQ((*move)->bottleneck_after, 5);
  // What the decision rests on, for the log: the peer's rate and every stage's capacity.
  EXPECT_DOUBLE_EQ((*move)->peer_throughput, 2);
  EXPECT_EQ((*move)->capacities, (std::vector<double>{8, 3}));
  // A peer that moved within stay_periods stays.
  pools[0].peers[0].moved_at_period = 8;
  move = BestSwarmMove(pools, 10, {});
  ASSERT_TRUE(move.ok());
  EXPECT_FALSE(move->has_value());
  pools[0].peers[0].moved_at_period = 7;
  move = BestSwarmMove(pools, 10, {});
  ASSERT_TRUE(move.ok());
  EXPECT_TRUE(move->has_value());
  // Too slow a link: its download outlasts what the move gains within a period.
  SwarmRebalanceOptions o;
  o.period_s = 60;
  pools[0].peers[0].state_bytes_per_s = 100.0 / 59;  // 59 s to sync a 100-byte stage
  move = BestSwarmMove(pools, 10, o);
  ASSERT_TRUE(move.ok());
  EXPECT_FALSE(move->has_value());
  pools[0].peers[0].state_bytes_per_s = 100;  // 1 s
  move = BestSwarmMove(pools, 10, o);
  ASSERT_TRUE(move.ok() && move->has_value());
  EXPECT_DOUBLE_EQ((*move)->transfer_s, 1);
  // Too little memory for the weakest stage, or a stage's only peer: no move.
  pools[1].bytes = 5000;
  move = BestSwarmMove(pools, 10, o);
  ASSERT_TRUE(move.ok());
  EXPECT_FALSE(move->has_value());
  std::vector<SwarmPool> lone = {{0, 1, {{"x", 9, 10, 0, -1}}}, {1, 1, {{"y", 1, 10, 0, -1}}}};
  move = BestSwarmMove(lone, 0, {});
  ASSERT_TRUE(move.ok());
  EXPECT_FALSE(move->has_value());
  // Refusals.
  std::vector<SwarmPool> twice = {{0, 1, {}}, {0, 1, {}}};
  EXPECT_EQ(BestSwarmMove(twice, 0, {}).status().code(), Code::kInvalidArgument);
  std::vector<SwarmPool> nan = {{0, 1, {{"n", std::nan(""), 1, 0, -1}}}, {1, 1, {}}};
  EXPECT_EQ(BestSwarmMove(nan, 0, {}).status().code(), Code::kInvalidArgument);
  SwarmRebalanceOptions bad;
  bad.balance_quality = 0;
  EXPECT_EQ(BestSwarmMove(pools, 0, bad).status().code(), Code::kInvalidArgument);
}

// A synthetic trace of 100 checks: throughputs measured with ±15 % noise. Balanced stages never
// move a peer; an imbalanced swarm moves once (after winning two checks in a row) and never back.
TEST(SwarmRebalance, HysteresisHoldsUnderNoisyThroughput) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> noise(0.85, 1.15);
  auto measured = [&](std::vector<SwarmPool> truth) {
    for (SwarmPool& p : truth) {
      for (SwarmPoolPeer& q : p.peers) q.throughput *= noise(rng);
    }
    return truth;
  };
  // Balanced: 3 stages of two peers of 4 samples/s each.
  std::vector<SwarmPool> balanced;
  for (int s = 0; s < 3; ++s) {
    balanced.push_back({s, 10, {{"s" + std::to_string(s) + "a", 4, 100, 0, -1},
                                {"s" + std::to_string(s) + "b", 4, 100, 0, -1}}});
  }
  SwarmRebalancer quiet({});
  for (int64_t k = 0; k < 100; ++k) {
    auto m = quiet.Check(measured(balanced), k);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_FALSE(m->has_value()) << "check " << k << ": " << (*m)->peer;
  }
  // Imbalanced: stage 1 has one slow peer (a straggler), stage 0 three.
  std::vector<SwarmPool> truth = {
      {0, 10, {{"a", 4, 100, 0, -1}, {"b", 4, 100, 0, -1}, {"c", 4, 100, 0, -1}}},
      {1, 10, {{"d", 1.5, 100, 0, -1}}},
      {2, 10, {{"e", 4, 100, 0, -1}, {"f", 4, 100, 0, -1}}}};
  SwarmRebalancer r({});
  std::vector<std::pair<int64_t, SwarmMove>> moves;
  for (int64_t k = 0; k < 100; ++k) {
    auto m = r.Check(measured(truth), k);
    ASSERT_TRUE(m.ok()) << m.status();
    if (!m->has_value()) continue;
    moves.emplace_back(k, **m);
    // Carry it out in the truth.
    SwarmPoolPeer moved;
    for (SwarmPool& p : truth) {
      for (size_t i = 0; i < p.peers.size(); ++i) {
        if (p.peers[i].id == (*m)->peer) {
          moved = p.peers[i];
          p.peers.erase(p.peers.begin() + static_cast<long>(i));
          break;
        }
      }
    }
    moved.moved_at_period = k;
    truth[(*m)->to].peers.push_back(moved);
  }
  ASSERT_EQ(moves.size(), 1u);
  EXPECT_EQ(moves[0].first, 1);  // it won checks 0 and 1
  EXPECT_EQ(moves[0].second.from, 0);
  EXPECT_EQ(moves[0].second.to, 1);
}

}  // namespace
}  // namespace shoal::scheduler
