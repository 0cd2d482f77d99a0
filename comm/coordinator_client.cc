#include "comm/coordinator_client.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "comm/grpc_util.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "proto/coordinator.grpc.pb.h"

namespace shoal::comm {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

struct CoordinatorClient::Impl {
  CoordinatorClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Coordinator::Stub> stub;

  // A context for one call: its deadline and the token.
  void Prepare(grpc::ClientContext* ctx, absl::Duration timeout) const {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    AddBearer(ctx, options.token);
  }

  absl::StatusOr<v1::PingResponse> Ping(int64_t bytes) {
    v1::PingRequest request;
    request.mutable_payload()->resize(static_cast<size_t>(bytes), '\x5a');
    v1::PingResponse response;
    grpc::ClientContext ctx;
    Prepare(&ctx, options.timeout);
    absl::Status s = FromGrpc("Ping", stub->Ping(&ctx, request, &response));
    if (!s.ok()) return s;
    return response;
  }
};

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Connect(
    const CoordinatorClientOptions& options) {
  if (options.address.empty()) {
    return absl::InvalidArgumentError("the coordinator address (HOST:PORT) is empty");
  }
  // gRPC would take "host:" or "host:0" and fail only at the first call's deadline, as if the
  // coordinator were down: say what is wrong with the address instead.
  {
    std::string host;
    int port = 0;
    SHOAL_RETURN_IF_ERROR(SplitHostPort(options.address, "the coordinator address", 1, &host,
                                        &port));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the coordinator call timeout must be > 0");
  }
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                         ClientCredentials(options.tls_ca_file, "the CA file"));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->channel = grpc::CreateCustomChannel(options.address, credentials, args);
  impl->stub = v1::Coordinator::NewStub(impl->channel);
  return std::unique_ptr<CoordinatorClient>(new CoordinatorClient(std::move(impl)));
}

CoordinatorClient::CoordinatorClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorClient::~CoordinatorClient() = default;

absl::StatusOr<v1::JoinResponse> CoordinatorClient::Join(const v1::JoinRequest& request) {
  v1::JoinResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s = FromGrpc("Join", impl_->stub->Join(&ctx, request, &response));
  if (!s.ok()) return s;
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> CoordinatorClient::Heartbeat(
    const v1::HeartbeatRequest& request) {
  v1::HeartbeatResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s = FromGrpc("Heartbeat", impl_->stub->Heartbeat(&ctx, request, &response));
  if (!s.ok()) return s;
  return response;
}

absl::Status CoordinatorClient::Leave(const std::string& worker_id, const std::string& reason) {
  v1::LeaveRequest request;
  request.set_worker_id(worker_id);
  request.set_reason(reason);
  v1::LeaveResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  return FromGrpc("Leave", impl_->stub->Leave(&ctx, request, &response));
}

absl::StatusOr<v1::ClusterStatus> CoordinatorClient::GetStatus() {
  v1::ClusterStatus response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s =
      FromGrpc("GetStatus", impl_->stub->GetStatus(&ctx, v1::GetStatusRequest(), &response));
  if (!s.ok()) return s;
  return response;
}

absl::StatusOr<v1::Layout> CoordinatorClient::Drain(const std::string& worker_id) {
  v1::DrainRequest request;
  request.set_worker_id(worker_id);
  v1::DrainResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s = FromGrpc("Drain", impl_->stub->Drain(&ctx, request, &response));
  if (!s.ok()) return s;
  return response.layout();
}

absl::StatusOr<v1::Layout> CoordinatorClient::Rebalance() {
  v1::RebalanceResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s =
      FromGrpc("Rebalance", impl_->stub->Rebalance(&ctx, v1::RebalanceRequest(), &response));
  if (!s.ok()) return s;
  return response.layout();
}

absl::StatusOr<double> CoordinatorClient::MeasureRttMs(int rounds) {
  if (rounds < 1 || rounds > 1000) {
    return absl::InvalidArgumentError(absl::StrCat("rounds must be in [1, 1000], got ", rounds));
  }
  std::vector<double> ms;
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::PingResponse> r = impl_->Ping(0);
    if (!r.ok()) return r.status();
    ms.push_back(SecondsSince(t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

absl::StatusOr<double> CoordinatorClient::MeasureUploadGbps(int64_t bytes, int rounds) {
  // The payload and the message's framing must fit the size limit on both ends.
  const int64_t limit =
      std::min<int64_t>(int64_t{4} << 20, impl_->options.max_message_bytes - 1024);
  if (bytes < 1 || bytes > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("upload probe bytes must be in [1, ", limit, "], got ", bytes));
  }
  if (rounds < 1 || rounds > 100) {
    return absl::InvalidArgumentError(absl::StrCat("rounds must be in [1, 100], got ", rounds));
  }
  // The empty round trip is subtracted, so what remains is the time to move the bytes.
  absl::StatusOr<double> rtt_ms = MeasureRttMs(3);
  if (!rtt_ms.ok()) return rtt_ms.status();
  double best = 1e30;
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::PingResponse> r = impl_->Ping(bytes);
    if (!r.ok()) return r.status();
    if (r->payload_bytes() != bytes) {
      return absl::DataLossError(absl::StrCat("Ping: the coordinator counted ",
                                              r->payload_bytes(), " bytes of ", bytes, " sent"));
    }
    best = std::min(best, SecondsSince(t0));
  }
  const double transfer_s = std::max(best - *rtt_ms / 1e3, best * 0.05);
  return static_cast<double>(bytes) / transfer_s / 1e9;
}

absl::Status CoordinatorClient::WatchAssignments(
    const std::string& worker_id, const std::function<bool(const v1::Assignment&)>& on_assignment,
    absl::Duration timeout) {
  v1::WatchAssignmentRequest request;
  request.set_worker_id(worker_id);
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, timeout);
  std::unique_ptr<grpc::ClientReader<v1::Assignment>> reader =
      impl_->stub->WatchAssignment(&ctx, request);
  v1::Assignment assignment;
  bool stopped = false;
  while (reader->Read(&assignment)) {
    if (!on_assignment(assignment)) {
      stopped = true;
      ctx.TryCancel();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (stopped) return absl::OkStatus();
  if (status.ok()) {
    return absl::UnavailableError("WatchAssignment: the coordinator ended the stream");
  }
  return FromGrpc("WatchAssignment", status);
}

absl::StatusOr<v1::Assignment> CoordinatorClient::WaitForAssignment(const std::string& worker_id,
                                                                    uint64_t min_version,
                                                                    absl::Duration timeout) {
  v1::Assignment found;
  bool have = false;
  absl::Status s = WatchAssignments(
      worker_id,
      [&](const v1::Assignment& a) {
        if (a.version() < min_version) return true;
        found = a;
        have = true;
        return false;
      },
      timeout);
  if (!s.ok()) return s;
  if (!have) return absl::UnavailableError("WatchAssignment: the stream ended without one");
  return found;
}

#define SHOAL_SWARM_UNARY(Name, Request, Response)                                   \
  absl::StatusOr<v1::Response> CoordinatorClient::Name(const v1::Request& request) { \
    v1::Response response;                                                          \
    grpc::ClientContext ctx;                                                        \
    impl_->Prepare(&ctx, impl_->options.timeout);                                   \
    absl::Status s = FromGrpc(#Name, impl_->stub->Name(&ctx, request, &response));  \
    if (!s.ok()) return s;                                                          \
    return response;                                                                \
  }

absl::StatusOr<v1::LeaseResponse> CoordinatorClient::Lease(const v1::LeaseRequest& request) {
  v1::LeaseResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  absl::Status s =
      FromGrpc("LeaseMicroBatches", impl_->stub->LeaseMicroBatches(&ctx, request, &response));
  if (!s.ok()) return s;
  return response;
}

absl::Status CoordinatorClient::Commit(const v1::CommitRequest& request) {
  v1::CommitResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  return FromGrpc("Commit", impl_->stub->Commit(&ctx, request, &response));
}

absl::Status CoordinatorClient::CheckpointSaved(const v1::CheckpointSavedRequest& request) {
  v1::CheckpointSavedResponse response;
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, impl_->options.timeout);
  return FromGrpc("CheckpointSaved", impl_->stub->CheckpointSaved(&ctx, request, &response));
}

SHOAL_SWARM_UNARY(ReportPeer, ReportPeerRequest, ReportPeerResponse)
SHOAL_SWARM_UNARY(PeerSynced, PeerSyncedRequest, PeerSyncedResponse)
SHOAL_SWARM_UNARY(StageReport, StageReportRequest, StageReportResponse)
#undef SHOAL_SWARM_UNARY

absl::Status CoordinatorClient::WatchRoster(
    const std::string& worker_id, uint64_t known_version,
    const std::function<bool(const v1::SwarmRoster&)>& on_roster, absl::Duration timeout) {
  v1::WatchRosterRequest request;
  request.set_worker_id(worker_id);
  request.set_known_version(known_version);
  grpc::ClientContext ctx;
  impl_->Prepare(&ctx, timeout);
  std::unique_ptr<grpc::ClientReader<v1::SwarmRoster>> reader =
      impl_->stub->WatchRoster(&ctx, request);
  v1::SwarmRoster roster;
  bool stopped = false;
  while (reader->Read(&roster)) {
    if (!on_roster(roster)) {
      stopped = true;
      ctx.TryCancel();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (stopped) return absl::OkStatus();
  if (status.ok()) return absl::UnavailableError("WatchRoster: the coordinator ended the stream");
  return FromGrpc("WatchRoster", status);
}

}  // namespace shoal::comm
