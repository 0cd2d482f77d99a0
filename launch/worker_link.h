// A mesh-mode rank's link to the coordinator, for the life of `shoal train --coordinator ...`.
//
// Start() profiles the device (runtime/profiler.h; ranks sharing a host take turns, so the first
// one measures and the others read its cache), measures the round trip and upload bandwidth to
// the coordinator, joins with the profile and the job (from the config; while an earlier run of
// the job still holds the coordinator, the join is retried until the timeout), waits for its
// assignment in the first layout and checks that it places every rank of the job (tp x pp x dp =
// the world size, this rank inside the mesh); the trainer then builds that mesh and follows the
// layout's batch plan (micro-batch size, and each replica's share of the job's global batch). The job spec
// lets the solver use tensor and pipeline parallelism up to parallel.tp and parallel.pp. Then a background thread sends a heartbeat
// with the latest step statistics every heartbeat interval:
//   - coordinator unreachable: a warning (at most once a minute) and training goes on;
//   - the coordinator no longer knows the worker (it restarted, or a stall outlasted the lease):
//     it joins again, naming the layout it trains with, so a coordinator that has moved on to
//     another job refuses it (a warning; training goes on) instead of mixing it in;
//   - the coordinator says drain: the stop flag is set, so the trainer checkpoints and exits at
//     the next step as on SIGTERM (every rank agrees on the stop collectively).
// Close() (and the destructor) stops the heartbeats and says goodbye (Leave, short deadline,
// best effort).
//
// Thread safety: OnStep() may be called from the training thread while the heartbeat thread
// runs; the other methods from one thread.
#ifndef SHOAL_LAUNCH_WORKER_LINK_H_
#define SHOAL_LAUNCH_WORKER_LINK_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend.h"
#include "launch/env.h"
#include "parallel/layout.h"
#include "proto/coordinator.pb.h"
#include "runtime/config.h"
#include "runtime/run_report.h"

namespace shoal::launch {

struct WorkerLinkOptions {
  std::string coordinator;          // HOST:PORT of `shoal coordinator`
  std::string token_file;           // the job's token (first line); empty: none
  std::string tls_ca_file;          // PEM roots: TLS to the coordinator; empty: plaintext
  double throttle = 1.0;            // this rank's deliberate slow-down, reported in its profile
  // Bound on reaching the coordinator, joining and receiving the first layout (which waits for
  // every rank of the job to join).
  absl::Duration timeout = absl::Seconds(60);
  std::string disk_path = ".";      // the disk tier's folder, for the profile
};

class WorkerLink {
 public:
  // `group`: the data-parallel group (not owned; null for one process), used only to take turns
  // profiling. `stop`: set when the coordinator drains this worker (not owned; may be null).
  // Errors, each naming the coordinator: kInvalidArgument (bad option, token file), kNotFound
  // (token or CA file missing), kUnauthenticated (wrong token), kUnavailable or
  // kDeadlineExceeded (no coordinator within the timeout, no layout within it),
  // kFailedPrecondition (the coordinator refuses the job, or assigns a layout this trainer
  // cannot run: the message says why).
  static absl::StatusOr<std::unique_ptr<WorkerLink>> Start(const WorkerLinkOptions& options,
                                                           const runtime::Config& config,
                                                           const DistributedEnv& env,
                                                           comm::Backend* group,
                                                           std::atomic<bool>* stop);
  ~WorkerLink();

  // Records the step for the next heartbeat. Cheap: copies and returns.
  void OnStep(const runtime::StepReport& report);

  // Stops the heartbeats and leaves (deadline 2 s; a failure is only logged). Idempotent.
  void Close(const std::string& reason);

  const std::string& worker_id() const;
  const v1::Assignment& assignment() const;
  // The assignment as the trainer's layout (LayoutOf).
  parallel::Layout layout() const;
  const v1::DeviceProfile& profile() const;
  // True once the coordinator asked this worker to drain.
  bool drained() const;

  struct Impl;

 private:
  explicit WorkerLink(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The JobSpec a trainer with `config` on `world_size` ranks sends: name from the config file,
// ModelSpec from [model] with fp32 AdamW bytes per parameter (4, 4, 8), global batch =
// batch_size x grad_accum x world_size, expected workers = world_size, max tp = max pp = 1 (no
// pipeline or tensor parallelism in the trainer yet), largest micro-batch = batch_size.
v1::JobSpec JobSpecFor(const runtime::Config& config, int world_size);

// The assignment as a layout: launch/ only converts; parallel::Layout checks.
parallel::Layout LayoutOf(const v1::Assignment& a);
// kFailedPrecondition unless `a` places this worker in a layout a trainer of a model of
// `n_layer` blocks can run on `world_size` ranks (Layout::Validate says why not).
absl::Status CheckAssignment(const v1::Assignment& a, int world_size, int n_layer);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_WORKER_LINK_H_
