// The training loop of one worker: one process, a data-parallel rank, or a rank of a
// tensor x pipeline x data-parallel mesh. The step itself is a StepEngine
// (runtime/step_engine.h); what the run logs at its start and end is the RunReport
// (runtime/run_report.h).
//
// Trainer::Create builds everything in a fixed order: thread pools, the layout and its batch
// plan, data, the step engine, resume, metrics. Run() loops over steps, logs every
// train.log_every steps, evaluates every train.eval_every steps on a fixed validation set,
// checkpoints every checkpoint.every steps and at the end, and stops early (with a checkpoint)
// when *stop_requested turns true. Blocking; not thread-safe.
#ifndef SHOAL_RUNTIME_TRAINER_H_
#define SHOAL_RUNTIME_TRAINER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/layout.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/metrics.h"
#include "runtime/run_report.h"
#include "runtime/sampler.h"
#include "runtime/step_engine.h"
#include "runtime/token_file.h"

namespace shoal::runtime {

struct TrainOptions {
  bool resume = false;                 // continue from the newest valid checkpoint
  int64_t stop_after = 0;              // >0: stop (with a checkpoint) after this many steps
  bool bench = false;                  // no eval, no checkpoints, no metrics file
  int64_t bench_warmup_steps = 3;      // bench: steps excluded from the timing
  bool log = true;                     // print log lines to stderr (rank 0 only)
  // Mesh mode: every rank logs where its pipeline time went at the end (compute, waiting).
  bool log_all_ranks_summary = true;
  const std::atomic<bool>* stop_requested = nullptr;  // e.g. set by SIGTERM
  comm::Backend* backend = nullptr;    // the job's group (not owned); null: one process
  // The job's rendezvous store (this generation's namespace); needed for model parallelism,
  // whose groups are built on it (parallel/mesh.h).
  std::shared_ptr<comm::Store> store;
  // A layout that places this rank (the coordinator's): overrides parallel.tp / pp / stages and
  // the batch plan (its micro-batch size and this replica's micro-batch count replace
  // train.batch_size and train.grad_accum; replicas may have uneven counts, and the step is still
  // the mean over all of the step's micro-batches). One with tp = pp = 1 runs as plain data
  // parallelism. The job's ranks check it together (parallel::AgreeOnLayout).
  std::optional<parallel::Layout> layout;
  int nodes = 1;                       // hosts in the job, for MFU (each has the measured peak)
  int ranks_on_host = 1;               // ranks sharing this host's cores (thread plan)
  // A deliberate slow-down for heterogeneity tests (>= 1): after each step's compute the
  // trainer sleeps (throttle - 1) x that compute time, so this rank looks `throttle` times
  // slower (runtime/profiler.h, Throttle). Logged tokens/s and step times include the sleep.
  double throttle = 1.0;
  // Called on every rank after every step; must be cheap (copy the values and return).
  std::function<void(const StepReport&)> on_step;
};

struct TrainResult {
  int64_t first_step = 0;              // 0, or the resumed step
  int64_t last_step = 0;               // steps completed at the end
  std::vector<double> losses;          // per step run in this invocation
  double last_val_loss = -1;           // -1 if never evaluated
  double first_val_loss = -1;
  double tokens_per_s = 0;             // over the timed steps
  double step_time_ms = 0;
  double mfu = 0;
  double peak_gflops = 0;
  int omp_threads = 0;
  int blas_threads = 0;
  std::string checkpoint;              // last checkpoint written, if any
  bool stopped_early = false;
};

class Trainer {
 public:
  // Builds the whole worker. Errors: bad data (named file), a layout the ranks disagree on, an
  // engine that cannot be built; resuming with no valid checkpoint is NOT an error (it starts
  // fresh, logging the skipped ones).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const Config& config,
                                                          const TrainOptions& options);
  absl::StatusOr<TrainResult> Run();

  // Mean loss over the fixed validation set (a collective in mesh mode).
  absl::StatusOr<double> Evaluate();

  StepEngine& engine() { return *engine_; }

 private:
  Trainer(Config config, TrainOptions options) : config_(std::move(config)), options_(options) {}
  // This rank's layout (the coordinator's, or the config's) and its batch plan; a collective
  // over the job's group with a coordinator's layout.
  absl::Status TakeLayout(EngineContext* context);
  absl::Status Resume();
  // One step: sample this replica's micro-batches, run the engine, sleep out the throttle.
  absl::StatusOr<StepStats> TrainStep(int64_t step, Batches& micro, double* seconds);
  // Every rank must stop at the same step, so a stop request is agreed on collectively.
  absl::StatusOr<bool> StopAgreed();
  absl::Status EvaluateAndLog(int64_t step, TrainResult* result);
  absl::Status Checkpoint(int64_t step, TrainResult* result);
  absl::StatusOr<std::string> SaveCheckpoint(int64_t step);
  comm::CollectiveOptions Collective() const;

  const Config config_;
  TrainOptions options_;
  parallel::BatchPlan batch_;
  TokenDataset data_;
  std::unique_ptr<BatchSampler> train_sampler_;
  std::unique_ptr<BatchSampler> val_sampler_;
  std::unique_ptr<StepEngine> engine_;
  std::unique_ptr<CheckpointStore> checkpoints_;
  std::optional<MetricsFile> metrics_;
  std::unique_ptr<RunReport> report_;
  int64_t start_step_ = 0;
  double peak_gflops_ = 0;
  int omp_threads_ = 0, blas_threads_ = 0;
  int rank_ = 0, world_ = 1;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_TRAINER_H_
