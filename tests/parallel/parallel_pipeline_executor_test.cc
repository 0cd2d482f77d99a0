// PipelineExecutor over real Gloo between real processes on 127.0.0.1 (rank_launcher.h), on a
// synthetic model with a closed form.
//
// The model is a chain of L = stages * virtual_stages model stages; model stage j holds a weight
// vector w_j of F = 8 values and lives on rank j % stages as its chunk j / stages. Activations
// have shape (2, 4):
//   forward   y = w_j * x                (elementwise; model stage 0's x is x_m, per micro-batch)
//   backward  dx = w_j * dy, dw_j += x * dy
//   loss      sum(y * t_m) on model stage L - 1, so its dy = t_m.
// Hence model stage j receives x = (prod_{i<j} w_i) * x_m, the gradient (prod_{i>j} w_i) * t_m,
// and after one step dw_j = sum_m (prod_{i != j} w_i) * x_m * t_m. Each rank computes these in
// double from the formulas (not from the executor) and checks every received tensor and the
// gradients of every chunk after every step; a tag mix-up, a lost or duplicated transfer, a
// chunk mix-up or a wrong slot shows up there.
#include "tests/gloo_pair.h"
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
#include "tests/comm/rank_launcher.h"
#include "tests/comm/store_ranks.h"
#include "tests/test_util.h"

namespace shoal::parallel {
namespace {

using ::shoal::testing::EnvInt;
using ::shoal::testing::EnvString;

constexpr int kF = 8;
const std::vector<int64_t> kShape = {2, 4};

constexpr char kKindEnv[] = "SHOAL_PIPE_TEST_KIND";  // "1f1b", "gpipe" or "interleaved"
constexpr char kStagesEnv[] = "SHOAL_PIPE_TEST_STAGES";
constexpr char kMicroEnv[] = "SHOAL_PIPE_TEST_M";
constexpr char kVirtualEnv[] = "SHOAL_PIPE_TEST_V";
constexpr char kPortEnv[] = "SHOAL_PIPE_TEST_PORT";
// "die": rank 1 exits (status 0, no goodbye) inside the forward of micro-batch 1 (chunk 0) of
// the second step, a peer that dies mid-step; "stall": it sleeps there for 5 s, a peer alive but
// silent for longer than the transfer timeout (3 s).
constexpr char kFaultEnv[] = "SHOAL_PIPE_TEST_FAULT";

double W(int stage, int i) { return 0.6 + 0.1 * stage + 0.05 * i; }
double X(int m, int i) { return 1.0 + m + i / 10.0; }
double T(int m, int i) { return 0.5 + 0.25 * m - 0.1 * i; }

// The closed forms, in double, over model stages.
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

// The synthetic rank: `chunks` model stages, chunk c being model stage c * stages + rank. Records
// every disagreement with the closed form in `errors_`, and counts for itself the (micro-batch,
// chunk) pairs in flight, to check the executor's slot bookkeeping against.
class ClosedFormStage final : public StageCompute {
 public:
  ClosedFormStage(int rank, int stages, int chunks = 1)
      : rank_(rank), stages_(stages), model_stages_(stages * chunks), chunks_(chunks) {
    for (int c = 0; c < chunks; ++c) {
      at::Tensor w = at::empty(kShape, at::kFloat);
      for (int i = 0; i < kF; ++i) w.data_ptr<float>()[i] = static_cast<float>(W(ModelStage(c), i));
      w_.push_back(w);
      dw_.push_back(at::zeros(kShape, at::kFloat));
    }
    slots_.resize(chunks);
    max_slot_.assign(chunks, -1);
    in_flight_.assign(chunks, 0);
    peak_in_flight_.assign(chunks, 0);
    y_ = at::zeros(kShape, at::kFloat);
    dx_ = at::zeros(kShape, at::kFloat);
  }

  int ModelStage(int chunk) const { return chunk * stages_ + rank_; }

  at::Tensor Forward(int chunk, int micro_batch, int slot, const at::Tensor& input) override {
    if (chunk < 0 || chunk >= chunks_) {
      Expect(false, absl::StrCat("forward of micro-batch ", micro_batch, " in chunk ", chunk));
      return at::zeros(kShape);
    }
    const int j = ModelStage(chunk);
    if (fault_at_forward_ == micro_batch && chunk == 0 && step_ == 1) {
      std::printf("rank %d: %s inside forward of micro-batch %d\n", rank_,
                  stall_ ? "stalling" : "exiting", micro_batch);
      std::fflush(stdout);
      if (!stall_) std::_Exit(0);
      std::this_thread::sleep_for(std::chrono::seconds(5));
    }
    at::Tensor x;
    if (j == 0) {
      Expect(!input.defined(), "first model stage got an input");
      x = Filled(X, micro_batch);
    } else {
      if (!CheckTensor(input, "forward input", micro_batch, chunk)) return at::zeros(kShape);
      for (int i = 0; i < kF; ++i) {
        Expect(Near(input.data_ptr<float>()[i], ExpectedInput(j, micro_batch, i)),
               absl::StrCat("forward input of micro-batch ", micro_batch, " chunk ", chunk,
                            " element ", i, " is ", input.data_ptr<float>()[i], ", want ",
                            ExpectedInput(j, micro_batch, i)));
      }
      x = input.clone();
    }
    std::vector<Slot>& slots = slots_[chunk];
    if (slot < 0) {
      Expect(false, absl::StrCat("negative slot ", slot));
      return at::zeros(kShape);
    }
    if (slot >= static_cast<int>(slots.size())) slots.resize(slot + 1);
    // A forward-only pass reuses slot 0 without backwards; a training step never reuses a slot
    // of a chunk before its backward.
    Expect(eval_ || slots[slot].micro_batch < 0,
           absl::StrCat("slot ", slot, " of chunk ", chunk, " given to micro-batch ",
                        micro_batch, " still holds ", slots[slot].micro_batch));
    if (!eval_) {
      slots[slot] = {micro_batch, x};
      max_slot_[chunk] = std::max(max_slot_[chunk], slot);
      peak_in_flight_[chunk] = std::max(peak_in_flight_[chunk], ++in_flight_[chunk]);
      ++total_in_flight_;
      peak_total_in_flight_ = std::max(peak_total_in_flight_, total_in_flight_);
    }
    // Into the same buffer for every micro-batch and chunk, as the model does (the executor
    // must copy what it sends).
    at::mul_out(y_, w_[chunk], x);
    if (j == model_stages_ - 1) {
      outputs_[micro_batch] = y_.clone();
      return at::Tensor();
    }
    return y_;
  }

  at::Tensor Backward(int chunk, int micro_batch, int slot, const at::Tensor& grad_output) override {
    if (chunk < 0 || chunk >= chunks_ || slot < 0 ||
        slot >= static_cast<int>(slots_[chunk].size()) ||
        slots_[chunk][slot].micro_batch != micro_batch) {
      Expect(false, absl::StrCat("backward of micro-batch ", micro_batch, " in chunk ", chunk,
                                 " slot ", slot, " which does not hold it"));
      return ModelStage(std::max(chunk, 0)) == 0 ? at::Tensor() : at::zeros(kShape);
    }
    const int j = ModelStage(chunk);
    at::Tensor dy;
    if (j == model_stages_ - 1) {
      Expect(!grad_output.defined(), "last model stage got a gradient");
      dy = Filled(T, micro_batch);
    } else {
      if (!CheckTensor(grad_output, "grad output", micro_batch, chunk)) return at::zeros(kShape);
      for (int i = 0; i < kF; ++i) {
        const double want = ExpectedGrad(j, model_stages_, micro_batch, i);
        Expect(Near(grad_output.data_ptr<float>()[i], want),
               absl::StrCat("grad output of micro-batch ", micro_batch, " chunk ", chunk,
                            " element ", i, " is ", grad_output.data_ptr<float>()[i], ", want ",
                            want));
      }
      dy = grad_output;
    }
    dw_[chunk] += slots_[chunk][slot].x * dy;
    slots_[chunk][slot].micro_batch = -1;
    --in_flight_[chunk];
    --total_in_flight_;
    if (j == 0) return at::Tensor();
    at::mul_out(dx_, w_[chunk], dy);
    return dx_;
  }

  std::vector<int64_t> ActivationShape() const override { return kShape; }

  void Expect(bool ok, const std::string& what) {
    if (!ok && errors_.size() < 20) errors_.push_back(what);
  }
  bool CheckTensor(const at::Tensor& t, const char* what, int micro_batch, int chunk) {
    const bool ok = t.defined() && t.scalar_type() == at::kFloat && t.sizes().equals(kShape);
    Expect(ok, absl::StrCat(what, " of micro-batch ", micro_batch, " chunk ", chunk,
                            " missing or misshapen"));
    return ok;
  }
  // Before a step: no gradients, no slot history.
  void ResetStep() {
    for (at::Tensor& dw : dw_) dw.zero_();
    max_slot_.assign(chunks_, -1);
    peak_in_flight_.assign(chunks_, 0);
    peak_total_in_flight_ = 0;
  }

  struct Slot {
    int micro_batch = -1;
    at::Tensor x;
  };
  const int rank_, stages_, model_stages_, chunks_;
  std::vector<at::Tensor> w_, dw_;  // [chunk]
  at::Tensor y_, dx_;
  std::vector<std::vector<Slot>> slots_;  // [chunk][slot]
  // [chunk]: highest slot given out; pairs in flight now and at most, as seen by this stage.
  std::vector<int> max_slot_, in_flight_, peak_in_flight_;
  int total_in_flight_ = 0, peak_total_in_flight_ = 0;
  std::map<int, at::Tensor> outputs_;  // last model stage: y per micro-batch
  std::vector<std::string> errors_;
  int step_ = 0;
  int fault_at_forward_ = -1;
  bool stall_ = false;
  bool eval_ = false;  // inside RunForward
};

ScheduleKind KindFromName(const std::string& name) {
  if (name == "gpipe") return ScheduleKind::kGPipe;
  if (name == "interleaved") return ScheduleKind::kInterleaved1F1B;
  return ScheduleKind::k1F1B;
}

// ---- Inside a rank process. ----

int RunRank() {
  ::alarm(60);  // a rank never outlives its test by much, whatever happens
  const int rank = EnvInt(::shoal::testing::kRankEnv, -1);
  const int stages = EnvInt(kStagesEnv, -1);
  const int m = EnvInt(kMicroEnv, -1);
  const int v = EnvInt(kVirtualEnv, 1);
  const ScheduleKind kind = KindFromName(EnvString(kKindEnv));
  const std::string fault = EnvString(kFaultEnv);
  if (rank < 0 || stages < 1 || m < 1 || v < 1) {
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
  auto schedule = MakeSchedule(kind, stages, m, v);
  if (!schedule.ok()) {
    std::printf("rank %d: MakeSchedule: %s\n", rank, schedule.status().ToString().c_str());
    return 1;
  }
  ClosedFormStage stage(rank, stages, v);
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

  // The peak two ways: the schedule's bound, and the discrete-event simulation of the same
  // program (which counts the pairs in flight independently of the executor).
  const int bound = PeakInFlightBound(kind, stages, m, rank, v);
  StageCosts costs;
  costs.forward.assign(stages * v, 1.0);
  costs.backward.assign(stages * v, 2.0);
  auto sim = Simulate(*schedule, costs);
  if (!sim.ok()) {
    std::printf("rank %d: Simulate: %s\n", rank, sim.status().ToString().c_str());
    return 1;
  }
  const int simulated_peak = sim->peak_in_flight[rank];
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
      if (rank == stages - 1) {  // holds the last model stage (chunk v - 1)
        stage.Expect(static_cast<int>(stage.outputs_.size()) == eval_m,
                     absl::StrCat("RunForward produced ", stage.outputs_.size(), " outputs"));
        for (const auto& [mb, y] : stage.outputs_) {
          for (int i = 0; i < kF; ++i) {
            const double want = ProdW(0, stages * v, -1, i) * X(mb, i);
            stage.Expect(Near(y.data_ptr<float>()[i], want),
                         absl::StrCat("eval output of micro-batch ", mb, " element ", i, " is ",
                                      y.data_ptr<float>()[i], ", want ", want));
          }
        }
      } else {
        stage.Expect(stage.outputs_.empty(), "RunForward produced outputs off the last stage");
      }
      continue;
    }
    stage.ResetStep();
    const absl::Status s = ex.RunStep(reduce);
    if (!s.ok()) {
      std::printf("rank %d: RunStep %d: %s\n", rank, round, s.ToString().c_str());
      return 1;
    }
    for (int c = 0; c < v; ++c) {
      const int j = stage.ModelStage(c);
      for (int i = 0; i < kF; ++i) {
        const double want = ExpectedDw(j, stages * v, m, i);
        stage.Expect(Near(stage.dw_[c].data_ptr<float>()[i], want),
                     absl::StrCat("round ", round, ": model stage ", j, " dw[", i, "] = ",
                                  stage.dw_[c].data_ptr<float>()[i], ", want ", want));
      }
      // Lowest free slot of the chunk first: a chunk's slots are exactly 0 .. peak - 1.
      stage.Expect(stage.max_slot_[c] + 1 == stage.peak_in_flight_[c],
                   absl::StrCat("chunk ", c, ": highest slot ", stage.max_slot_[c], " with ",
                                stage.peak_in_flight_[c], " micro-batches in flight at most"));
      stage.Expect(stage.in_flight_[c] == 0,
                   absl::StrCat("chunk ", c, ": ", stage.in_flight_[c], " left in flight"));
    }
    // peak_slots counts the pairs in flight across chunks, which is the schedule's bound
    // (1F1B: min(p - rank, m); GPipe: m; interleaved: min(2 (p - rank - 1) + (v - 1) p + 1, m v)).
    stage.Expect(ex.peak_slots() == stage.peak_total_in_flight_,
                 absl::StrCat("peak_slots ", ex.peak_slots(), ", seen in flight ",
                              stage.peak_total_in_flight_));
    stage.Expect(ex.peak_slots() == bound && ex.peak_slots() == simulated_peak,
                 absl::StrCat("peak_slots ", ex.peak_slots(), ", bound ", bound, ", simulated ",
                              simulated_peak));
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
  int virtual_stages = 1;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.kind << " p=" << c.stages << " m=" << c.micro_batches << " v=" << c.virtual_stages;
}

// `fault`: "", "die" or "stall" (kFaultEnv).
std::vector<::shoal::testing::RankResult> Launch(const Case& c, const std::string& fault) {
  std::map<std::string, std::string> env{{kKindEnv, c.kind},
                                         {kStagesEnv, std::to_string(c.stages)},
                                         {kMicroEnv, std::to_string(c.micro_batches)},
                                         {kVirtualEnv, std::to_string(c.virtual_stages)}};
  if (!fault.empty()) env[kFaultEnv] = fault;
  auto results = ::shoal::testing::LaunchRanksWithStore(c.stages, env, kPortEnv,
                                                        std::chrono::seconds(50));
  EXPECT_TRUE(results.ok()) << results.status();
  if (!results.ok()) return {};
  return *std::move(results);
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
                                           Case{"gpipe", 3, 5}, Case{"interleaved", 2, 4, 2},
                                           Case{"interleaved", 2, 6, 3},
                                           Case{"interleaved", 4, 8, 2}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return absl::StrCat(info.param.kind, "_p", info.param.stages, "_m",
                                               info.param.micro_batches, "_v",
                                               info.param.virtual_stages);
                         });

TEST(PipelineExecutorFailure, DeadPeerFailsTheOthersInsteadOfHanging) {
  // 1F1B over 3 ranks; and interleaved over 2, where rank 1 dies in its chunk 0 while rank 0 has
  // work in flight on both of its chunks (transfers posted both ways with rank 1, its previous
  // and next model stage at once).
  for (const Case& c : {Case{"1f1b", 3, 4}, Case{"interleaved", 2, 4, 2}}) {
    SCOPED_TRACE(c.kind);
    const auto results = Launch(c, "die");
    ASSERT_EQ(results.size(), static_cast<size_t>(c.stages));
    for (const auto& r : results) {
      EXPECT_FALSE(r.timed_out) << ::shoal::testing::DescribeRanks(results);
      EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                                << ::shoal::testing::DescribeRanks(results);
    }
    EXPECT_TRUE(::shoal::testing::Contains(results[1].output, "exiting inside forward"))
        << results[1].output;
  }
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
    EXPECT_NEAR(stage.dw_[0].data_ptr<float>()[i], ExpectedDw(0, 1, 3, i), 1e-4) << i;
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

TEST_F(PipelineExecutorCreate, RefusesAnInterleavedScheduleWithABadChunk) {
  auto schedule = MakeSchedule(ScheduleKind::kInterleaved1F1B, 2, 2, 2);
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  // A valid interleaved schedule is accepted as far as its group (here: missing) ...
  auto missing = PipelineExecutor::Create(nullptr, *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(missing.status())) << missing.status();
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "2 stages")) << missing.status();
  // ... and one naming a chunk the rank does not have is not.
  for (Action& a : schedule->per_rank[0]) {
    if (a.kind == ActionKind::kForward) a.chunk = 2;
  }
  auto ex = PipelineExecutor::Create(nullptr, *schedule, &stage_);
  EXPECT_TRUE(absl::IsInvalidArgument(ex.status())) << ex.status();
  EXPECT_TRUE(absl::StrContains(ex.status().message(), "invalid schedule")) << ex.status();
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
  at::Tensor Forward(int, int, int, const at::Tensor&) override { return at::zeros({3}); }
  at::Tensor Backward(int, int, int, const at::Tensor&) override { return at::Tensor(); }
  std::vector<int64_t> ActivationShape() const override { return {2, 4}; }
};


TEST_F(PipelineExecutorCreate, WrongOutputShapeIsAnErrorNamingTheAction) {
  // A real group of two in this process (rendezvous needs both ranks at once: one thread each);
  // rank 0 is the first of two stages, so its forward output is sent, and the check fails its
  // first forward before any transfer.
  auto store = comm::MakeFileStore(dir_ / "store2", 2, absl::Seconds(10));
  ASSERT_TRUE(store.ok()) << store.status();
  std::unique_ptr<comm::Backend> groups[2];
  ASSERT_NO_FATAL_FAILURE(MakePairInThreads(*store, groups));
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

}  // namespace
}  // namespace shoal::parallel

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::parallel::RunRank();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
