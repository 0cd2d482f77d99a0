// PipelineExecutor over real Gloo between real processes on 127.0.0.1 (rank_launcher.h), on a
// synthetic stage with a closed form.
//
// Stage s holds a weight vector w_s of F = 8 values and exchanges activations of shape (2, 4):
//   forward   y = w_s * x                (elementwise; stage 0's x is x_m, known per micro-batch)
//   backward  dx = w_s * dy, dw_s += x * dy
//   loss      sum(y * t_m) on the last stage, so its dy = t_m.
// Hence stage s receives x = (prod_{j<s} w_j) * x_m, the gradient (prod_{j>s} w_j) * t_m, and
// after one step dw_s = sum_m (prod_{j != s} w_j) * x_m * t_m. Each rank computes these in double
// from the formulas (not from the executor) and checks every received tensor and the gradients
// of every step; a tag mix-up, a lost or duplicated transfer, or a wrong slot shows up there.
#include "parallel/pipeline_executor.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <ostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/pipeline_bench.h"
#include "tests/comm/rank_launcher.h"
#include "tests/test_util.h"

namespace shoal::parallel {
namespace {

using ::shoal::testing::EnvInt;
using ::shoal::testing::EnvString;

constexpr int kF = 8;
const std::vector<int64_t> kShape = {2, 4};

constexpr char kKindEnv[] = "SHOAL_PIPE_TEST_KIND";  // "1f1b" or "gpipe"
constexpr char kStagesEnv[] = "SHOAL_PIPE_TEST_STAGES";
constexpr char kMicroEnv[] = "SHOAL_PIPE_TEST_M";
constexpr char kPortEnv[] = "SHOAL_PIPE_TEST_PORT";
// "die": rank 1 exits (status 0, no goodbye) inside the forward of micro-batch 1 of the second
// step, a peer that dies mid-step; "stall": it sleeps there for 5 s, a peer alive but silent
// for longer than the transfer timeout (3 s).
constexpr char kFaultEnv[] = "SHOAL_PIPE_TEST_FAULT";

double W(int stage, int i) { return 0.6 + 0.1 * stage + 0.05 * i; }
double X(int m, int i) { return 1.0 + m + i / 10.0; }
double T(int m, int i) { return 0.5 + 0.25 * m - 0.1 * i; }

// The closed forms, in double.
double ProdW(int from, int to, int skip, int i) {  // prod of w_j[i], from <= j < to, j != skip
  double p = 1;
  for (int j = from; j < to; ++j) {
    if (j != skip) p *= W(j, i);
  }
  return p;
}
double ExpectedInput(int stage, int m, int i) { return ProdW(0, stage, -1, i) * X(m, i); }
double ExpectedGrad(int stage, int stages, int m, int i) {  // of stage's output
  return ProdW(stage + 1, stages, -1, i) * T(m, i);
}
double ExpectedDw(int stage, int stages, int micro_batches, int i) {
  double s = 0;
  for (int m = 0; m < micro_batches; ++m) s += ProdW(0, stages, stage, i) * X(m, i) * T(m, i);
  return s;
}

at::Tensor Filled(double (*f)(int, int), int a) {
  at::Tensor t = at::empty(kShape, at::kFloat);
  float* p = t.data_ptr<float>();
  for (int i = 0; i < kF; ++i) p[i] = static_cast<float>(f(a, i));
  return t;
}

bool Near(double got, double want) { return std::abs(got - want) <= 1e-5 * (1 + std::abs(want)); }

// The synthetic stage. Records every disagreement with the closed form in `errors_`.
class ClosedFormStage final : public StageCompute {
 public:
  ClosedFormStage(int stage, int stages) : stage_(stage), stages_(stages) {
    w_ = at::empty(kShape, at::kFloat);
    for (int i = 0; i < kF; ++i) w_.data_ptr<float>()[i] = static_cast<float>(W(stage, i));
    dw_ = at::zeros(kShape, at::kFloat);
    y_ = at::zeros(kShape, at::kFloat);
    dx_ = at::zeros(kShape, at::kFloat);
  }

  at::Tensor Forward(int micro_batch, int slot, const at::Tensor& input) override {
    if (fault_at_forward_ == micro_batch && step_ == 1) {
      std::printf("rank %d: %s inside forward of micro-batch %d\n", stage_,
                  stall_ ? "stalling" : "exiting", micro_batch);
      std::fflush(stdout);
      if (!stall_) std::_Exit(0);
      std::this_thread::sleep_for(std::chrono::seconds(5));
    }
    at::Tensor x;
    if (stage_ == 0) {
      Expect(!input.defined(), "first stage got an input");
      x = Filled(X, micro_batch);
    } else {
      if (!CheckTensor(input, "forward input", micro_batch)) return at::zeros(kShape);
      for (int i = 0; i < kF; ++i) {
        Expect(Near(input.data_ptr<float>()[i], ExpectedInput(stage_, micro_batch, i)),
               absl::StrCat("forward input of micro-batch ", micro_batch, " element ", i, " is ",
                            input.data_ptr<float>()[i], ", want ",
                            ExpectedInput(stage_, micro_batch, i)));
      }
      x = input.clone();
    }
    if (slot >= static_cast<int>(slots_.size())) slots_.resize(slot + 1);
    // A forward-only pass reuses slot 0 without backwards; a training step never reuses a slot
    // before its backward.
    Expect(eval_ || slots_[slot].micro_batch < 0,
           absl::StrCat("slot ", slot, " given to micro-batch ", micro_batch, " still holds ",
                        slots_[slot].micro_batch));
    if (!eval_) slots_[slot] = {micro_batch, x};
    max_slot_ = std::max(max_slot_, slot);
    // Into the same buffer every time, as the model does (the executor must copy what it sends).
    at::mul_out(y_, w_, x);
    if (stage_ == stages_ - 1) {
      outputs_[micro_batch] = y_.clone();
      return at::Tensor();
    }
    return y_;
  }

  at::Tensor Backward(int micro_batch, int slot, const at::Tensor& grad_output) override {
    if (slot < 0 || slot >= static_cast<int>(slots_.size()) ||
        slots_[slot].micro_batch != micro_batch) {
      Expect(false, absl::StrCat("backward of micro-batch ", micro_batch, " in slot ", slot,
                                 " which does not hold it"));
      return stage_ == 0 ? at::Tensor() : at::zeros(kShape);
    }
    at::Tensor dy;
    if (stage_ == stages_ - 1) {
      Expect(!grad_output.defined(), "last stage got a gradient");
      dy = Filled(T, micro_batch);
    } else {
      if (!CheckTensor(grad_output, "grad output", micro_batch)) return at::zeros(kShape);
      for (int i = 0; i < kF; ++i) {
        const double want = ExpectedGrad(stage_, stages_, micro_batch, i);
        Expect(Near(grad_output.data_ptr<float>()[i], want),
               absl::StrCat("grad output of micro-batch ", micro_batch, " element ", i, " is ",
                            grad_output.data_ptr<float>()[i], ", want ", want));
      }
      dy = grad_output;
    }
    dw_ += slots_[slot].x * dy;
    slots_[slot].micro_batch = -1;
    if (stage_ == 0) return at::Tensor();
    at::mul_out(dx_, w_, dy);
    return dx_;
  }

  std::vector<int64_t> ActivationShape() const override { return kShape; }

  void Expect(bool ok, const std::string& what) {
    if (!ok && errors_.size() < 20) errors_.push_back(what);
  }
  bool CheckTensor(const at::Tensor& t, const char* what, int micro_batch) {
    const bool ok = t.defined() && t.scalar_type() == at::kFloat && t.sizes().equals(kShape);
    Expect(ok, absl::StrCat(what, " of micro-batch ", micro_batch, " missing or misshapen"));
    return ok;
  }

  struct Slot {
    int micro_batch = -1;
    at::Tensor x;
  };
  const int stage_, stages_;
  at::Tensor w_, dw_, y_, dx_;
  std::vector<Slot> slots_;
  int max_slot_ = -1;
  std::map<int, at::Tensor> outputs_;  // last stage: y per micro-batch
  std::vector<std::string> errors_;
  int step_ = 0;
  int fault_at_forward_ = -1;
  bool stall_ = false;
  bool eval_ = false;  // inside RunForward
};

ScheduleKind KindFromName(const std::string& name) {
  return name == "gpipe" ? ScheduleKind::kGPipe : ScheduleKind::k1F1B;
}

// ---- Inside a rank process. ----

int RunRank() {
  ::alarm(60);  // a rank never outlives its test by much, whatever happens
  const int rank = EnvInt(::shoal::testing::kRankEnv, -1);
  const int stages = EnvInt(kStagesEnv, -1);
  const int m = EnvInt(kMicroEnv, -1);
  const ScheduleKind kind = KindFromName(EnvString(kKindEnv));
  const std::string fault = EnvString(kFaultEnv);
  if (rank < 0 || stages < 1 || m < 1) {
    std::printf("rank process: bad environment\n");
    return 2;
  }
  comm::TcpStoreOptions so;
  so.port = EnvInt(kPortEnv, 0);
  so.world_size = stages;
  so.timeout = absl::Seconds(30);
  auto store = comm::MakeTcpStore(so);
  if (!store.ok()) {
    std::printf("rank %d: store: %s\n", rank, store.status().ToString().c_str());
    return 1;
  }
  comm::BackendOptions bo;
  bo.kind = "gloo";
  bo.rank = rank;
  bo.world_size = stages;
  bo.store = comm::MakePrefixStore("pipeline", *store);
  bo.timeout = absl::Seconds(30);
  bo.gloo_hostname = "127.0.0.1";
  auto backend = comm::CreateBackend(bo);
  if (!backend.ok()) {
    std::printf("rank %d: CreateBackend: %s\n", rank, backend.status().ToString().c_str());
    return 1;
  }
  auto schedule = MakeSchedule(kind, stages, m);
  if (!schedule.ok()) {
    std::printf("rank %d: MakeSchedule: %s\n", rank, schedule.status().ToString().c_str());
    return 1;
  }
  ClosedFormStage stage(rank, stages);
  if (!fault.empty() && rank == 1) {
    stage.fault_at_forward_ = 1;
    stage.stall_ = fault == "stall";
  }
  PipelineExecutorOptions eo;
  // Short, so that a dead peer that somehow went unnoticed still ends the test quickly.
  eo.transfer.timeout = absl::Seconds(3);
  auto executor = PipelineExecutor::Create(backend->get(), *schedule, &stage, eo);
  if (!executor.ok()) {
    std::printf("rank %d: Create: %s\n", rank, executor.status().ToString().c_str());
    return 1;
  }
  PipelineExecutor& ex = **executor;
  int reduce_calls = 0;
  auto reduce = [&]() {
    ++reduce_calls;
    return absl::OkStatus();
  };

  if (!fault.empty()) {
    // The survivors must come back with the transport's status naming the action and rank 1:
    // kUnavailable for a closed connection, kDeadlineExceeded for a silent peer.
    for (int step = 0; step < 2; ++step) {
      stage.step_ = step;
      const absl::Status s = ex.RunStep(reduce);
      std::printf("rank %d: step %d: %s\n", rank, step, s.ToString().c_str());
      std::fflush(stdout);
      if (step == 0 && !s.ok()) return 1;
      if (step == 1 && rank == 1) return s.ok() ? 1 : 0;  // the stalled rank finds the others gone
      if (step == 1) {
        const bool code = fault == "stall" ? absl::IsDeadlineExceeded(s)
                                           : absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
        const bool ok = code && absl::StrContains(s.message(), "pipeline rank 1") &&
                        absl::StrContains(s.message(), "micro-batch");
        return ok ? 0 : 1;
      }
    }
    return 1;
  }

  const int bound = PeakInFlightBound(kind, stages, m, rank);
  // Steps in a row reuse the same tags; a forward-only pass with a different count of
  // micro-batches goes between them.
  const int eval_m = m + 2;
  for (int round = 0; round < 4; ++round) {
    if (round == 2) {
      stage.outputs_.clear();
      stage.eval_ = true;
      const absl::Status s = ex.RunForward(eval_m);
      stage.eval_ = false;
      if (!s.ok()) {
        std::printf("rank %d: RunForward: %s\n", rank, s.ToString().c_str());
        return 1;
      }
      if (rank == stages - 1) {
        stage.Expect(static_cast<int>(stage.outputs_.size()) == eval_m,
                     absl::StrCat("RunForward produced ", stage.outputs_.size(), " outputs"));
        for (const auto& [mb, y] : stage.outputs_) {
          for (int i = 0; i < kF; ++i) {
            const double want = ProdW(0, stages, -1, i) * X(mb, i);
            stage.Expect(Near(y.data_ptr<float>()[i], want),
                         absl::StrCat("eval output of micro-batch ", mb, " element ", i, " is ",
                                      y.data_ptr<float>()[i], ", want ", want));
          }
        }
      }
      continue;
    }
    stage.dw_.zero_();
    stage.max_slot_ = -1;
    const absl::Status s = ex.RunStep(reduce);
    if (!s.ok()) {
      std::printf("rank %d: RunStep %d: %s\n", rank, round, s.ToString().c_str());
      return 1;
    }
    for (int i = 0; i < kF; ++i) {
      const double want = ExpectedDw(rank, stages, m, i);
      stage.Expect(Near(stage.dw_.data_ptr<float>()[i], want),
                   absl::StrCat("round ", round, ": dw[", i, "] = ",
                                stage.dw_.data_ptr<float>()[i], ", want ", want));
    }
    // Lowest free slot first: the slots used are exactly 0 .. peak - 1, and the peak is the
    // schedule's bound (1F1B: min(p - rank, m); GPipe: m).
    stage.Expect(ex.peak_slots() == bound,
                 absl::StrCat("peak_slots ", ex.peak_slots(), ", bound ", bound));
    stage.Expect(stage.max_slot_ + 1 == ex.peak_slots(),
                 absl::StrCat("highest slot ", stage.max_slot_, " with peak ", ex.peak_slots()));
    const PipelineStepTiming& t = ex.last_timing();
    stage.Expect(t.total_s > 0 && t.compute_s >= 0 && t.recv_wait_s >= 0 &&
                     t.compute_s + t.recv_wait_s + t.send_wait_s <= t.total_s,
                 "timings do not add up");
  }
  stage.Expect(reduce_calls == 3, absl::StrCat("reduce_grads called ", reduce_calls, " times"));
  for (const std::string& e : stage.errors_) std::printf("rank %d: %s\n", rank, e.c_str());
  std::printf("rank %d: %zu errors\n", rank, stage.errors_.size());
  std::fflush(stdout);
  backend->reset();
  return stage.errors_.empty() ? 0 : 1;
}

// ---- The tests. ----

struct Case {
  const char* kind;
  int stages;
  int micro_batches;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.kind << " p=" << c.stages << " m=" << c.micro_batches;
}

// `fault`: "", "die" or "stall" (kFaultEnv).
std::vector<::shoal::testing::RankResult> Launch(const Case& c, const std::string& fault) {
  comm::TcpStoreOptions o;
  o.port = 0;
  o.is_server = true;
  o.world_size = c.stages;
  o.timeout = absl::Seconds(30);
  auto server = comm::MakeTcpStore(o);  // serves the ranks for the length of the test
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return {};
  std::map<std::string, std::string> env{{kKindEnv, c.kind},
                                         {kStagesEnv, std::to_string(c.stages)},
                                         {kMicroEnv, std::to_string(c.micro_batches)},
                                         {kPortEnv, std::to_string((*server)->port())}};
  if (!fault.empty()) env[kFaultEnv] = fault;
  std::vector<int> ranks;
  for (int r = 0; r < c.stages; ++r) ranks.push_back(r);
  return ::shoal::testing::LaunchRanks(ranks, env, std::chrono::seconds(50));
}

class PipelineExecutorRanks : public ::testing::TestWithParam<Case> {};

TEST_P(PipelineExecutorRanks, GradientsMatchTheClosedForm) {
  const auto results = Launch(GetParam(), /*fault=*/"");
  ASSERT_EQ(results.size(), static_cast<size_t>(GetParam().stages));
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                              << ::shoal::testing::DescribeRanks(results);
  }
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineExecutorRanks,
                         ::testing::Values(Case{"1f1b", 2, 1}, Case{"1f1b", 2, 4},
                                           Case{"1f1b", 4, 6}, Case{"gpipe", 4, 3},
                                           Case{"gpipe", 3, 5}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return absl::StrCat(info.param.kind, "_p", info.param.stages, "_m",
                                               info.param.micro_batches);
                         });

TEST(PipelineExecutorFailure, DeadPeerFailsTheOthersInsteadOfHanging) {
  const auto results = Launch(Case{"1f1b", 3, 4}, "die");
  ASSERT_EQ(results.size(), 3u);
  for (const auto& r : results) {
    EXPECT_FALSE(r.timed_out) << ::shoal::testing::DescribeRanks(results);
    EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                              << ::shoal::testing::DescribeRanks(results);
  }
  EXPECT_TRUE(::shoal::testing::Contains(results[1].output, "exiting inside forward"))
      << results[1].output;
}

TEST(PipelineExecutorFailure, SilentPeerTimesOutTheOthers) {
  const auto results = Launch(Case{"1f1b", 3, 4}, "stall");
  ASSERT_EQ(results.size(), 3u);
  for (const auto& r : results) {
    EXPECT_FALSE(r.timed_out) << ::shoal::testing::DescribeRanks(results);
    EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                              << ::shoal::testing::DescribeRanks(results);
  }
}

// ---- In this process: one stage (no group), and what Create refuses. ----

TEST(PipelineExecutorSingleStage, RunsWithoutAGroup) {
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 1, 3);
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  ClosedFormStage stage(0, 1);
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage);
  ASSERT_TRUE(ex.ok()) << ex.status();
  bool reduced = false;
  ASSERT_TRUE((*ex)->RunStep([&] {
                 reduced = true;
                 return absl::OkStatus();
               }).ok());
  EXPECT_TRUE(reduced);
  EXPECT_EQ((*ex)->peak_slots(), 1);
  for (int i = 0; i < kF; ++i) {
    EXPECT_NEAR(stage.dw_.data_ptr<float>()[i], ExpectedDw(0, 1, 3, i), 1e-4) << i;
  }
  stage.outputs_.clear();
  stage.eval_ = true;
  ASSERT_TRUE((*ex)->RunForward(2).ok());
  ASSERT_EQ(stage.outputs_.size(), 2u);
  for (int i = 0; i < kF; ++i) {
    EXPECT_NEAR(stage.outputs_[1].data_ptr<float>()[i], W(0, i) * X(1, i), 1e-5) << i;
  }
  EXPECT_TRUE(stage.errors_.empty()) << stage.errors_.front();
}

TEST(PipelineExecutorSingleStage, ReduceGradsErrorIsReturned) {
  auto schedule = MakeSchedule(ScheduleKind::kGPipe, 1, 2);
  ASSERT_TRUE(schedule.ok());
  ClosedFormStage stage(0, 1);
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage);
  ASSERT_TRUE(ex.ok());
  const absl::Status s = (*ex)->RunStep([] { return absl::UnavailableError("dp group gone"); });
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "dp group gone")) << s;
}

TEST(PipelineExecutorSingleStage, RunForwardRefusesBadCounts) {
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 1, 1);
  ASSERT_TRUE(schedule.ok());
  ClosedFormStage stage(0, 1);
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage);
  ASSERT_TRUE(ex.ok());
  absl::Status s = (*ex)->RunForward(0);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  // 3 data kinds x 1 stage x 800M micro-batches of tags do not fit below 2^31.
  s = (*ex)->RunForward(800000000);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "800000000")) << s;
  EXPECT_TRUE(stage.outputs_.empty());
}

class PipelineExecutorCreate : public ::testing::Test {
 protected:
  // A real Gloo group of one, in this process.
  std::unique_ptr<comm::Backend> GroupOfOne() {
    auto store = comm::MakeFileStore(dir_ / "store", 1, absl::Seconds(10));
    EXPECT_TRUE(store.ok()) << store.status();
    comm::BackendOptions o;
    o.store = *store;
    o.gloo_hostname = "127.0.0.1";
    auto b = comm::CreateBackend(o);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }
  ::shoal::testing::TempDir dir_;
  ClosedFormStage stage_{0, 2};
};

TEST_F(PipelineExecutorCreate, RefusesAnInvalidSchedule) {
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 1, 2);
  ASSERT_TRUE(schedule.ok());
  schedule->per_rank[0].pop_back();  // no optimizer step
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "invalid schedule")) << ex.status();
}

TEST_F(PipelineExecutorCreate, RefusesInterleaving) {
  auto schedule = MakeSchedule(ScheduleKind::kInterleaved1F1B, 2, 2, 2);
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "virtual_stages 2")) << ex.status();
}

TEST_F(PipelineExecutorCreate, RefusesANullStage) {
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 1, 2);
  ASSERT_TRUE(schedule.ok());
  auto ex = PipelineExecutor::Create(nullptr, *schedule, nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "null")) << ex.status();
}

TEST_F(PipelineExecutorCreate, RefusesAMissingGroupForSeveralStages) {
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 2, 2);
  ASSERT_TRUE(schedule.ok());
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "2 stages")) << ex.status();
}

TEST_F(PipelineExecutorCreate, RefusesAGroupOfTheWrongSize) {
  std::unique_ptr<comm::Backend> group = GroupOfOne();
  ASSERT_NE(group, nullptr);
  auto schedule = MakeSchedule(ScheduleKind::kGPipe, 3, 2);
  ASSERT_TRUE(schedule.ok());
  auto ex = PipelineExecutor::Create(group.get(), *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "1 ranks")) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "3 stages")) << ex.status();
  // The same group runs a one-stage schedule.
  auto one = MakeSchedule(ScheduleKind::kGPipe, 1, 2);
  ASSERT_TRUE(one.ok());
  ClosedFormStage single(0, 1);
  auto ok = PipelineExecutor::Create(group.get(), *one, &single);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE((*ok)->RunStep().ok());
}

// A stage that hands on an activation of the wrong shape gets an error naming the action, not a
// transfer of the wrong size.
class WrongShapeStage final : public StageCompute {
 public:
  at::Tensor Forward(int, int, const at::Tensor&) override { return at::zeros({3}); }
  at::Tensor Backward(int, int, const at::Tensor&) override { return at::Tensor(); }
  std::vector<int64_t> ActivationShape() const override { return {2, 4}; }
};

TEST_F(PipelineExecutorCreate, WrongOutputShapeIsAnErrorNamingTheAction) {
  // A real group of two in this process (rendezvous needs both ranks at once: one thread each);
  // rank 0 is the first of two stages, so its forward output is sent, and the check fails its
  // first forward before any transfer.
  auto store = comm::MakeFileStore(dir_ / "store2", 2, absl::Seconds(10));
  ASSERT_TRUE(store.ok()) << store.status();
  std::unique_ptr<comm::Backend> groups[2];
  absl::Status statuses[2];
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      comm::BackendOptions o;
      o.rank = r;
      o.world_size = 2;
      o.store = *store;
      o.timeout = absl::Seconds(10);
      o.gloo_hostname = "127.0.0.1";
      auto b = comm::CreateBackend(o);
      statuses[r] = b.status();
      if (b.ok()) groups[r] = std::move(*b);
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(statuses[0].ok() && statuses[1].ok()) << statuses[0] << " / " << statuses[1];
  auto schedule = MakeSchedule(ScheduleKind::k1F1B, 2, 2);
  ASSERT_TRUE(schedule.ok());
  WrongShapeStage wrong;
  auto ex = PipelineExecutor::Create(groups[0].get(), *schedule, &wrong);
  ASSERT_TRUE(ex.ok()) << ex.status();
  const absl::Status s = (*ex)->RunStep();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), "forward of micro-batch 0")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "[3]")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "[2, 4]")) << s;
}

// ---- The benchmark's body (parallel/pipeline_bench.h), on one stage in this process; the
// multi-rank runs are `shoal bench pipeline`'s. ----

TEST(PipelineBench, OneStageRunsBothSchedulesAndBothWorks) {
  for (PipelineBenchWork work : {PipelineBenchWork::kSleep, PipelineBenchWork::kGemm}) {
    PipelineBenchOptions o;
    o.schedules = {ScheduleKind::k1F1B, ScheduleKind::kGPipe};
    o.micro_batches = 3;
    o.forward_ms = 1;
    o.backward_ms = 1;
    o.steps = 2;
    o.work = work;
    auto cases = RunPipelineBench(nullptr, o);
    ASSERT_TRUE(cases.ok()) << cases.status();
    ASSERT_EQ(cases->size(), 2u);
    for (const PipelineBenchCase& c : *cases) {
      EXPECT_EQ(c.stages, 1);
      EXPECT_EQ(c.micro_batches, 3);
      EXPECT_EQ(c.bubble_theory, 0.0);
      // One stage computes whenever it runs: what is not compute is bookkeeping, never negative.
      EXPECT_GE(c.bubble_measured, 0.0);
      EXPECT_LT(c.bubble_measured, 1.0);
      EXPECT_GT(c.compute_s, 0.0);
      EXPECT_GE(c.step_s, c.compute_s);
    }
    EXPECT_EQ((*cases)[0].schedule, ScheduleKind::k1F1B);
    EXPECT_EQ((*cases)[0].peak_slots, std::vector<int>{1});
    EXPECT_EQ((*cases)[1].peak_slots, std::vector<int>{3});
    EXPECT_EQ((*cases)[1].peak_bound, std::vector<int>{3});
    const std::string table = FormatPipelineBenchTable(*cases);
    EXPECT_TRUE(absl::StrContains(table, "GPipe")) << table;
    EXPECT_TRUE(absl::StrContains(table, "3/3")) << table;
  }
}

TEST(PipelineBench, BadOptionsAreRefusedByName) {
  auto refused = [](const PipelineBenchOptions& o, const std::string& name) {
    const absl::Status s = ValidatePipelineBenchOptions(o);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), name)) << s;
    EXPECT_TRUE(absl::IsInvalidArgument(RunPipelineBench(nullptr, o).status()));
  };
  PipelineBenchOptions o;
  o.micro_batches = 0;
  refused(o, "micro-batches");
  o = {};
  o.steps = 0;
  refused(o, "steps");
  o = {};
  o.forward_ms = -1;
  refused(o, "forward-ms");
  o = {};
  o.backward_ms = std::nan("");
  refused(o, "backward-ms");
  o = {};
  o.schedules = {};
  refused(o, "schedule");
  o = {};
  o.schedules = {ScheduleKind::kInterleaved1F1B};
  refused(o, "interleaved");
  o = {};
  o.activation_shape = {4, 0};
  refused(o, "activation shape");
  EXPECT_TRUE(ValidatePipelineBenchOptions(PipelineBenchOptions{}).ok());
}

}  // namespace
}  // namespace shoal::parallel

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::parallel::RunRank();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
