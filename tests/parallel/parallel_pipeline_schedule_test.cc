// Tests for parallel/pipeline_schedule.h. References are independent of the code under test:
// the closed-form makespan and bubble of GPipe / 1F1B with equal stage costs, the activation
// bounds from the schedules' definitions, action counts from first principles, a small 1F1B
// schedule written out by hand, and hand-broken schedules that must be caught.
#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace shoal::parallel {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

StageCosts UniformCosts(int model_stages, double forward, double backward, double latency = 0) {
  StageCosts c;
  c.forward.assign(model_stages, forward);
  c.backward.assign(model_stages, backward);
  c.p2p_latency = latency;
  return c;
}

// Counts each kind of action per (rank, chunk, micro-batch) straight from the lists.
std::map<std::tuple<int, int, int, ActionKind>, int> CountActions(const PipelineSchedule& s) {
  std::map<std::tuple<int, int, int, ActionKind>, int> counts;
  for (int rank = 0; rank < s.stages; ++rank) {
    for (const Action& a : s.per_rank[rank]) ++counts[{rank, a.chunk, a.micro_batch, a.kind}];
  }
  return counts;
}

// Checks a schedule built by MakeSchedule from first principles: each compute action once, the
// right number of transfers, the closing actions, then Validate and a deadlock-free Simulate.
void CheckStructure(const PipelineSchedule& s) {
  const int p = s.stages, m = s.micro_batches, v = s.virtual_stages;
  ASSERT_EQ(static_cast<int>(s.per_rank.size()), p);
  const auto counts = CountActions(s);
  int sends = 0, recvs = 0;
  for (int rank = 0; rank < p; ++rank) {
    const auto& actions = s.per_rank[rank];
    ASSERT_GE(actions.size(), 2u);
    EXPECT_EQ(actions.back().kind, ActionKind::kOptimizerStep);
    EXPECT_EQ(actions[actions.size() - 2].kind, ActionKind::kReduceGrads);
    for (int chunk = 0; chunk < v; ++chunk) {
      for (int mb = 0; mb < m; ++mb) {
        for (ActionKind k : {ActionKind::kForward, ActionKind::kBackward}) {
          auto it = counts.find({rank, chunk, mb, k});
          EXPECT_TRUE(it != counts.end() && it->second == 1)
              << ToString(k) << " rank " << rank << " chunk " << chunk << " mb " << mb;
        }
      }
    }
    for (const Action& a : actions) {
      if (a.kind == ActionKind::kSendActivation || a.kind == ActionKind::kSendGrad) ++sends;
      if (a.kind == ActionKind::kRecvActivation || a.kind == ActionKind::kRecvGrad) ++recvs;
    }
  }
  // p v model stages have p v - 1 boundaries, each crossed by every micro-batch once forward
  // (activation) and once backward (gradient).
  EXPECT_EQ(sends, 2 * m * (p * v - 1));
  EXPECT_EQ(recvs, sends);
  EXPECT_TRUE(Validate(s).ok()) << Validate(s) << "\n" << ToString(s);
}

TEST(PipelineSchedule, GPipeAnd1F1BMatchTheoryForEveryShape) {
  for (int p = 1; p <= 8; ++p) {
    for (int m = 1; m <= 16; ++m) {
      for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
        SCOPED_TRACE(ToString(kind) + " p=" + std::to_string(p) + " m=" + std::to_string(m));
        auto s = MakeSchedule(kind, p, m);
        ASSERT_TRUE(s.ok()) << s.status();
        EXPECT_EQ(s->kind, kind);
        EXPECT_EQ(s->virtual_stages, 1);
        CheckStructure(*s);

        // Forward 1, backward 2, no latency: the last micro-batch's forward reaches the last
        // stage after m + p - 1 forward slots and its gradient returns to stage 0 after
        // m + p - 1 backward slots, so the makespan is 3 (m + p - 1) and every stage is busy
        // 3 m of it. All values are small integers, exact in double.
        auto sim = Simulate(*s, UniformCosts(p, 1, 2));
        ASSERT_TRUE(sim.ok()) << sim.status() << "\n" << ToString(*s);
        EXPECT_EQ(sim->makespan, 3.0 * (m + p - 1));
        for (int rank = 0; rank < p; ++rank) EXPECT_EQ(sim->busy[rank], 3.0 * m);
        const double theory = static_cast<double>(p - 1) / (m + p - 1);
        EXPECT_DOUBLE_EQ(sim->bubble_fraction, theory);
        EXPECT_DOUBLE_EQ(BubbleFraction1F1B(p, m), theory);

        for (int rank = 0; rank < p; ++rank) {
          // GPipe holds everything; 1F1B's warm-up of p - rank - 1 plus the one in flight.
          const int bound = kind == ScheduleKind::kGPipe ? m : std::min(p - rank, m);
          EXPECT_EQ(sim->peak_in_flight[rank], bound) << "rank " << rank;
          EXPECT_EQ(PeakInFlightBound(kind, p, m, rank), bound);
        }
      }
    }
  }
}

TEST(PipelineSchedule, InterleavedMatchesMegatronTheory) {
  for (int p = 2; p <= 8; ++p) {
    for (int v = 2; v <= 4; ++v) {
      for (int m = p; m <= 16; m += p) {
        SCOPED_TRACE("p=" + std::to_string(p) + " v=" + std::to_string(v) +
                     " m=" + std::to_string(m));
        auto s = MakeSchedule(ScheduleKind::kInterleaved1F1B, p, m, v);
        ASSERT_TRUE(s.ok()) << s.status();
        CheckStructure(*s);

        // Each chunk holds 1/v of a rank's layers: forward 1, backward 2 per chunk.
        auto sim = Simulate(*s, UniformCosts(p * v, 1, 2));
        ASSERT_TRUE(sim.ok()) << sim.status() << "\n" << ToString(*s);
        for (int rank = 0; rank < p; ++rank) EXPECT_EQ(sim->busy[rank], 3.0 * m * v);
        // Megatron's analysis: the bubble is p - 1 chunk slots instead of p - 1 stage slots,
        // so the step takes 3 (v m + p - 1) and the bubble is (p - 1) / (v m + p - 1).
        EXPECT_EQ(sim->makespan, 3.0 * (m * v + p - 1));
        EXPECT_DOUBLE_EQ(sim->bubble_fraction, static_cast<double>(p - 1) / (v * m + p - 1));
        EXPECT_LT(sim->bubble_fraction, BubbleFraction1F1B(p, m));
        for (int rank = 0; rank < p; ++rank) {
          // Warm-up of 2 (p - rank - 1) + (v - 1) p chunk-forwards plus the one in flight.
          const int bound = std::min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v);
          EXPECT_EQ(sim->peak_in_flight[rank], bound) << "rank " << rank;
          EXPECT_EQ(PeakInFlightBound(ScheduleKind::kInterleaved1F1B, p, m, rank, v), bound);
        }
      }
    }
  }
}

TEST(PipelineSchedule, Small1F1BScheduleWrittenOutByHand) {
  // p = 2, m = 3. Rank 0 warms up with one forward; rank 1 (the last) alternates at once.
  auto s = MakeSchedule(ScheduleKind::k1F1B, 2, 3);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(ToString(*s),
            "1F1B: stages 2, micro_batches 3, virtual_stages 1\n"
            "rank 0: F0 SA0>1 F1 SA1>1 RG0<1 B0 F2 SA2>1 RG1<1 B1 RG2<1 B2 Reduce Step\n"
            "rank 1: RA0<0 F0 B0 SG0>0 RA1<0 F1 B1 SG1>0 RA2<0 F2 B2 SG2>0 Reduce Step\n");
  // The executor's view of one transfer.
  const Action& send = s->per_rank[0][1];
  EXPECT_EQ(send, (Action{ActionKind::kSendActivation, 0, 0, 1}));
  EXPECT_EQ(PeerChunk(*s, 0, send), 0);
}

TEST(PipelineSchedule, InterleavedChunksWrapAroundRanks) {
  // p = 2, v = 2: model stages 0 1 2 3 on ranks 0 1 0 1. Rank 1 chunk 0 (model stage 1) sends
  // to rank 0 chunk 1 (model stage 2); rank 1 chunk 1 is the last stage and sends nothing on.
  auto s = MakeSchedule(ScheduleKind::kInterleaved1F1B, 2, 2, 2);
  ASSERT_TRUE(s.ok()) << s.status();
  bool saw_wrap = false;
  for (const Action& a : s->per_rank[1]) {
    if (a.kind == ActionKind::kSendActivation) {
      EXPECT_EQ(a.chunk, 0) << ToString(*s);
      EXPECT_EQ(a.peer, 0);
      EXPECT_EQ(PeerChunk(*s, 1, a), 1);
      saw_wrap = true;
    }
  }
  EXPECT_TRUE(saw_wrap) << ToString(*s);
  EXPECT_EQ(ModelStage(*s, 0, 1), 2);
  // Rank 0's first forward is micro-batch 0 on chunk 0 (it reads the data), without a recv.
  EXPECT_EQ(s->per_rank[0][0], (Action{ActionKind::kForward, 0, 0, -1}));

  // The compute order, from Megatron's rule by hand: rank 0 warms up with
  // min(2 (p - 1) + (v - 1) p, m v) = 4 forwards (all of them), rank 1 with 2; forwards take
  // micro-batches 0, 1 through chunk 0 then chunk 1, backwards the chunks in reverse.
  auto compute_order = [&](int rank) {
    std::string out;
    for (const Action& a : s->per_rank[rank]) {
      if (a.kind == ActionKind::kForward || a.kind == ActionKind::kBackward) {
        out += (out.empty() ? "" : " ") + ToString(a);
      }
    }
    return out;
  };
  EXPECT_EQ(compute_order(0), "F0 F1 F0.c1 F1.c1 B0.c1 B1.c1 B0 B1");
  EXPECT_EQ(compute_order(1), "F0 F1 F0.c1 B0.c1 F1.c1 B1.c1 B0 B1");
}

TEST(PipelineSchedule, GPipeLatencyAndUnequalStages) {
  // Each of the p - 1 boundaries is crossed once on the critical path forward and once back.
  const int p = 4, m = 5;
  auto s = MakeSchedule(ScheduleKind::kGPipe, p, m);
  ASSERT_TRUE(s.ok()) << s.status();
  auto sim = Simulate(*s, UniformCosts(p, 1, 2, 0.5));
  ASSERT_TRUE(sim.ok()) << sim.status();
  EXPECT_DOUBLE_EQ(sim->makespan, 3.0 * (m + p - 1) + 2 * (p - 1) * 0.5);

  // Unequal stages: busy time is exactly the stage's own work. Stage j cannot start before
  // micro-batch 0 went forward through the stages below it, and the gradient of its last
  // backward must still go back through them, so the step is at least that plus its own work;
  // it is at most all the work done one piece at a time.
  StageCosts c;
  c.forward = {1, 3, 1, 2};
  c.backward = {2, 5, 2, 4};
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    auto t = MakeSchedule(kind, p, m);
    ASSERT_TRUE(t.ok()) << t.status();
    auto r = Simulate(*t, c);
    ASSERT_TRUE(r.ok()) << r.status();
    double below = 0, serial = 0;
    for (int j = 0; j < p; ++j) {
      const double own = m * (c.forward[j] + c.backward[j]);
      EXPECT_DOUBLE_EQ(r->busy[j], own);
      EXPECT_GE(r->makespan, below + own) << "stage " << j;
      below += c.forward[j] + c.backward[j];
      serial += own;
    }
    EXPECT_LE(r->makespan, serial);
  }
}

// --- Broken schedules -----------------------------------------------------------------------

PipelineSchedule Valid1F1B(int p, int m) {
  auto s = MakeSchedule(ScheduleKind::k1F1B, p, m);
  EXPECT_TRUE(s.ok()) << s.status();
  return *s;
}

void Erase(std::vector<Action>& actions, const Action& a) {
  auto it = std::find(actions.begin(), actions.end(), a);
  ASSERT_NE(it, actions.end()) << ToString(a);
  actions.erase(it);
}

TEST(PipelineSchedule, RecvWithoutSendIsCaught) {
  PipelineSchedule s = Valid1F1B(2, 2);
  Erase(s.per_rank[0], {ActionKind::kSendActivation, 1, 0, 1});
  const absl::Status v = Validate(s);
  EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.message(), AllOf(HasSubstr("rank 1"), HasSubstr("RA1<0"),
                                 HasSubstr("recv without a matching send")));
  // The simulator, which does not validate, sees rank 1 wait forever.
  auto sim = Simulate(s, UniformCosts(2, 1, 2));
  EXPECT_EQ(sim.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(sim.status().message(),
              AllOf(HasSubstr("deadlock"), HasSubstr("rank 1"), HasSubstr("RA1<0")));
}

TEST(PipelineSchedule, SendWithoutRecvIsCaught) {
  PipelineSchedule s = Valid1F1B(3, 2);
  Erase(s.per_rank[1], {ActionKind::kRecvGrad, 0, 0, 2});
  const absl::Status v = Validate(s);
  EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.message(), AllOf(HasSubstr("rank 2"), HasSubstr("SG0>1"),
                                 HasSubstr("send without a matching recv")));
}

TEST(PipelineSchedule, BackwardBeforeForwardIsCaught) {
  PipelineSchedule s = Valid1F1B(1, 2);
  // Single stage: F0 B0 F1 B1 Reduce Step. Swap F1 and B1.
  ASSERT_EQ(s.per_rank[0][2], (Action{ActionKind::kForward, 1, 0, -1}));
  std::swap(s.per_rank[0][2], s.per_rank[0][3]);
  const absl::Status v = Validate(s);
  EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(v.message(),
              AllOf(HasSubstr("rank 0"), HasSubstr("micro-batch 1"), HasSubstr("Backward")));
}

TEST(PipelineSchedule, MissingOrMisplacedPiecesAreCaught) {
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    Erase(s.per_rank[1], {ActionKind::kBackward, 0, 0, -1});
    EXPECT_THAT(Validate(s).message(), AllOf(HasSubstr("rank 1"), HasSubstr("no Backward")));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    s.per_rank[0].push_back({ActionKind::kForward, 0, 0, -1});
    EXPECT_THAT(Validate(s).message(), HasSubstr("repeats"));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    // Move ReduceGrads to the front of rank 0.
    auto& a = s.per_rank[0];
    std::rotate(a.begin(), a.end() - 2, a.end() - 1);
    EXPECT_THAT(Validate(s).message(), AllOf(HasSubstr("rank 0"), HasSubstr("ReduceGrads")));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    std::swap(s.per_rank[1].back(), s.per_rank[1][s.per_rank[1].size() - 2]);
    EXPECT_THAT(Validate(s).message(), AllOf(HasSubstr("rank 1"), HasSubstr("OptimizerStep")));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    s.per_rank[0][1].peer = 0;  // SA0 addressed to itself
    EXPECT_THAT(Validate(s).message(), AllOf(HasSubstr("peer 0"), HasSubstr("rank 1")));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    s.per_rank[0].insert(s.per_rank[0].begin(), {ActionKind::kRecvActivation, 0, 0, 1});
    EXPECT_THAT(Validate(s).message(), HasSubstr("no neighbour"));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    s.per_rank[1][1].micro_batch = 7;
    EXPECT_THAT(Validate(s).message(), HasSubstr("micro_batch 7"));
  }
  {
    PipelineSchedule s = Valid1F1B(2, 2);
    s.per_rank.pop_back();
    EXPECT_THAT(Validate(s).message(), HasSubstr("per_rank"));
  }
}

TEST(PipelineSchedule, RanksWaitingOnEachOtherDeadlock) {
  // Every transfer has its pair and every order rule holds, but rank 0 waits for the gradient
  // of micro-batch 0 before sending micro-batch 1's activation, while rank 1 wants micro-batch
  // 1's activation before it runs micro-batch 0's backward.
  PipelineSchedule s;
  s.kind = ScheduleKind::k1F1B;
  s.stages = 2;
  s.micro_batches = 2;
  using K = ActionKind;
  s.per_rank = {
      {{K::kForward, 0, 0, -1},
       {K::kSendActivation, 0, 0, 1},
       {K::kForward, 1, 0, -1},
       {K::kRecvGrad, 0, 0, 1},
       {K::kSendActivation, 1, 0, 1},
       {K::kBackward, 0, 0, -1},
       {K::kRecvGrad, 1, 0, 1},
       {K::kBackward, 1, 0, -1},
       {K::kReduceGrads, -1, 0, -1},
       {K::kOptimizerStep, -1, 0, -1}},
      {{K::kRecvActivation, 0, 0, 0},
       {K::kForward, 0, 0, -1},
       {K::kRecvActivation, 1, 0, 0},
       {K::kForward, 1, 0, -1},
       {K::kBackward, 0, 0, -1},
       {K::kSendGrad, 0, 0, 0},
       {K::kBackward, 1, 0, -1},
       {K::kSendGrad, 1, 0, 0},
       {K::kReduceGrads, -1, 0, -1},
       {K::kOptimizerStep, -1, 0, -1}},
  };
  ASSERT_TRUE(Validate(s).ok()) << Validate(s);
  auto sim = Simulate(s, UniformCosts(2, 1, 2));
  EXPECT_EQ(sim.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(sim.status().message(),
              AllOf(HasSubstr("deadlock"), HasSubstr("rank 0 action 3 (RG0<1)"),
                    HasSubstr("rank 1 action 2 (RA1<0)")));
}

// --- Bad arguments --------------------------------------------------------------------------

TEST(PipelineSchedule, BadArgumentsAreNamed) {
  struct Case {
    ScheduleKind kind;
    int p, m, v;
    const char* names;
  };
  const Case cases[] = {
      {ScheduleKind::k1F1B, 0, 4, 1, "stages"},
      {ScheduleKind::kGPipe, -3, 4, 1, "stages"},
      {ScheduleKind::k1F1B, 4, 0, 1, "micro_batches"},
      {ScheduleKind::kGPipe, 2, 2, 2, "virtual_stages"},
      {ScheduleKind::kInterleaved1F1B, 4, 6, 2, "multiple of stages"},
      {ScheduleKind::kInterleaved1F1B, 4, 8, 1, "virtual_stages"},
      {ScheduleKind::kInterleaved1F1B, 1, 4, 2, "stages"},
      {ScheduleKind::k1F1B, 1 << 12, 1 << 12, 1, "too large"},
  };
  for (const Case& c : cases) {
    auto s = MakeSchedule(c.kind, c.p, c.m, c.v);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.names;
    EXPECT_THAT(s.status().message(), HasSubstr(c.names));
  }
  EXPECT_EQ(MakeSchedule(static_cast<ScheduleKind>(9), 2, 2).status().code(),
            absl::StatusCode::kInvalidArgument);

  PipelineSchedule s = Valid1F1B(2, 2);
  EXPECT_THAT(Simulate(s, UniformCosts(3, 1, 2)).status().message(), HasSubstr("costs.forward"));
  StageCosts neg = UniformCosts(2, 1, 2);
  neg.backward[1] = -1;
  EXPECT_THAT(Simulate(s, neg).status().message(), HasSubstr("costs.backward[1]"));
  EXPECT_THAT(Simulate(s, UniformCosts(2, 1, 2, -0.1)).status().message(),
              HasSubstr("p2p_latency"));
}

}  // namespace
}  // namespace shoal::parallel
