// The coordinator's state machine, free of any transport: membership with leases, the job's
// spec, the current layout and every worker's assignment, step statistics and their history.
// The gRPC service (coordinator_service.h), the simulator and the fuzz target drive the same
// object; time comes from a Clock, so the simulator runs it on a virtual one. Thread-safe.
//
// Membership: Join validates the request (validate.h) and admits the worker; the Join that
// begins a job fixes its spec and later ones must match it. A worker is alive while heartbeats
// keep its lease (lease_ms after the last); ExpireLeases() marks the rest dead. Draining workers
// are left out of the next layout. The layout is re-solved whenever the set of usable workers
// changes (once at least job.expected_workers have joined), and by Rebalance().
//
// Jobs: the coordinator outlives them. A job is over once none of its workers is live (each has
// left, or its lease has run out); the next fresh Join (running_layout_version 0) begins the next
// job, with that Join's spec. The old job's workers stay in the status as left or dead, its
// layout is retired (the status keeps its version with no placements, health "degraded", until
// the new job's first layout), the job statistics start over, and the new job's first layout is
// solved once its job.expected_workers have joined, with the next version: versions increase
// across jobs and are never reused. A job is never mixed with workers of another:
//   - while a worker of the current job is live, a Join with another spec is refused
//     (kFailedPrecondition naming the live workers);
//   - in a fixed world (job.place_all) that has its layout, a fresh Join is a new run of the job
//     (the trainers keep their mesh until they restart): kUnavailable naming the live workers
//     until they have left or expired (the worker link retries until its timeout);
//   - a worker that comes back (running_layout_version > 0) with a layout of a job that has
//     ended is refused (kFailedPrecondition); one with a layout of the current job resumes it,
//     even after all its workers were gone (the coordinator restarted, or a stall outlasted
//     every lease).
//
// Worker ids: the request's `name` if given; else "rank<N>" for mesh rank N (a new Join with that
// rank replaces the old worker: the launcher restarted it; but see Jobs for a fixed world that
// has its layout); else "w<N>". Dead and departed workers stay in the status (at most 1024 of
// them, oldest dropped first).
//
// Solving runs outside the lock, so heartbeats go on during a long solve. When one caller is
// solving, others that change membership return at once and the solving caller solves again
// afterwards (a burst of joins costs a few solves); Drain and Rebalance wait for the layout. With
// one thread (the simulator, the tests) every call that changes membership returns with the
// layout already re-solved.
//
// Job statistics (Status().job_status): step = the largest step a placed worker reported; loss =
// the mean, over replicas, of the loss at that step reported by each replica's last-stage tp-rank-0
// worker; tokens_per_s = the sum over replicas of the tokens/s reported by each replica's
// first-stage tp-rank-0 worker (a worker reports its replica's throughput). One history point per
// new step, updated as the replicas report it.
#ifndef SHOAL_SCHEDULER_COORDINATOR_CORE_H_
#define SHOAL_SCHEDULER_COORDINATOR_CORE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/coordinator.pb.h"
#include "scheduler/clock.h"
#include "scheduler/layout_solver.h"
#include "scheduler/validate.h"

namespace shoal::scheduler {

struct CoordinatorOptions {
  int64_t lease_ms = 10000;
  int64_t heartbeat_interval_ms = 2000;
  int history_points = 2000;           // loss/throughput points kept for the dashboard
  SolverOptions solver;
  ValidationLimits limits;
  std::string version = "0.1.0";       // reported in the status
  bool log_events = false;             // log joins, leaves, expiries and new layouts (a server)
  // A layout change stops training for a restart, so while every worker the current layout
  // places is still alive, a new solve (after a join, or a non-placed worker's departure) replaces
  // it only if it predicts at least this fraction more tokens/s. 0: always take the new one.
  // Failures, drains and Rebalance always install the new layout.
  double relayout_min_gain = 0;
};

class CoordinatorCore {
 public:
  CoordinatorCore(const CoordinatorOptions& options, const Clock* clock);
  ~CoordinatorCore();
  CoordinatorCore(const CoordinatorCore&) = delete;
  CoordinatorCore& operator=(const CoordinatorCore&) = delete;

  // kInvalidArgument (named field), kFailedPrecondition (protocol version, job spec differs from
  // the running job's, a worker of a job that has ended), kUnavailable (a fresh rank of a fixed
  // world while the laid-out run of it is still live: try again later), kAlreadyExists (a live
  // worker has this name), kResourceExhausted (max_workers live workers).
  absl::StatusOr<v1::JoinResponse> Join(const v1::JoinRequest& request);
  // kNotFound (unknown id), kFailedPrecondition (lease expired or left: join again).
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // kNotFound (unknown id). Leaving twice, or after the lease expired, is not an error.
  absl::Status Leave(const v1::LeaveRequest& request);
  // Marks the worker DRAINING (its assignment and heartbeats say drain=true) and re-solves
  // without it; returns the layout after that solve (the previous one if the solve could not
  // run or failed). kNotFound (unknown id), kFailedPrecondition (dead or left).
  absl::StatusOr<v1::Layout> Drain(const std::string& worker_id);
  // Solves again now, with the measured step times folded into the device speeds: each placed
  // worker whose latest heartbeat carried stats.step_time_s > 0 gets its speed factor multiplied
  // by (its placement's predicted_compute_s) / (the measured step_time_s), clamped to
  // [0.01, 100], and every later solve scales that worker's fp32/bf16 rates by the factor. A
  // straggler thus gets fewer layers; a worker without measurements keeps its factor (1 at
  // first). Blocks until the solve is done. kFailedPrecondition while fewer than
  // job.expected_workers are usable (or none); the solver's error if the solve fails (the
  // previous layout stays).
  absl::StatusOr<v1::Layout> Rebalance();
  v1::ClusterStatus Status() const;

  // The worker's assignment: at once if its version differs from `known_version`, else when it
  // changes or after `timeout`, whichever is first. kNotFound for an unknown worker;
  // kFailedPrecondition once it is dead or has left (a watch stream ends there).
  absl::StatusOr<v1::Assignment> WaitAssignment(const std::string& worker_id,
                                                uint64_t known_version, absl::Duration timeout);

  // Marks workers whose lease ran out as dead (re-solving if that changes the usable set).
  // Returns how many. The server calls it periodically; the simulator after moving its clock.
  int ExpireLeases();

  // Counts a request refused before it reached the core (authentication, validation).
  void CountRejected();

  const CoordinatorOptions& options() const { return options_; }

  struct State;  // opaque: defined in coordinator_core.cc
 private:
  CoordinatorOptions options_;
  const Clock* clock_;
  State* state_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_COORDINATOR_CORE_H_
