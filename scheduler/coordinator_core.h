// The coordinator's state machine, free of any transport: membership with leases, the job's
// spec, the current layout and every worker's assignment, step statistics and their history.
// The gRPC service (coordinator_service.h), the simulator and the fuzz target drive the same
// object; time comes from a Clock, so the simulator runs it on a virtual one. Thread-safe.
//
// Membership: Join validates the request (validate.h) and admits the worker; the first Join fixes
// the job spec and later ones must match it. A worker is alive while heartbeats keep its lease
// (lease_ms after the last); ExpireLeases() marks the rest dead. Draining workers are left out of
// the next layout. The layout is re-solved whenever the set of usable workers changes (once at
// least job.expected_workers have joined), and by Rebalance().
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
};

class CoordinatorCore {
 public:
  CoordinatorCore(const CoordinatorOptions& options, const Clock* clock);
  ~CoordinatorCore();
  CoordinatorCore(const CoordinatorCore&) = delete;
  CoordinatorCore& operator=(const CoordinatorCore&) = delete;

  // kInvalidArgument (named field), kFailedPrecondition (protocol version, job spec differs from
  // the job's), kAlreadyExists (a live worker has this name).
  absl::StatusOr<v1::JoinResponse> Join(const v1::JoinRequest& request);
  // kNotFound (unknown id), kFailedPrecondition (lease expired or left: join again).
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status Leave(const v1::LeaveRequest& request);
  absl::StatusOr<v1::Layout> Drain(const std::string& worker_id);
  // Solves again now (with the measured step times folded into the device speeds).
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

 private:
  struct State;
  CoordinatorOptions options_;
  const Clock* clock_;
  State* state_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_COORDINATOR_CORE_H_
