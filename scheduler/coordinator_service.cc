#include "scheduler/coordinator_service.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/net_util.h"
#include "common/auth_token.h"
#include "common/status.h"
#include "proto/coordinator.grpc.pb.h"

namespace shoal::scheduler {
namespace {

// absl's codes are gRPC's, number for number (both follow google.rpc.Code).
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// Equal strings in time that depends only on their lengths, so a token cannot be guessed byte by
std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no PEM block found";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

// The certificate chain and key as PEM text, checked to parse and to belong together, so a bad
// file is named here rather than surfacing as a bare "failed to start" from gRPC.
absl::Status CheckTlsPair(const std::string& cert_file, const std::string& cert_pem,
                          const std::string& key_file, const std::string& key_pem) {
  BIO* cert_bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
  BIO_free(cert_bio);
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls-cert ", cert_file, " is not a PEM certificate (", OpenSslError(), ")"));
  }
  BIO* key_bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, nullptr, nullptr);
  BIO_free(key_bio);
  if (key == nullptr) {
    X509_free(cert);
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls-key ", key_file, " is not an unencrypted PEM private key (", OpenSslError(), ")"));
  }
  const bool match = X509_check_private_key(cert, key) == 1;
  ERR_clear_error();
  EVP_PKEY_free(key);
  X509_free(cert);
  if (!match) {
    return absl::InvalidArgumentError(absl::StrCat("--tls-key ", key_file,
                                                   " does not belong to --tls-cert ", cert_file));
  }
  return absl::OkStatus();
}

// Heartbeat, the one call every worker makes every few seconds, uses gRPC's callback API: it runs
// on the library's own threads without a hand-off to a synchronous-server thread per call.
// `shoal bench coordinator` on one core: 37-41k heartbeats/s (42-44k per CPU-second) against
// 20-22k/s (21-23k per CPU-second) with the synchronous API. The other calls stay synchronous:
// WatchAssignment blocks by design, and the rest are rare.
class CoordinatorServiceImpl final
    : public v1::Coordinator::WithCallbackMethod_Heartbeat<v1::Coordinator::Service> {
 public:
  CoordinatorServiceImpl(CoordinatorCore* core, SwarmCoordinator* swarm, std::string token,
                         const std::atomic<bool>* stopping)
      : core_(core),
        swarm_(swarm),
        expected_(token.empty() ? "" : "Bearer " + token),
        stopping_(stopping) {}

  grpc::Status Join(grpc::ServerContext* ctx, const v1::JoinRequest* request,
                    v1::JoinResponse* response) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (swarm_ == nullptr && request->role() != v1::WORKER_ROLE_MESH) {
      core_->CountRejected();
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this coordinator runs a mesh job (`shoal train --coordinator`); a "
                          "swarm's peers and trainers join a coordinator started with --swarm");
    }
    absl::StatusOr<v1::JoinResponse> r =
        swarm_ != nullptr ? swarm_->Join(*request) : core_->Join(*request);
    if (!r.ok()) return ToGrpc(r.status());
    *response = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    grpc::Status status = Authenticate(ctx);
    if (status.ok()) {
      absl::StatusOr<v1::HeartbeatResponse> r =
          swarm_ != nullptr ? swarm_->Heartbeat(*request) : core_->Heartbeat(*request);
      if (r.ok()) {
        *response = *std::move(r);
      } else {
        status = ToGrpc(r.status());
      }
    }
    reactor->Finish(status);
    return reactor;
  }

  // Sends the assignment as it is, then each change (a new version, or the drain flag) until the
  // worker leaves or dies (the core's kFailedPrecondition ends the stream), the client goes away
  // or the server stops. The 500 ms wait bounds how long a cancelled stream holds its thread.
  grpc::Status WatchAssignment(grpc::ServerContext* ctx,
                               const v1::WatchAssignmentRequest* request,
                               grpc::ServerWriter<v1::Assignment>* writer) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (swarm_ != nullptr) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this coordinator runs a swarm: watch the roster (WatchRoster)");
    }
    if (absl::Status v = ValidateWorkerId(request->worker_id(), "worker_id",
                                          core_->options().limits);
        !v.ok()) {
      core_->CountRejected();
      return ToGrpc(v);
    }
    absl::StatusOr<v1::Assignment> current = core_->WaitAssignment(
        request->worker_id(), std::numeric_limits<uint64_t>::max(), absl::ZeroDuration());
    if (!current.ok()) return ToGrpc(current.status());
    if (!writer->Write(*current)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
    uint64_t known = current->version();
    bool drain = current->drain();
    while (!ctx->IsCancelled() && !stopping_->load()) {
      absl::StatusOr<v1::Assignment> next =
          core_->WaitAssignment(request->worker_id(), known, absl::Milliseconds(500));
      if (!next.ok()) return ToGrpc(next.status());
      if (next->version() == known && next->drain() == drain) continue;
      known = next->version();
      drain = next->drain();
      if (!writer->Write(*next)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
    }
    if (stopping_->load()) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled");
  }

  grpc::Status Leave(grpc::ServerContext* ctx, const v1::LeaveRequest* request,
                     v1::LeaveResponse*) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    return ToGrpc(swarm_ != nullptr ? swarm_->Leave(*request) : core_->Leave(*request));
  }

  grpc::Status GetStatus(grpc::ServerContext* ctx, const v1::GetStatusRequest*,
                         v1::ClusterStatus* response) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    *response = swarm_ != nullptr ? swarm_->Status() : core_->Status();
    return grpc::Status::OK;
  }

  grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* request,
                     v1::DrainResponse* response) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (swarm_ != nullptr) return ToGrpc(swarm_->Drain(request->worker_id()));
    absl::StatusOr<v1::Layout> r = core_->Drain(request->worker_id());
    if (!r.ok()) return ToGrpc(r.status());
    *response->mutable_layout() = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::Status Rebalance(grpc::ServerContext* ctx, const v1::RebalanceRequest*,
                         v1::RebalanceResponse* response) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (swarm_ != nullptr) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "a swarm has no layout to rebalance: its stages fill as peers join");
    }
    absl::StatusOr<v1::Layout> r = core_->Rebalance();
    if (!r.ok()) return ToGrpc(r.status());
    *response->mutable_layout() = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::Status Ping(grpc::ServerContext* ctx, const v1::PingRequest* request,
                    v1::PingResponse* response) override {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (absl::Status v = ValidatePing(*request, core_->options().limits); !v.ok()) {
      core_->CountRejected();
      return ToGrpc(v);
    }
    response->set_server_unix_ms(SystemClock::Get()->NowUnixMs());
    response->set_payload_bytes(static_cast<int64_t>(request->payload().size()));
    return grpc::Status::OK;
  }

  // --- Swarm mode ---------------------------------------------------------------------------

  // As WatchAssignment: the roster now, then every new version, until the worker leaves or dies,
  // the client goes away or the server stops.
  grpc::Status WatchRoster(grpc::ServerContext* ctx, const v1::WatchRosterRequest* request,
                           grpc::ServerWriter<v1::SwarmRoster>* writer) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    uint64_t known = request->known_version();
    while (!ctx->IsCancelled() && !stopping_->load()) {
      absl::StatusOr<v1::SwarmRoster> next =
          swarm_->WaitRoster(request->worker_id(), known, absl::Milliseconds(500));
      if (!next.ok()) return ToGrpc(next.status());
      if (next->version() == known) continue;
      known = next->version();
      if (!writer->Write(*next)) break;
    }
    if (stopping_->load()) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
    }
    // The client went away: a peer killed with it is fenced now, not when a call to it fails.
    swarm_->WatchEnded(request->worker_id());
    return grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled");
  }

  grpc::Status LeaseMicroBatches(grpc::ServerContext* ctx, const v1::LeaseRequest* request,
                                 v1::LeaseResponse* response) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return Answer(swarm_->Lease(*request), response);
  }

  grpc::Status Commit(grpc::ServerContext* ctx, const v1::CommitRequest* request,
                      v1::CommitResponse*) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return ToGrpc(swarm_->Commit(*request));
  }

  grpc::Status ReportPeer(grpc::ServerContext* ctx, const v1::ReportPeerRequest* request,
                          v1::ReportPeerResponse* response) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return Answer(swarm_->ReportPeer(*request), response);
  }

  grpc::Status PeerSynced(grpc::ServerContext* ctx, const v1::PeerSyncedRequest* request,
                          v1::PeerSyncedResponse* response) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return Answer(swarm_->PeerSynced(*request), response);
  }

  grpc::Status StageReport(grpc::ServerContext* ctx, const v1::StageReportRequest* request,
                           v1::StageReportResponse* response) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return Answer(swarm_->StageReport(*request), response);
  }

  grpc::Status CheckpointSaved(grpc::ServerContext* ctx, const v1::CheckpointSavedRequest* request,
                               v1::CheckpointSavedResponse*) override {
    if (grpc::Status a = CheckSwarm(ctx); !a.ok()) return a;
    return ToGrpc(swarm_->CheckpointSaved(*request));
  }

 private:
  template <typename T>
  static grpc::Status Answer(absl::StatusOr<T> r, T* response) {
    if (!r.ok()) return ToGrpc(r.status());
    *response = *std::move(r);
    return grpc::Status::OK;
  }

  grpc::Status CheckSwarm(grpc::ServerContextBase* ctx) {
    if (grpc::Status a = Authenticate(ctx); !a.ok()) return a;
    if (swarm_ == nullptr) {
      core_->CountRejected();
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this coordinator runs a mesh job, not a swarm (start it with --swarm)");
    }
    return grpc::Status::OK;
  }

  grpc::Status Authenticate(grpc::ServerContextBase* ctx) {
    if (expected_.empty()) return grpc::Status::OK;
    const auto& md = ctx->client_metadata();
    auto it = md.find("authorization");
    if (it != md.end() &&
        ConstantTimeEquals(std::string(it->second.data(), it->second.size()), expected_)) {
      return grpc::Status::OK;
    }
    if (swarm_ != nullptr) {
      swarm_->CountRejected();
    } else {
      core_->CountRejected();
    }
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        it == md.end() ? "missing authorization metadata (Bearer token)"
                                       : "wrong token");
  }

  CoordinatorCore* core_;
  SwarmCoordinator* swarm_;  // null: mesh mode
  const std::string expected_;  // "Bearer <token>", empty: no authentication
  const std::atomic<bool>* stopping_;
};

}  // namespace

struct CoordinatorServer::Impl {
  std::unique_ptr<CoordinatorCore> core;
  std::shared_ptr<SwarmCoordinator> swarm;
  std::unique_ptr<CoordinatorServiceImpl> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::atomic<bool> stopping{false};

  // The lease sweeper.
  absl::Mutex mu;
  bool stop_sweeper = false;
  bool shut_down = false;
  std::thread sweeper;

  void Sweep(int64_t period_ms) {
    absl::MutexLock lock(&mu);
    while (!stop_sweeper) {
      mu.AwaitWithTimeout(absl::Condition(&stop_sweeper), absl::Milliseconds(period_ms));
      if (stop_sweeper) break;
      mu.Unlock();
      core->ExpireLeases();
      if (swarm != nullptr) {
        swarm->ExpireLeases();
        swarm->Rebalance();
      }
      mu.Lock();
    }
  }
};

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const CoordinatorServerOptions& options) {
  {
    std::string host;
    int port = 0;
    SHOAL_RETURN_IF_ERROR(SplitHostPort(options.listen, "--listen", 0, &host, &port));
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(options.tls_cert_file.empty()
                                          ? "--tls-key needs --tls-cert (the certificate chain)"
                                          : "--tls-cert needs --tls-key (its private key)");
  }
  if (options.max_message_bytes < 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes must be >= 1024, got ", options.max_message_bytes));
  }
  const CoordinatorOptions& co = options.core;
  if (co.lease_ms <= 0 || co.heartbeat_interval_ms <= 0 || co.heartbeat_interval_ms > co.lease_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "need 0 < heartbeat interval <= lease; got heartbeat ", co.heartbeat_interval_ms,
        " ms, lease ", co.lease_ms, " ms"));
  }
  for (unsigned char c : options.token) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("the token must be printable ASCII");
    }
  }

  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  const bool tls = !options.tls_cert_file.empty();
  if (tls) {
    absl::StatusOr<std::string> cert = ReadFileToString(options.tls_cert_file);
    if (!cert.ok()) {
      return absl::NotFoundError(absl::StrCat("cannot read --tls-cert ", options.tls_cert_file,
                                              ": ", cert.status().message()));
    }
    absl::StatusOr<std::string> key = ReadFileToString(options.tls_key_file);
    if (!key.ok()) {
      return absl::NotFoundError(absl::StrCat("cannot read --tls-key ", options.tls_key_file,
                                              ": ", key.status().message()));
    }
    SHOAL_RETURN_IF_ERROR(CheckTlsPair(options.tls_cert_file, *cert, options.tls_key_file, *key));
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    credentials = grpc::SslServerCredentials(ssl);
  }

  auto impl = std::make_unique<Impl>();
  impl->core = std::make_unique<CoordinatorCore>(
      options.core, options.clock != nullptr ? options.clock : SystemClock::Get());
  impl->swarm = options.swarm;
  impl->service = std::make_unique<CoordinatorServiceImpl>(impl->core.get(), impl->swarm.get(),
                                                           options.token, &impl->stopping);
  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default, which would let a second coordinator bind the same port
  // and take half the connections; a busy port must be an error.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(options.listen, credentials, &impl->port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen, " (address in use or not local?)"));
  }
  int64_t period = std::max<int64_t>(1, options.core.lease_ms / 4);
  if (options.swarm != nullptr) {
    period = std::max<int64_t>(1, std::min(period, options.swarm->options().lease_ms / 4));
  }
  Impl* raw = impl.get();
  impl->sweeper = std::thread([raw, period] { raw->Sweep(period); });
  SHOAL_LOG(Debug) << "coordinator: gRPC on port " << impl->port << (tls ? " (tls)" : "");
  return std::unique_ptr<CoordinatorServer>(new CoordinatorServer(std::move(impl)));
}

CoordinatorServer::CoordinatorServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

int CoordinatorServer::port() const { return impl_->port; }

CoordinatorCore& CoordinatorServer::core() { return *impl_->core; }

SwarmCoordinator* CoordinatorServer::swarm() { return impl_->swarm.get(); }

void CoordinatorServer::Shutdown() {
  {
    absl::MutexLock lock(&impl_->mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
    impl_->stop_sweeper = true;
  }
  // Watch streams see `stopping` within their 500 ms wait; the deadline cancels whatever is
  // still running after it, so shutdown never hangs on a client.
  impl_->stopping = true;
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  if (impl_->sweeper.joinable()) impl_->sweeper.join();
}

void CoordinatorServer::Wait() {
  impl_->server->Wait();
}

}  // namespace shoal::scheduler
