// `shoal coordinator`: the gRPC server around CoordinatorCore. Authenticates every call (the
// job's token as `authorization: Bearer <token>` metadata, compared in constant time;
// UNAUTHENTICATED otherwise), serves TLS when given a certificate and key (plaintext clients are
// then refused by the handshake), caps message sizes, maps absl codes one-to-one onto gRPC's, and
// expires leases on a background thread. In swarm mode (options.swarm) the same service serves
// the swarm's calls (WatchRoster, LeaseMicroBatches, Commit, ReportPeer, PeerSynced, StageReport)
// and Join, Heartbeat, Leave, Drain and GetStatus for its peers and trainers.
#ifndef SHOAL_SCHEDULER_COORDINATOR_SERVICE_H_
#define SHOAL_SCHEDULER_COORDINATOR_SERVICE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "scheduler/coordinator_core.h"
#include "scheduler/swarm_coordinator.h"

namespace shoal::scheduler {

struct CoordinatorServerOptions {
  std::string listen = "127.0.0.1:0";  // HOST:PORT; port 0 picks a free one (see port())
  std::string token;                   // empty: no authentication
  std::string tls_cert_file;           // PEM; with tls_key_file, serve TLS only
  std::string tls_key_file;
  int max_message_bytes = 4 << 20;     // requests and responses
  CoordinatorOptions core;
  const Clock* clock = nullptr;        // null: the system clock
  // Swarm mode: every call goes to this swarm's coordinator (the core then serves nothing, and
  // `shoal train --coordinator` is refused); null: mesh mode, where the swarm calls are refused.
  std::shared_ptr<SwarmCoordinator> swarm;
};

class CoordinatorServer {
 public:
  // kInvalidArgument for a bad address or half a TLS pair (named), kNotFound/kInvalidArgument
  // for unreadable or malformed PEM files, kUnavailable when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const CoordinatorServerOptions& options);
  ~CoordinatorServer();  // shuts down

  int port() const;
  CoordinatorCore& core();
  SwarmCoordinator* swarm();  // null in mesh mode
  void Shutdown();   // idempotent; ends open watch streams
  void Wait();       // until Shutdown

  struct Impl;
 private:
  explicit CoordinatorServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_COORDINATOR_SERVICE_H_
