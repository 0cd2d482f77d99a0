#include "runtime/swarm_sync.h"

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>

#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/grpc_util.h"
#include "comm/peer_group.h"
#include "common/status.h"
#include "memory/checksum.h"
#include "proto/swarm.grpc.pb.h"

namespace shoal::runtime {
namespace {

void Append(const std::string& name, const std::string& kind, const at::Tensor& t,
            StageSnapshot* out) {
  const at::Tensor c = t.contiguous().to(at::kFloat);
  v1::StateEntry* e = out->manifest.add_entries();
  e->set_name(name);
  e->set_kind(kind);
  for (int64_t d : c.sizes()) e->add_shape(d);
  e->set_offset(static_cast<int64_t>(out->bytes.size()));
  e->set_bytes(static_cast<int64_t>(c.nbytes()));
  out->bytes.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
}

}  // namespace

StageSnapshot SnapshotOf(const SwarmStage& stage, int first_layer, int end_layer) {
  StageSnapshot out;
  out.manifest.set_stage(stage.stage());
  out.manifest.set_first_layer(first_layer);
  out.manifest.set_end_layer(end_layer);
  out.manifest.set_step(stage.optimizer_steps());
  for (const auto& [name, t] : stage.NamedParameters()) Append(name, "param", t, &out);
  for (const auto& [name, t] : stage.OptimizerState()) {
    if (absl::StartsWith(name, "exp_avg_sq.")) {
      Append(name.substr(11), "exp_avg_sq", t, &out);
    } else if (absl::StartsWith(name, "exp_avg.")) {
      Append(name.substr(8), "exp_avg", t, &out);
    }
  }
  out.manifest.set_total_bytes(static_cast<int64_t>(out.bytes.size()));
  out.manifest.set_snapshot_id(absl::StrCat("stage", stage.stage(), ".step",
                                            stage.optimizer_steps(), ".crc",
                                            stage.ParamHash()));
  return out;
}

absl::Status LoadSnapshot(SwarmStage& stage, const StageSnapshot& snapshot) {
  const v1::StageStateManifest& m = snapshot.manifest;
  if (m.stage() != stage.stage()) {
    return absl::DataLossError(absl::StrCat("stage state: a snapshot of stage ", m.stage(),
                                            " for stage ", stage.stage()));
  }
  if (m.total_bytes() != static_cast<int64_t>(snapshot.bytes.size()) || m.step() < 0) {
    return absl::DataLossError(absl::StrCat("stage state: ", snapshot.bytes.size(),
                                            " bytes for a manifest of ", m.total_bytes(),
                                            " at step ", m.step()));
  }
  std::vector<std::pair<std::string, at::Tensor>> params, moments;
  int64_t at = 0;
  for (const v1::StateEntry& e : m.entries()) {
    std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
    int64_t n = 1;
    for (int64_t d : shape) {
      if (d < 0 || (d > 0 && n > (int64_t{1} << 40) / d)) {
        return absl::DataLossError(absl::StrCat("stage state: ", e.name(), " has a bad shape"));
      }
      n *= d;
    }
    if (e.offset() != at || e.bytes() != 4 * n || at + e.bytes() > m.total_bytes()) {
      return absl::DataLossError(absl::StrCat("stage state: ", e.kind(), " ", e.name(), " at ",
                                              e.offset(), " (", e.bytes(),
                                              " bytes) does not follow the previous entry or its "
                                              "shape"));
    }
    at::Tensor t = at::empty(shape, at::kFloat);
    std::memcpy(t.data_ptr(), snapshot.bytes.data() + at, static_cast<size_t>(e.bytes()));
    at += e.bytes();
    if (e.kind() == "param") {
      params.emplace_back(e.name(), t);
    } else if (e.kind() == "exp_avg" || e.kind() == "exp_avg_sq") {
      moments.emplace_back(absl::StrCat(e.kind(), ".", e.name()), t);
    } else {
      return absl::DataLossError(absl::StrCat("stage state: unknown kind '", e.kind(), "' of ",
                                              e.name()));
    }
  }
  if (at != m.total_bytes()) {
    return absl::DataLossError(absl::StrCat("stage state: entries cover ", at, " of ",
                                            m.total_bytes(), " bytes"));
  }
  moments.emplace_back("step", at::full({}, m.step(), at::kLong));
  return stage.LoadState(params, moments);
}

absl::StatusOr<StageSnapshot> FetchStageState(const std::string& address, int stage, int64_t step,
                                              const FetchOptions& options) {
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                         comm::ClientCredentials(options.tls_ca_file, "the swarm's CA file"));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(comm::kMaxExchangeMessageBytes);
  auto stub = v1::SwarmPeer::NewStub(grpc::CreateCustomChannel(address, credentials, args));
  StageSnapshot out;
  bool have_manifest = false;
  absl::Status last = absl::UnavailableError("no attempt made");
  for (int attempt = 0; attempt < std::max(1, options.attempts); ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options.timeout));
    comm::AddBearer(&ctx, options.token);
    v1::GetStageStateRequest request;
    request.set_stage(stage);
    // A resumed transfer asks for the step of the snapshot it has begun.
    request.set_step(have_manifest ? out.manifest.step() : step);
    request.set_offset(static_cast<int64_t>(out.bytes.size()));
    auto reader = stub->GetStageState(&ctx, request);
    v1::StageStatePart part;
    absl::Status broken = absl::OkStatus();
    while (broken.ok() && reader->Read(&part)) {
      if (part.has_manifest()) {
        if (have_manifest && part.manifest().snapshot_id() != out.manifest.snapshot_id()) {
          broken = absl::DataLossError(absl::StrCat(
              "the donor's snapshot changed while resuming (", out.manifest.snapshot_id(),
              " -> ", part.manifest().snapshot_id(), ")"));
          break;
        }
        if (!have_manifest) {
          out.manifest = part.manifest();
          if (out.manifest.total_bytes() < 0 || out.manifest.total_bytes() > (int64_t{1} << 40)) {
            broken = absl::DataLossError("the manifest declares a bad size");
            break;
          }
          out.bytes.reserve(static_cast<size_t>(out.manifest.total_bytes()));
          have_manifest = true;
        }
        continue;
      }
      const v1::StateChunk& c = part.chunk();
      if (!have_manifest || c.offset() != static_cast<int64_t>(out.bytes.size()) ||
          c.data().empty() ||
          static_cast<int64_t>(out.bytes.size() + c.data().size()) > out.manifest.total_bytes()) {
        broken = absl::DataLossError(absl::StrCat("a chunk at ", c.offset(), " of ",
                                                  c.data().size(), " bytes after ",
                                                  out.bytes.size(), " received"));
        break;
      }
      if (memory::Crc32c(c.data().data(), c.data().size()) != c.crc32c()) {
        broken = absl::DataLossError(absl::StrCat("the chunk at ", c.offset(),
                                                  " fails its CRC32C"));
        break;
      }
      out.bytes.append(c.data());
    }
    if (!broken.ok()) ctx.TryCancel();
    const absl::Status finished = comm::FromGrpc("GetStageState", reader->Finish());
    if (broken.ok() && finished.ok() && have_manifest &&
        static_cast<int64_t>(out.bytes.size()) == out.manifest.total_bytes()) {
      return out;
    }
    last = !broken.ok() ? broken : !finished.ok() ? finished
                                   : absl::DataLossError("the stream ended early");
    // Anything a peer refuses outright will not change on a retry.
    if (absl::IsNotFound(last) || absl::IsFailedPrecondition(last) ||
        absl::IsUnauthenticated(last) || absl::IsInvalidArgument(last) ||
        absl::IsOutOfRange(last)) {
      break;
    }
  }
  return absl::Status(last.code(), absl::StrCat("stage state of stage ", stage, " from ", address,
                                                ": ", last.message()));
}

}  // namespace shoal::runtime
