#include "bench/pipeline_bench.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "parallel/pipeline_executor.h"

namespace shoal::bench {
namespace {

using ::shoal::parallel::BubbleFraction1F1B;
using ::shoal::parallel::MakeSchedule;
using ::shoal::parallel::PeakInFlightBound;
using ::shoal::parallel::PipelineExecutor;
using ::shoal::parallel::PipelineExecutorOptions;
using ::shoal::parallel::PipelineSchedule;
using ::shoal::parallel::PipelineStepTiming;
using ::shoal::parallel::ScheduleKind;
using ::shoal::parallel::StageCompute;

using Clock = std::chrono::steady_clock;

// Side of the square matmul that kGemm repeats: small enough that the loop count, not the size,
// sets the time (one multiply is well under a millisecond), large enough not to be all overhead.
constexpr int kGemmN = 64;

// A single-threaded matmul written out, not a BLAS call: it must stay on one core whatever the
// BLAS thread settings are, and only its duration matters.
class GemmLoop {
 public:
  GemmLoop() : a_(kGemmN * kGemmN), b_(kGemmN * kGemmN), c_(kGemmN * kGemmN) {
    for (int i = 0; i < kGemmN * kGemmN; ++i) {
      a_[i] = 0.001f * static_cast<float>(i % 97);
      b_[i] = 0.002f * static_cast<float>(i % 89);
    }
  }

  void Run(int64_t reps) {
    for (int64_t r = 0; r < reps; ++r) {
      std::fill(c_.begin(), c_.end(), 0.0f);
      for (int i = 0; i < kGemmN; ++i) {
        for (int k = 0; k < kGemmN; ++k) {
          const float aik = a_[i * kGemmN + k];
          for (int j = 0; j < kGemmN; ++j) c_[i * kGemmN + j] += aik * b_[k * kGemmN + j];
        }
      }
      // Feed the result back so the compiler cannot drop the loop.
      a_[r % (kGemmN * kGemmN)] = 0.5f * a_[r % (kGemmN * kGemmN)] + 1e-6f * c_[kGemmN + 1];
    }
  }

  // Multiplies per millisecond on this core, measured over at least 100 ms.
  double RepsPerMs() {
    int64_t reps = 8;
    while (true) {
      const Clock::time_point t0 = Clock::now();
      Run(reps);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (ms >= 100 || reps >= (int64_t{1} << 40)) return reps / std::max(ms, 1e-3);
      reps *= 2;
    }
  }

 private:
  std::vector<float> a_, b_, c_;
};

// The synthetic rank: each chunk's forward / backward takes the configured time divided by the
// number of chunks and hands on a fixed activation (its contents do not matter, its size does).
class TimedStage final : public StageCompute {
 public:
  TimedStage(const PipelineBenchOptions& o, int rank, int stages, int chunks,
             double gemm_reps_per_ms)
      : o_(o),
        rank_(rank),
        model_stages_(stages * chunks),
        stages_(stages),
        chunks_(chunks),
        gemm_reps_per_ms_(gemm_reps_per_ms),
        out_(at::full(o.activation_shape, 0.5f, at::kFloat)) {}

  at::Tensor Forward(int chunk, int, int, const at::Tensor&) override {
    Work(o_.forward_ms / chunks_);
    return chunk * stages_ + rank_ == model_stages_ - 1 ? at::Tensor() : out_;
  }
  at::Tensor Backward(int chunk, int, int, const at::Tensor&) override {
    Work(o_.backward_ms / chunks_);
    return chunk * stages_ + rank_ == 0 ? at::Tensor() : out_;
  }
  std::vector<int64_t> ActivationShape() const override { return o_.activation_shape; }

 private:
  void Work(double ms) {
    if (o_.work == PipelineBenchWork::kSleep) {
      std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms));
    } else {
      gemm_.Run(std::llround(ms * gemm_reps_per_ms_));
    }
  }

  const PipelineBenchOptions& o_;
  const int rank_, model_stages_, stages_, chunks_;
  const double gemm_reps_per_ms_;
  GemmLoop gemm_;
  at::Tensor out_;
};

absl::Status Barrier(comm::Backend* group, const comm::CollectiveOptions& o) {
  if (group == nullptr) return absl::OkStatus();
  return group->Barrier(o)->Wait();
}

// Per rank and timed step, what goes into the AllGather.
enum Field { kCompute, kTotal, kRecvWait, kSendWait, kPeak, kFields };

}  // namespace

absl::Status ValidatePipelineBenchOptions(const PipelineBenchOptions& o) {
  if (o.schedules.empty()) return absl::InvalidArgumentError("no schedule to run");
  for (ScheduleKind k : o.schedules) {
    if (k != ScheduleKind::kGPipe && k != ScheduleKind::k1F1B &&
        k != ScheduleKind::kInterleaved1F1B) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown schedule kind ", static_cast<int>(k)));
    }
    if (k == ScheduleKind::kInterleaved1F1B &&
        (o.virtual_stages < 2 || o.virtual_stages > 64)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "virtual-stages must be in [2, 64] for the interleaved schedule, got ",
          o.virtual_stages));
    }
  }
  if (o.micro_batches < 1 || o.micro_batches > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro-batches must be in [1, 4096], got ", o.micro_batches));
  }
  if (o.steps < 1 || o.steps > 10000) {
    return absl::InvalidArgumentError(absl::StrCat("steps must be in [1, 10000], got ", o.steps));
  }
  for (const auto& [name, ms] : {std::pair<const char*, double>{"forward-ms", o.forward_ms},
                                 {"backward-ms", o.backward_ms}}) {
    if (!std::isfinite(ms) || ms < 0 || ms > 60000) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [0, 60000] milliseconds, got ", ms));
    }
  }
  if (o.activation_shape.empty()) return absl::InvalidArgumentError("empty activation shape");
  for (int64_t d : o.activation_shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "activation shape [", absl::StrJoin(o.activation_shape, ", "), "] has a dimension < 1"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPipelineBenchStages(const PipelineBenchOptions& o, int stages) {
  for (ScheduleKind k : o.schedules) {
    if (k != ScheduleKind::kInterleaved1F1B) continue;
    if (stages < 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the interleaved schedule needs at least 2 stages, got ", stages));
    }
    if (o.micro_batches % stages != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the interleaved schedule needs micro-batches (", o.micro_batches,
          ") to be a multiple of stages (", stages, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PipelineBenchCase>> RunPipelineBench(
    comm::Backend* group, const PipelineBenchOptions& options) {
  SHOAL_RETURN_IF_ERROR(ValidatePipelineBenchOptions(options));
  const int stages = group != nullptr ? group->size() : 1;
  const int rank = group != nullptr ? group->rank() : 0;
  SHOAL_RETURN_IF_ERROR(CheckPipelineBenchStages(options, stages));

  // Calibrate the GEMM loop one rank at a time, so that no rank measures its core while another
  // rank shares it.
  double reps_per_ms = 0;
  if (options.work == PipelineBenchWork::kGemm) {
    GemmLoop gemm;
    for (int r = 0; r < stages; ++r) {
      if (r == rank) reps_per_ms = gemm.RepsPerMs();
      SHOAL_RETURN_IF_ERROR(Barrier(group, options.transfer));
    }
  }
  PipelineExecutorOptions eo;
  eo.transfer = options.transfer;

  std::vector<PipelineBenchCase> cases;
  for (ScheduleKind kind : options.schedules) {
    const int v = kind == ScheduleKind::kInterleaved1F1B ? options.virtual_stages : 1;
    TimedStage stage(options, rank, stages, v, reps_per_ms);
    SHOAL_ASSIGN_OR_RETURN(PipelineSchedule schedule,
                           MakeSchedule(kind, stages, options.micro_batches, v));
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<PipelineExecutor> executor,
                           PipelineExecutor::Create(group, std::move(schedule), &stage, eo));
    // (steps, kFields) on this rank; (stages, steps, kFields) after the gather.
    at::Tensor mine = at::zeros({options.steps, kFields}, at::kDouble);
    for (int step = -1; step < options.steps; ++step) {  // step -1: warm-up
      // Every rank starts the step together, so one rank's total_s is the step's makespan
      // as seen from that rank, not its lag behind the others.
      SHOAL_RETURN_IF_ERROR(Barrier(group, options.transfer));
      SHOAL_RETURN_IF_ERROR(executor->RunStep());
      if (step < 0) continue;
      const PipelineStepTiming& t = executor->last_timing();
      mine[step][kCompute] = t.compute_s;
      mine[step][kTotal] = t.total_s;
      mine[step][kRecvWait] = t.recv_wait_s;
      mine[step][kSendWait] = t.send_wait_s;
      mine[step][kPeak] = executor->peak_slots();
    }
    at::Tensor all = at::zeros({stages, options.steps, kFields}, at::kDouble);
    if (group != nullptr) {
      SHOAL_RETURN_IF_ERROR(group->AllGather(all, mine, options.transfer)->Wait());
    } else {
      all[0].copy_(mine);
    }
    auto a = all.accessor<double, 3>();
    PipelineBenchCase c;
    c.schedule = kind;
    c.stages = stages;
    c.micro_batches = options.micro_batches;
    c.virtual_stages = v;
    // Interleaving: the fill and drain are still p - 1 compute slots, but each is one chunk's
    // time, 1 / v of a rank's per-micro-batch work, against m of busy time per rank:
    // ((p - 1) / v) / (m + (p - 1) / v) = (p - 1) / (v m + p - 1) (Simulate
    // gives the same in parallel_pipeline_schedule_test).
    c.bubble_theory = kind == ScheduleKind::kInterleaved1F1B
                          ? static_cast<double>(stages - 1) /
                                (static_cast<double>(v) * options.micro_batches + stages - 1)
                          : BubbleFraction1F1B(stages, options.micro_batches);
    c.peak_slots.assign(stages, 0);
    for (int r = 0; r < stages; ++r) {
      c.peak_bound.push_back(PeakInFlightBound(kind, stages, options.micro_batches, r, v));
    }
    for (int step = 0; step < options.steps; ++step) {
      double compute = 0, makespan = 0;
      for (int r = 0; r < stages; ++r) {
        compute += a[r][step][kCompute];
        makespan = std::max(makespan, a[r][step][kTotal]);
        c.peak_slots[r] = std::max(c.peak_slots[r], static_cast<int>(a[r][step][kPeak]));
      }
      c.bubble_measured += makespan > 0 ? 1.0 - compute / (stages * makespan) : 0.0;
      c.step_s += makespan;
      c.compute_s += compute / stages;
    }
    c.bubble_measured /= options.steps;
    c.step_s /= options.steps;
    c.compute_s /= options.steps;
    cases.push_back(std::move(c));
  }
  return cases;
}

std::string FormatPipelineBenchTable(const std::vector<PipelineBenchCase>& cases) {
  std::string s = absl::StrFormat("%-16s %6s %2s %4s %15s %13s %9s %12s  %s\n", "schedule",
                                  "stages", "v", "m", "bubble measured", "bubble theory",
                                  "step (s)", "compute (s)", "peak slots / bound, per rank");
  for (const PipelineBenchCase& c : cases) {
    std::vector<std::string> peaks;
    for (size_t r = 0; r < c.peak_slots.size(); ++r) {
      peaks.push_back(absl::StrCat(c.peak_slots[r], "/",
                                   r < c.peak_bound.size() ? c.peak_bound[r] : -1));
    }
    absl::StrAppendFormat(&s, "%-16s %6d %2d %4d %15.3f %13.3f %9.3f %12.3f  %s\n",
                          ToString(c.schedule), c.stages, c.virtual_stages, c.micro_batches,
                          c.bubble_measured,
                          c.bubble_theory, c.step_s, c.compute_s, absl::StrJoin(peaks, " "));
  }
  return s;
}

}  // namespace shoal::bench
