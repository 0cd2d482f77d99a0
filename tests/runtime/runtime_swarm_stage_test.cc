// Swarm stages: a step driven hop by hop through pools of peers — micro-batches routed to random
// peers, backwards sent to peers that never saw the forward, gradients summed over each stage's
// peers and over the tied wte, one clip scale from every stage's sum of squares — must equal the
// step of one process with grad_accum = M. The reference is the full model (Gpt's
// ForwardBackward, pinned to PyTorch by the golden test) with its own AdamW, written here
// independently of the swarm path. Also: a recomputed backward is bit-identical to a cached one,
// a pass-through backward leaves the gradients alone, a replay that accumulates only at the stage
// that lost a micro-batch restores the exact step, and bad inputs are refused by name.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "parallel/adamw.h"
#include "parallel/demo.h"
#include "parallel/layout.h"
#include "runtime/config.h"
#include "runtime/gpt.h"
#include "runtime/swarm_stage.h"
#include "tests/runtime/swarm_reference.h"

namespace shoal::runtime {
namespace {

using namespace swarm_test;  // NOLINT: the shared model, data and reference

// A swarm: `peers` instances of each of the stages.
struct Swarm {
  std::vector<std::vector<std::unique_ptr<SwarmStage>>> pools;  // [stage][peer]

  explicit Swarm(int peers, int cache_slots = 2, Kernels kernels = Kernels::kFused) {
    auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
    EXPECT_TRUE(blocks.ok());
    pools.resize(kStages);
    for (int s = 0; s < kStages; ++s) {
      const auto [first, end] = parallel::StageRange(*blocks, s);
      for (int p = 0; p < peers; ++p) {
        SwarmStageOptions o;
        o.cache_slots = cache_slots;
        o.kernels = kernels;
        auto st = SwarmStage::Create(Model(), kSeed, s, kStages, first, end, Adam(), o);
        EXPECT_TRUE(st.ok()) << st.status();
        pools[s].push_back(std::move(*st));
      }
    }
  }

  SwarmStage& Peer(int s, int p) { return *pools[s][p]; }

  // One micro-batch driven as a trainer drives it: forward hops to `fwd[s]`, backward hops to
  // `bwd[s]`, accumulating at the stages in `accumulate_at`, backward down to the lowest of them.
  // Returns the loss.
  double Drive(int64_t step, int id, const std::vector<int>& fwd, const std::vector<int>& bwd,
               const std::vector<bool>& accumulate_at) {
    const Batch b = MicroBatchOf(step, id);
    const MicroBatchKey key{step, id};
    std::vector<at::Tensor> inputs(kStages);
    inputs[0] = b.tokens;
    for (int s = 0; s + 1 < kStages; ++s) {
      auto out = Peer(s, fwd[s]).Forward(key, inputs[s]);
      EXPECT_TRUE(out.ok()) << out.status();
      inputs[s + 1] = *out;
    }
    int lowest = kStages;
    for (int s = 0; s < kStages; ++s) {
      if (accumulate_at[s]) {
        lowest = s;
        break;
      }
    }
    const float scale = 1.0f / kMicro;
    SwarmStage& tail = Peer(kStages - 1, bwd[kStages - 1]);
    auto last = tail.ForwardBackward(key, inputs[kStages - 1], b.targets, scale,
                                     accumulate_at[kStages - 1]);
    EXPECT_TRUE(last.ok()) << last.status();
    // The ledger records every accumulation here; the peer then keeps it.
    if (accumulate_at[kStages - 1]) EXPECT_TRUE(tail.Settle(key, true).ok());
    at::Tensor g = last->grad_input;
    for (int s = kStages - 2; s >= lowest; --s) {
      auto gi = Peer(s, bwd[s]).Backward(key, inputs[s], g, scale, accumulate_at[s]);
      EXPECT_TRUE(gi.ok()) << gi.status();
      if (accumulate_at[s]) EXPECT_TRUE(Peer(s, bwd[s]).Settle(key, true).ok());
      g = *gi;
    }
    return last->loss;
  }

  // The step boundary: each stage's peers sum their gradients in peer order, the tied wte is
  // summed over the first and the last stage, one clip scale from the stages' sums of squares,
  // the same update everywhere.
  void Apply() {
    Reduce();
    Update();
  }
  void Reduce() {
    for (auto& pool : pools) {
      std::vector<at::Tensor> sum;
      for (const at::Tensor& g : pool[0]->Gradients()) sum.push_back(g.clone());
      for (size_t p = 1; p < pool.size(); ++p) {
        const auto grads = pool[p]->Gradients();
        for (size_t i = 0; i < sum.size(); ++i) sum[i].add_(grads[i]);
      }
      for (auto& peer : pool) {
        const auto grads = peer->Gradients();
        for (size_t i = 0; i < sum.size(); ++i) grads[i].copy_(sum[i]);
      }
    }
    const at::Tensor wte = pools[0][0]->TiedWteGradient().clone();
    const at::Tensor head = pools[kStages - 1][0]->TiedWteGradient().clone();
    ASSERT_TRUE(wte.defined() && head.defined());
    for (auto* pool : {&pools[0], &pools[kStages - 1]}) {
      for (auto& peer : *pool) peer->TiedWteGradient().copy_(wte + head);
    }
  }
  void Update() {
    double sq = 0;
    for (auto& pool : pools) sq += pool[0]->SumSquares();
    const double clip = parallel::ClipScale(std::sqrt(sq), kClip);
    for (auto& pool : pools) {
      for (auto& peer : pool) peer->Apply(kLr, clip);
    }
  }
};


// After the reduction, before the update: every stage's gradients are the single process's, up
// to the order of the fp32 sums (each peer adds its own micro-batches, then the peers add up).
void ExpectGradientsMatch(Swarm& swarm, Reference& ref, double tolerance) {
  std::map<std::string, at::Tensor> want;
  for (const auto& [name, t] : ref.model->NamedGradients()) want[name] = t;
  for (int s = 0; s < kStages; ++s) {
    for (const auto& [name, t] : swarm.Peer(s, 0).NamedGradients()) {
      ASSERT_TRUE(want.count(name)) << name;
      EXPECT_LT(RelMaxError(t, want[name]), tolerance) << "gradient, stage " << s << " " << name;
    }
  }
}

// Parameters after `steps` updates. AdamW divides each gradient element by its own running RMS,
// so an element whose gradient is a near-cancelling sum turns a last-bit difference in that sum
// into a visible fraction of one update (lr): the bound is in units of lr per step, 1 % of it.
void ExpectMatchesReference(Swarm& swarm, Reference& ref, int steps) {
  std::map<std::string, at::Tensor> want;
  for (const auto& [name, t] : ref.model->NamedParameters()) want[name] = t;
  for (int s = 0; s < kStages; ++s) {
    for (const auto& [name, t] : swarm.Peer(s, 0).NamedParameters()) {
      ASSERT_TRUE(want.count(name)) << name;
      EXPECT_LT(MaxAbsDiff(t, want[name]), 0.01 * kLr * steps) << "stage " << s << " " << name;
    }
  }
}

// `steps` steps of kMicro micro-batches, each routed by `route` (forward and backward peers per
// stage) and accumulated everywhere, against the reference: after each reduction the gradients
// (within 1e-5 at step 0, `later_tolerance` after), then the mean loss; `after_step`, if given,
// after each update.
void StepAgainstReference(Swarm& swarm, Reference& ref, int64_t steps, double later_tolerance,
                          const std::function<void(std::vector<int>&, std::vector<int>&)>& route,
                          const std::function<void(int64_t)>& after_step = nullptr) {
  for (int64_t step = 0; step < steps; ++step) {
    double loss = 0;
    for (int id = 0; id < kMicro; ++id) {
      std::vector<int> fwd(kStages), bwd(kStages);
      route(fwd, bwd);
      loss += swarm.Drive(step, id, fwd, bwd, std::vector<bool>(kStages, true));
    }
    swarm.Reduce();
    const double want = ref.Accumulate(step);
    ExpectGradientsMatch(swarm, ref, step == 0 ? 1e-5 : later_tolerance);
    swarm.Update();
    ref.Update();
    EXPECT_NEAR(loss / kMicro, want, 1e-5 * std::max(1.0, std::abs(want))) << "step " << step;
    if (after_step) after_step(step);
  }
}

// Closes step 0 of both sides and compares: the reduced gradients, the mean loss, the parameters.
void ExpectFirstStepMatches(Swarm& swarm, Reference& ref, double loss_sum) {
  swarm.Reduce();
  const double want = ref.Accumulate(0);
  ExpectGradientsMatch(swarm, ref, 1e-5);
  swarm.Update();
  ref.Update();
  EXPECT_NEAR(loss_sum / kMicro, want, 1e-5 * std::max(1.0, std::abs(want)));
  ExpectMatchesReference(swarm, ref, 1);
}

TEST(SwarmStageTest, RandomRoutesEqualOneProcessWithGradAccum) {
  Swarm swarm(/*peers=*/2);
  Reference ref;
  std::mt19937 rng(99);
  StepAgainstReference(
      swarm, ref, 4, /*later_tolerance=*/1e-4,
      [&](std::vector<int>& fwd, std::vector<int>& bwd) {
        for (int s = 0; s < kStages; ++s) {
          fwd[s] = static_cast<int>(rng() % 2);
          bwd[s] = static_cast<int>(rng() % 2);  // often not the forward's peer: a recompute
        }
      },
      [&](int64_t step) {
        for (int s = 0; s < kStages; ++s) {
          EXPECT_EQ(swarm.Peer(s, 0).ParamHash(), swarm.Peer(s, 1).ParamHash()) << "stage " << s;
          EXPECT_EQ(swarm.Peer(s, 0).optimizer_steps(), step + 1);
        }
      });
  int64_t recomputes = 0;
  for (int s = 0; s < kStages; ++s) {
    for (int p = 0; p < 2; ++p) recomputes += swarm.Peer(s, p).recomputes();
  }
  EXPECT_GT(recomputes, 0);  // the routes did send backwards to peers without the forward
  ExpectMatchesReference(swarm, ref, 4);
}

// Peers computing with ATen's calls (the job's train.kernels = "aten") against the one-process
// reference, which computes with the fused kernels: step 0's gradients as tight as the fused
// peers'; step 1's after an AdamW step, which turns last-bit differences of near-cancelling
// gradient elements into parameter differences (see ExpectMatchesReference), a little looser.
TEST(SwarmStageTest, AtenKernelsEqualOneProcessWithGradAccum) {
  Swarm swarm(/*peers=*/2, /*cache_slots=*/2, Kernels::kAten);
  Reference ref;
  int id = 0;
  StepAgainstReference(swarm, ref, 2, /*later_tolerance=*/1e-3,
                       [&](std::vector<int>& fwd, std::vector<int>& bwd) {
                         fwd.assign(kStages, id++ % 2);  // alternate between the two peers
                         bwd = fwd;
                       });
  ExpectMatchesReference(swarm, ref, 2);
}

TEST(SwarmStageTest, ReplayAccumulatingOnlyWhereLostRestoresTheStep) {
  // Stage 1 has two peers; peer 1 "dies" after accumulating micro-batches 1, 3, 5: its gradients
  // go with it, and those micro-batches are replayed through the survivors, accumulating at
  // stage 1 only (the other stages already hold them).
  Swarm swarm(/*peers=*/2);
  Reference ref;
  const int64_t step = 0;
  std::vector<int> lost;
  double loss = 0;
  for (int id = 0; id < kMicro; ++id) {
    const int p1 = id % 2;
    if (p1 == 1) lost.push_back(id);
    loss += swarm.Drive(step, id, {0, p1, 0}, {0, p1, 0}, {true, true, true});
  }
  for (const at::Tensor& g : swarm.Peer(1, 1).Gradients()) g.zero_();  // dropped with the peer
  for (int id : lost) swarm.Drive(step, id, {0, 0, 0}, {0, 0, 0}, {false, true, false});
  ExpectFirstStepMatches(swarm, ref, loss);
}

TEST(SwarmStageTest, RecomputedBackwardIsBitIdenticalToCached) {
  Swarm swarm(/*peers=*/2);
  const Batch b = MicroBatchOf(0, 0);
  const MicroBatchKey key{0, 0};
  auto h = swarm.Peer(0, 0).Forward(key, b.tokens);
  ASSERT_TRUE(h.ok()) << h.status();
  auto x = swarm.Peer(1, 0).Forward(key, *h);  // peer 0 of stage 1 caches the forward
  ASSERT_TRUE(x.ok()) << x.status();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor g = at::randn(x->sizes(), gen);
  auto cached = swarm.Peer(1, 0).Backward(key, *h, g, 0.25f, true);
  auto recomputed = swarm.Peer(1, 1).Backward(key, *h, g, 0.25f, true);
  ASSERT_TRUE(cached.ok() && recomputed.ok());
  ASSERT_TRUE(swarm.Peer(1, 0).Settle(key, true).ok());
  ASSERT_TRUE(swarm.Peer(1, 1).Settle(key, true).ok());
  EXPECT_EQ(swarm.Peer(1, 0).recomputes(), 0);
  EXPECT_EQ(swarm.Peer(1, 1).recomputes(), 1);
  EXPECT_TRUE(at::equal(*cached, *recomputed));
  const auto ga = swarm.Peer(1, 0).Gradients(), gb = swarm.Peer(1, 1).Gradients();
  for (size_t i = 0; i < ga.size(); ++i) EXPECT_TRUE(at::equal(ga[i], gb[i])) << i;
  EXPECT_GT(ga[0].abs().sum().item<double>(), 0);
}

TEST(SwarmStageTest, PassThroughBackwardLeavesGradientsAlone) {
  Swarm swarm(/*peers=*/1);
  const Batch b = MicroBatchOf(0, 1);
  const MicroBatchKey key{0, 1};
  auto h = swarm.Peer(0, 0).Forward(key, b.tokens);
  ASSERT_TRUE(h.ok());
  auto x = swarm.Peer(1, 0).Forward(key, *h);
  ASSERT_TRUE(x.ok());
  auto last = swarm.Peer(2, 0).ForwardBackward(key, *x, b.targets, 0.5f, /*accumulate=*/false);
  ASSERT_TRUE(last.ok()) << last.status();
  for (const at::Tensor& g : swarm.Peer(2, 0).Gradients()) {
    EXPECT_EQ(g.abs().sum().item<double>(), 0.0);
  }
  auto through = swarm.Peer(1, 0).Backward(key, *h, last->grad_input, 0.5f, false);
  ASSERT_TRUE(through.ok());
  EXPECT_FALSE(swarm.Peer(1, 0).pending());
  auto summed = swarm.Peer(1, 0).Backward(key, *h, last->grad_input, 0.5f, true);
  ASSERT_TRUE(summed.ok());
  EXPECT_TRUE(at::equal(*through, *summed));  // same gradient of the input either way
  // Pending: not in the accumulation until settled, and no other backward meanwhile.
  EXPECT_TRUE(swarm.Peer(1, 0).pending());
  EXPECT_EQ(swarm.Peer(1, 0).Gradients()[0].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(swarm.Peer(1, 0).Backward(key, *h, last->grad_input, 0.5f, true).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(swarm.Peer(1, 0).Settle(MicroBatchKey{0, 2}, true).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(swarm.Peer(1, 0).Settle(key, true).ok());
  EXPECT_GT(swarm.Peer(1, 0).Gradients()[0].abs().sum().item<double>(), 0);
}

TEST(SwarmStageTest, DroppedAccumulationLeavesNoTraceAndItsReplayRestoresTheStep) {
  // The ledger refused micro-batch 3's record at stage 1 (its trainer was declared dead and the
  // id re-leased): the peer drops it, and the replay that follows is the only one counted.
  Swarm swarm(/*peers=*/1);
  Reference ref;
  const int64_t step = 0;
  double loss = 0;
  for (int id = 0; id < kMicro; ++id) {
    if (id != 3) {
      loss += swarm.Drive(step, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
      continue;
    }
    const Batch b = MicroBatchOf(step, id);
    const MicroBatchKey key{step, id};
    auto h = swarm.Peer(0, 0).Forward(key, b.tokens);
    auto x = swarm.Peer(1, 0).Forward(key, *h);
    ASSERT_TRUE(h.ok() && x.ok());
    auto last = swarm.Peer(2, 0).ForwardBackward(key, *x, b.targets, 1.0f / kMicro, true);
    ASSERT_TRUE(last.ok());
    ASSERT_TRUE(swarm.Peer(2, 0).Settle(key, true).ok());
    loss += last->loss;
    ASSERT_TRUE(swarm.Peer(1, 0).Backward(key, *h, last->grad_input, 1.0f / kMicro, true).ok());
    ASSERT_TRUE(swarm.Peer(1, 0).Settle(key, false).ok());  // refused: dropped
  }
  swarm.Drive(step, 3, {0, 0, 0}, {0, 0, 0}, {true, true, false});  // replay: stages 0 and 1
  ExpectFirstStepMatches(swarm, ref, loss);
}

TEST(SwarmStageTest, ANewEpochDropsTheRolledBackWorkAndKeepsItsOwnPendingMicroBatch) {
  // Step 0 runs in epoch 0 (micro-batches 0-2 kept everywhere), then the swarm rolls back and
  // runs it again in epoch 1. Micro-batch 0 of epoch 1 is pending at each stage when the stage
  // enters the epoch (as a commit of the new epoch does, before the peer has acted on the
  // rollback): the old work goes, the pending one is kept, and the step equals one process's.
  Swarm swarm(/*peers=*/1);
  Reference ref;
  const int64_t step = 0;
  for (int id = 0; id < 3; ++id) swarm.Drive(step, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
  for (int s = 0; s < kStages; ++s) {
    ASSERT_EQ(swarm.Peer(s, 0).kept_micro_batches(), 3);
    EXPECT_EQ(swarm.Peer(s, 0).epoch(), 0);
  }
  const Batch b = MicroBatchOf(step, 0);
  const MicroBatchKey key{step, 0};
  auto h = swarm.Peer(0, 0).Forward(key, b.tokens);
  ASSERT_TRUE(h.ok());
  auto x = swarm.Peer(1, 0).Forward(key, *h);
  ASSERT_TRUE(x.ok());
  auto enter_and_keep = [&](int s) {
    EXPECT_TRUE(swarm.Peer(s, 0).pending());
    EXPECT_TRUE(swarm.Peer(s, 0).EnterEpoch(1)) << "stage " << s;
    EXPECT_FALSE(swarm.Peer(s, 0).EnterEpoch(1));  // once
    EXPECT_FALSE(swarm.Peer(s, 0).EnterEpoch(0));  // never back
    EXPECT_EQ(swarm.Peer(s, 0).epoch(), 1);
    EXPECT_EQ(swarm.Peer(s, 0).kept_micro_batches(), 0);
    ASSERT_TRUE(swarm.Peer(s, 0).Settle(key, true).ok());
    EXPECT_EQ(swarm.Peer(s, 0).kept_micro_batches(), 1);
  };
  auto last = swarm.Peer(2, 0).ForwardBackward(key, *x, b.targets, 1.0f / kMicro, true);
  ASSERT_TRUE(last.ok());
  enter_and_keep(2);
  double loss = last->loss;
  auto g1 = swarm.Peer(1, 0).Backward(key, *h, last->grad_input, 1.0f / kMicro, true);
  ASSERT_TRUE(g1.ok());
  enter_and_keep(1);
  ASSERT_TRUE(swarm.Peer(0, 0).Backward(key, b.tokens, *g1, 1.0f / kMicro, true).ok());
  enter_and_keep(0);
  for (int id = 1; id < kMicro; ++id) {
    loss += swarm.Drive(step, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
  }
  ExpectFirstStepMatches(swarm, ref, loss);
}

TEST(SwarmStageTest, RefusesBadInputsByName) {
  Swarm swarm(/*peers=*/1);
  const MicroBatchKey key{0, 0};
  const at::Tensor bad_ids = at::full({kB, kT}, Model().vocab_size, at::kLong);
  auto s = swarm.Peer(0, 0).Forward(key, bad_ids);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("vocabulary"), std::string::npos) << s.status();
  auto wrong_width = swarm.Peer(1, 0).Forward(key, at::zeros({kB, kT, 7}));
  ASSERT_FALSE(wrong_width.ok());
  EXPECT_NE(wrong_width.status().message().find("(B, T, 16)"), std::string::npos)
      << wrong_width.status();
  auto too_long = swarm.Peer(1, 0).Forward(key, at::zeros({kB, kT + 1, 16}));
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  auto as_double = swarm.Peer(1, 0).Forward(key, at::zeros({kB, kT, 16}, at::kDouble));
  EXPECT_EQ(as_double.status().code(), absl::StatusCode::kInvalidArgument);
  auto wrong_grad = swarm.Peer(1, 0).Backward(key, at::zeros({kB, kT, 16}),
                                               at::zeros({kB, kT - 1, 16}), 1.0f, true);
  ASSERT_FALSE(wrong_grad.ok());
  EXPECT_NE(wrong_grad.status().message().find("grad_output"), std::string::npos);
  auto last_forward = swarm.Peer(2, 0).Forward(key, at::zeros({kB, kT, 16}));
  EXPECT_EQ(last_forward.status().code(), absl::StatusCode::kFailedPrecondition);
  auto bad_targets = swarm.Peer(2, 0).ForwardBackward(key, at::zeros({kB, kT, 16}),
                                                      at::full({kB, kT}, -1, at::kLong), 1, true);
  ASSERT_FALSE(bad_targets.ok());
  EXPECT_NE(bad_targets.status().message().find("targets"), std::string::npos);
  for (const at::Tensor& g : swarm.Peer(2, 0).Gradients()) {
    EXPECT_EQ(g.abs().sum().item<double>(), 0.0);  // nothing ran
  }
  EXPECT_FALSE(SwarmStage::Create(Model(), kSeed, 3, 3, 0, 1, Adam()).ok());
  EXPECT_FALSE(SwarmStage::Create(Model(), kSeed, 1, 3, 2, 1, Adam()).ok());
}

TEST(SwarmStageTest, StateRoundTripGivesTheSameStage) {
  // A joiner loads a donor's parameters and moments and then computes bit-identically.
  Swarm donor(/*peers=*/1), joiner(/*peers=*/1);
  for (int id = 0; id < kMicro; ++id) donor.Drive(0, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
  donor.Apply();
  for (int s = 0; s < kStages; ++s) {
    std::vector<std::pair<std::string, at::Tensor>> params, moments;
    for (const auto& [n, t] : donor.Peer(s, 0).NamedParameters()) params.emplace_back(n, t.clone());
    for (const auto& [n, t] : donor.Peer(s, 0).OptimizerState()) moments.emplace_back(n, t.clone());
    ASSERT_TRUE(joiner.Peer(s, 0).LoadState(params, moments).ok());
    EXPECT_EQ(joiner.Peer(s, 0).ParamHash(), donor.Peer(s, 0).ParamHash());
    EXPECT_EQ(joiner.Peer(s, 0).optimizer_steps(), 1);
  }
  for (Swarm* sw : {&donor, &joiner}) {
    for (int id = 0; id < kMicro; ++id) sw->Drive(1, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
    sw->Apply();
  }
  for (int s = 0; s < kStages; ++s) {
    EXPECT_EQ(joiner.Peer(s, 0).ParamHash(), donor.Peer(s, 0).ParamHash()) << "stage " << s;
  }
  // A truncated snapshot is refused and changes nothing.
  const uint32_t before = joiner.Peer(1, 0).ParamHash();
  auto params = donor.Peer(1, 0).NamedParameters();
  params.pop_back();
  EXPECT_FALSE(joiner.Peer(1, 0).LoadState(params, donor.Peer(1, 0).OptimizerState()).ok());
  EXPECT_EQ(joiner.Peer(1, 0).ParamHash(), before);
}

// SumSquares and SumSquaresOf (a round's sums) against a count written out here: every named
// gradient's squares, in double, but the last stage's copy of wte (the first stage counts it);
// over a copy of the accumulation the same, over twice it four times that.
TEST(SwarmStageTest, SumSquaresCountsEveryElementOnce) {
  Swarm swarm(/*peers=*/1);
  for (int id = 0; id < 2; ++id) swarm.Drive(0, id, {0, 0, 0}, {0, 0, 0}, {true, true, true});
  for (int s = 0; s < kStages; ++s) {
    SwarmStage& st = swarm.Peer(s, 0);
    double want = 0;
    for (const auto& [name, g] : st.NamedGradients()) {
      if (name == "wte.weight" && s == kStages - 1) continue;
      want += g.to(at::kDouble).pow(2).sum().item<double>();
    }
    ASSERT_GT(want, 0) << "stage " << s;
    std::vector<at::Tensor> copy, twice;
    for (const at::Tensor& g : st.Gradients()) {
      copy.push_back(g.clone());
      twice.push_back(g * 2);
    }
    EXPECT_NEAR(st.SumSquares(), want, 1e-9 * want) << "stage " << s;
    EXPECT_NEAR(st.SumSquaresOf(copy), want, 1e-9 * want) << "stage " << s;
    EXPECT_NEAR(st.SumSquaresOf(twice), 4 * want, 4e-9 * want) << "stage " << s;
  }
}

// ---- DeMo stages ----

parallel::DemoOptions DemoOpts() {
  parallel::DemoOptions o;
  o.codec.chunk = 8;
  o.codec.topk = 4;
  o.codec.wire_dtype = at::kFloat;
  o.decay = 0.9;
  return o;
}

std::unique_ptr<SwarmStage> DemoStage(int stage, int stages) {
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, stages);
  EXPECT_TRUE(blocks.ok());
  const auto [first, end] = parallel::StageRange(*blocks, stage);
  SwarmStageOptions o;
  o.demo = DemoOpts();
  auto st = SwarmStage::Create(Model(), kSeed, stage, stages, first, end, Adam(), o);
  EXPECT_TRUE(st.ok()) << st.status();
  return st.ok() ? std::move(*st) : nullptr;
}

// One stage holding the whole model, two peers with uneven shares (3 and 1 of M = 4): each
// peer's DeMo step equals a DeMo replica (parallel::Demo over the full model, its gradient the
// mean over its own micro-batches by Gpt::ForwardBackward) scaled by P·n_i/M, as the swarm's
// rule says; both peers end bit-identical.
TEST(SwarmStageTest, DemoPeersMoveLikeDemoReplicasWithScaledShares) {
  constexpr int kM = 4;
  const std::vector<std::vector<int>> shares = {{0, 1, 2}, {3}};
  std::vector<std::unique_ptr<SwarmStage>> peers;
  for (int p = 0; p < 2; ++p) peers.push_back(DemoStage(0, 1));
  // The reference replicas.
  std::vector<std::unique_ptr<Gpt>> models;
  std::vector<std::unique_ptr<parallel::Demo>> demos;
  for (int p = 0; p < 2; ++p) {
    auto m = Gpt::CreateStage(Model(), kSeed, 0, Model().n_layer + 2);
    ASSERT_TRUE(m.ok()) << m.status();
    models.push_back(std::move(*m));
    Gpt& g = *models.back();
    auto d = parallel::Demo::Create({{&g.params(Gpt::kDecay), &g.grads(Gpt::kDecay), true},
                                     {&g.params(Gpt::kNoDecay), &g.grads(Gpt::kNoDecay), false}},
                                    DemoOpts());
    ASSERT_TRUE(d.ok()) << d.status();
    demos.push_back(std::move(*d));
  }
  for (int64_t step = 0; step < 3; ++step) {
    std::vector<at::Tensor> swarm_payloads, ref_payloads;
    for (int p = 0; p < 2; ++p) {
      for (int id : shares[p]) {
        const Batch b = MicroBatchOf(step, id);
        const MicroBatchKey key{step, id};
        auto fb = peers[p]->ForwardBackward(key, b.tokens, b.targets, 1.0f / kM, true);
        ASSERT_TRUE(fb.ok()) << fb.status();
        ASSERT_TRUE(peers[p]->Settle(key, true).ok());
        models[p]->ForwardBackward(b.tokens, b.targets,
                                   1.0f / static_cast<float>(shares[p].size()));
      }
      auto out = peers[p]->DemoCompress(kLr, 2, 0, kClip);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_FALSE(out->tied.defined());
      swarm_payloads.push_back(out->own);
      // Clipped by the norm of the scaled gradient, as a replica clips its own.
      const double scale = 2.0 * static_cast<double>(shares[p].size()) / kM;
      const double norm = scale * parallel::GlobalL2Norm({models[p]->grads(Gpt::kDecay).flat(),
                                                          models[p]->grads(Gpt::kNoDecay).flat()});
      ref_payloads.push_back(demos[p]->Compress(kLr, scale * parallel::ClipScale(norm, kClip)));
      models[p]->ZeroGrad();
    }
    for (int p = 0; p < 2; ++p) {
      ASSERT_TRUE(peers[p]->DemoApply(swarm_payloads, {}, kLr).ok());
      ASSERT_TRUE(demos[p]->Apply(ref_payloads, kLr).ok());
      EXPECT_EQ(peers[p]->optimizer_steps(), step + 1);
      EXPECT_EQ(peers[p]->kept_micro_batches(), 0);
    }
    EXPECT_EQ(peers[0]->ParamHash(), peers[1]->ParamHash()) << "step " << step;
    std::map<std::string, at::Tensor> want;
    for (const auto& [name, t] : models[0]->NamedParameters()) want[name] = t;
    for (const auto& [name, t] : peers[0]->NamedParameters()) {
      // sign(mean) flips only where the mean is ~0: allow a few elements to differ by 2·lr.
      // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by
      // every key), so its sign is rounding noise: it is left out.
      at::Tensor diff = (t - want[name]).abs();
      if (absl::EndsWith(name, "attn.qkv.bias")) {
        diff.narrow(0, Model().n_embd, Model().n_embd).zero_();
      }
      EXPECT_LE(diff.max().item<double>(), 2 * kLr + 1e-6) << name << ", step " << step;
      EXPECT_LE(diff.gt(1e-6).sum().item<int64_t>(), std::max<int64_t>(1, t.numel() / 100))
          << name << ", step " << step;
    }
  }
}

// Three stages, two peers each: the tied wte's optimizer runs over the first and the last
// stage's peers together, so both copies of wte stay bit-identical; a round run again (a peer
// fenced) starts from the residual the step began with, and a dropped step puts it back.
TEST(SwarmStageTest, DemoTiedWteStaysOneAndRoundsRunAgainFromTheSameResidual) {
  std::vector<std::vector<std::unique_ptr<SwarmStage>>> pools(kStages);
  for (int s = 0; s < kStages; ++s) {
    for (int p = 0; p < 2; ++p) pools[s].push_back(DemoStage(s, kStages));
  }
  auto wte_of = [](const SwarmStage& st) {
    for (const auto& [name, t] : st.NamedParameters()) {
      if (name == "wte.weight") return t.clone();
    }
    return at::Tensor();
  };
  for (int64_t step = 0; step < 2; ++step) {
    // Micro-batch id goes to peer id % 2 of every stage.
    for (int id = 0; id < kMicro; ++id) {
      const Batch b = MicroBatchOf(step, id);
      const MicroBatchKey key{step, id};
      const int p = id % 2;
      std::vector<at::Tensor> in(kStages);
      in[0] = b.tokens;
      for (int s = 0; s + 1 < kStages; ++s) {
        auto out = pools[s][p]->Forward(key, in[s]);
        ASSERT_TRUE(out.ok()) << out.status();
        in[s + 1] = *out;
      }
      auto last = pools[kStages - 1][p]->ForwardBackward(key, in[kStages - 1], b.targets,
                                                          1.0f / kMicro, true);
      ASSERT_TRUE(last.ok()) << last.status();
      ASSERT_TRUE(pools[kStages - 1][p]->Settle(key, true).ok());
      at::Tensor g = last->grad_input;
      for (int s = kStages - 2; s >= 0; --s) {
        auto gi = pools[s][p]->Backward(key, in[s], g, 1.0f / kMicro, true);
        ASSERT_TRUE(gi.ok()) << gi.status();
        ASSERT_TRUE(pools[s][p]->Settle(key, true).ok());
        g = *gi;
      }
    }
    std::vector<std::vector<at::Tensor>> own(kStages);
    std::vector<at::Tensor> tied_first, tied_last;
    for (int s = 0; s < kStages; ++s) {
      for (int p = 0; p < 2; ++p) {
        auto once = pools[s][p]->DemoCompress(kLr, 2, 4, kClip);
        ASSERT_TRUE(once.ok()) << once.status();
        // The round again: the same bytes, from the same residual.
        auto again = pools[s][p]->DemoCompress(kLr, 2, 4, kClip);
        ASSERT_TRUE(again.ok()) << again.status();
        EXPECT_TRUE(at::equal(once->own, again->own)) << "stage " << s;
        EXPECT_EQ(once->tied.defined(), s == 0 || s == kStages - 1);
        if (once->tied.defined()) EXPECT_TRUE(at::equal(once->tied, again->tied));
        own[s].push_back(again->own);
        if (s == 0) tied_first.push_back(again->tied);
        if (s == kStages - 1) tied_last.push_back(again->tied);
      }
    }
    std::vector<at::Tensor> tied = tied_first;
    tied.insert(tied.end(), tied_last.begin(), tied_last.end());
    for (int s = 0; s < kStages; ++s) {
      for (int p = 0; p < 2; ++p) {
        const bool has_tied = s == 0 || s == kStages - 1;
        ASSERT_TRUE(pools[s][p]->DemoApply(own[s], has_tied ? tied : std::vector<at::Tensor>{},
                                           kLr)
                        .ok());
      }
      EXPECT_EQ(pools[s][0]->ParamHash(), pools[s][1]->ParamHash()) << "stage " << s;
    }
    EXPECT_TRUE(at::equal(wte_of(*pools[0][0]), wte_of(*pools[kStages - 1][1])));
  }
  // A dropped step leaves the residual as it was: compressing afterwards gives what a first
  // compression would.
  SwarmStage& st = *pools[1][0];
  const Batch b = MicroBatchOf(9, 0);
  auto fwd = pools[0][0]->Forward({9, 0}, b.tokens);
  ASSERT_TRUE(fwd.ok());
  at::Tensor g = at::ones_like(*fwd);
  auto gi = st.Backward({9, 0}, *fwd, g, 1.0f, true);
  ASSERT_TRUE(gi.ok()) << gi.status();
  ASSERT_TRUE(st.Settle({9, 0}, true).ok());
  std::vector<at::Tensor> residual_before;
  for (const auto& [name, t] : st.OptimizerState()) residual_before.push_back(t.clone());
  ASSERT_TRUE(st.DemoCompress(kLr, 2, 0, 0).ok());
  st.DropStep();
  const auto after = st.OptimizerState();
  ASSERT_EQ(after.size(), residual_before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(at::equal(after[i].second, residual_before[i])) << after[i].first;
  }
  // An AdamW stage refuses DeMo's calls.
  auto adam = SwarmStage::Create(Model(), kSeed, 1, kStages, 1, 3, Adam());
  ASSERT_TRUE(adam.ok());
  EXPECT_EQ((*adam)->DemoCompress(kLr, 1, 0, 0).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A joiner's state: the parameters and step of a DeMo peer, its residual zero; a state with
// some residuals but not all is refused.
TEST(SwarmStageTest, DemoStateLoadsWithAZeroResidualOrAllOfIt) {
  auto donor = DemoStage(1, kStages);
  auto joiner = DemoStage(1, kStages);
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (const auto& [name, t] : donor->NamedParameters()) params.emplace_back(name, t + 0.5);
  ASSERT_TRUE(joiner->LoadState(params, {{"step", at::scalar_tensor(7, at::kLong)}}).ok());
  EXPECT_EQ(joiner->optimizer_steps(), 7);
  for (const auto& [name, t] : joiner->OptimizerState()) {
    if (name != "demo.step") EXPECT_EQ(t.abs().sum().item<double>(), 0.0) << name;
  }
  std::vector<std::pair<std::string, at::Tensor>> partial = donor->OptimizerState();
  ASSERT_GT(partial.size(), 2u);
  partial.pop_back();
  const uint32_t hash = joiner->ParamHash();
  const absl::Status bad = joiner->LoadState(donor->NamedParameters(), partial);
  EXPECT_EQ(bad.code(), absl::StatusCode::kDataLoss) << bad;
  EXPECT_EQ(joiner->ParamHash(), hash);
  EXPECT_EQ(joiner->optimizer_steps(), 7);
}

}  // namespace
}  // namespace shoal::runtime
