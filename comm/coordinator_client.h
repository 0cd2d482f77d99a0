// A worker's (and `shoal status`'s) connection to the coordinator over gRPC. Sends the job's
// token as `authorization: Bearer <token>` metadata; with a CA file, TLS only. Every call has a
// deadline; gRPC codes come back as the matching absl codes with the coordinator's message,
// prefixed by the call ("Join: ...").
#ifndef SHOAL_COMM_COORDINATOR_CLIENT_H_
#define SHOAL_COMM_COORDINATOR_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/coordinator.pb.h"

namespace shoal::comm {

struct CoordinatorClientOptions {
  std::string address;             // HOST:PORT
  std::string token;               // empty: none
  std::string tls_ca_file;         // PEM roots; empty: plaintext
  absl::Duration timeout = absl::Seconds(10);  // per call
  int max_message_bytes = 4 << 20;
};

class CoordinatorClient {
 public:
  // kInvalidArgument for an empty address; kNotFound for an unreadable CA file. Does not
  // connect yet (the first call does, within its deadline).
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Connect(
      const CoordinatorClientOptions& options);
  ~CoordinatorClient();

  absl::StatusOr<v1::JoinResponse> Join(const v1::JoinRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status Leave(const std::string& worker_id, const std::string& reason);
  absl::StatusOr<v1::ClusterStatus> GetStatus();
  absl::StatusOr<v1::Layout> Drain(const std::string& worker_id);
  absl::StatusOr<v1::Layout> Rebalance();

  // Median round trip of `rounds` empty pings, in ms.
  absl::StatusOr<double> MeasureRttMs(int rounds = 5);
  // Bandwidth to the coordinator from pings carrying `bytes` (<= 4 MB), in GB/s.
  absl::StatusOr<double> MeasureUploadGbps(int64_t bytes = 1 << 20, int rounds = 3);

  // Opens WatchAssignment and calls `on_assignment` for each assignment until it returns false,
  // the stream ends (the worker left or died: kFailedPrecondition from the coordinator) or
  // `timeout` passes (kDeadlineExceeded).
  absl::Status WatchAssignments(const std::string& worker_id,
                                const std::function<bool(const v1::Assignment&)>& on_assignment,
                                absl::Duration timeout);
  // The first assignment with version >= min_version (a layout exists once version >= 1).
  absl::StatusOr<v1::Assignment> WaitForAssignment(const std::string& worker_id,
                                                   uint64_t min_version, absl::Duration timeout);

  // Swarm mode (proto/coordinator.proto's swarm calls), each with the options' timeout.
  absl::StatusOr<v1::LeaseResponse> Lease(const v1::LeaseRequest& request);
  absl::Status Commit(const v1::CommitRequest& request);
  absl::StatusOr<v1::ReportPeerResponse> ReportPeer(const v1::ReportPeerRequest& request);
  absl::StatusOr<v1::PeerSyncedResponse> PeerSynced(const v1::PeerSyncedRequest& request);
  absl::StatusOr<v1::StageReportResponse> StageReport(const v1::StageReportRequest& request);
  absl::Status CheckpointSaved(const v1::CheckpointSavedRequest& request);
  // Opens WatchRoster and calls `on_roster` for each roster until it returns false, the stream
  // ends (the worker left or died: kFailedPrecondition) or `timeout` passes
  // (kDeadlineExceeded).
  absl::Status WatchRoster(const std::string& worker_id, uint64_t known_version,
                           const std::function<bool(const v1::SwarmRoster&)>& on_roster,
                           absl::Duration timeout);

  struct Impl;
 private:
  explicit CoordinatorClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::comm

#endif  // SHOAL_COMM_COORDINATOR_CLIENT_H_
