// RunReport: what a training run tells its reader, beside the metrics file: the lines that
// describe the run at its start (threads, layout, model, data, how the step runs, the memory
// plans), the log line and JSONL record every train.log_every steps (loss, learning rate,
// gradient norm, tokens/s, MFU, bytes on the wire, elapsed, ETA), the report each step sends the
// coordinator, the validation lines, and the summary at the end (where a pipeline rank's time
// went, what the chunk stores moved, the memory plan against the run, DeMo's parameter hash). It
// also times the run for the TrainResult. Only rank 0 logs, except where a line is per rank.
// Not thread-safe.
#ifndef SHOAL_RUNTIME_RUN_REPORT_H_
#define SHOAL_RUNTIME_RUN_REPORT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "parallel/pipeline_executor.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/metrics.h"
#include "runtime/step_engine.h"
#include "runtime/token_file.h"

namespace shoal::runtime {

// What the Trainer reports after every step (to the coordinator link, through on_step).
struct StepReport {
  int64_t step = 0;            // steps completed
  double loss = 0;             // this step's loss (the data-parallel group's mean)
  double lr = 0;
  double tokens_per_s = 0;     // this rank's replica: its own tokens / step_seconds
  double step_seconds = 0;     // wall time of the step, throttle sleep included
  int64_t disk_bytes = 0;      // model state now on the disk tier (memory.disk_path), not in RAM
  // The chunk manager's plan (memory/cost_model.h), once it has one: 0s before or without one.
  double predicted_step_seconds = 0;
  int64_t predicted_peak_host_bytes = 0;
  int64_t host_budget_bytes = 0;       // the chunk stores' budgets together
  int64_t state_bytes = 0;             // the paged model states, RAM and disk together
};

struct RunReportOptions {
  bool log = true;                   // rank 0 prints the run's lines (false on other ranks)
  bool rank_lines = true;            // every rank prints its own start-up lines (threads)
  bool log_all_ranks_summary = true; // every rank prints its own end-of-run lines
  bool bench = false;                // time only the steps after bench_warmup_steps
  int64_t bench_warmup_steps = 3;
  int rank = 0;
  int world = 1;
  int nodes = 1;                     // hosts, for MFU (each has the measured peak)
  std::function<void(const StepReport&)> on_step;
};

// The timed figures of a run, for its result.
struct RunTiming {
  double tokens_per_s = 0;  // over the timed steps
  double step_time_ms = 0;
  double mfu = 0;
};

class RunReport {
 public:
  // `engine` and `metrics` (may be null) outlive the report.
  RunReport(const Config& config, StepEngine& engine, MetricsFile* metrics,
            RunReportOptions options);

  // The start-up lines, once the engine is built. `layout_from_coordinator`: the batch plan came
  // from the coordinator. `backend`: the job group's name ("" for one process).
  void Describe(const ThreadPlan& threads, double throttle, bool layout_from_coordinator,
                const std::string& backend, const TokenDataset& data) const;
  void Resumed(const std::string& root, int64_t step) const;

  // The run starts now, at `start_step`, with `peak_gflops` as the MFU denominator.
  void Start(int64_t start_step, double peak_gflops);
  // After each step: `done` steps completed of a run that ends at `end_step`, the step having
  // taken `seconds` (throttle included). Logs every train.log_every steps and at the end.
  void Step(int64_t done, int64_t end_step, const StepStats& stats, double seconds);
  void Validation(int64_t step, double loss) const;
  void Checkpointed(const std::string& path) const;
  void StopRequested(int64_t step) const;
  // The end-of-run lines after `step` steps; the timed figures.
  RunTiming Finish(int64_t step);

 private:
  const Config& config_;
  StepEngine& engine_;  // not const: the end-of-run hash reads paged parameters through it
  MetricsFile* metrics_;
  const RunReportOptions options_;
  double flops_per_token_ = 0;
  double peak_gflops_ = 0;
  int64_t start_step_ = 0;
  int64_t tokens_per_step_ = 0;          // over all replicas
  int64_t replica_tokens_per_step_ = 0;  // this replica's
  // The current logging interval and the timed steps.
  std::chrono::steady_clock::time_point run_start_, interval_start_;
  double interval_seconds_ = 0, interval_loss_ = 0, timed_seconds_ = 0;
  int64_t interval_steps_ = 0, timed_steps_ = 0;
  parallel::PipelineStepTiming pipeline_total_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_RUN_REPORT_H_
