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
    } else if (absl::StartsWith(name, "demo.delta.")) {
      // This peer's own DeMo residual: checkpoints keep it; a joiner starts from zero.
      Append(name.substr(11), "demo_delta", t, &out);
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
    } else if (e.kind() == "demo_delta") {
      // The donor's own residual: a joining DeMo peer starts its own from zero (copying the
      // donor's would count the donor's momentum twice in the stage's mean).
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

namespace {

// A stub for the peer at `address`, taking messages as large as a state chunk's.
absl::StatusOr<std::unique_ptr<v1::SwarmPeer::Stub>> PeerStub(const std::string& address,
                                                             const FetchOptions& options) {
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                         comm::ClientCredentials(options.tls_ca_file, "the swarm's CA file"));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(comm::kMaxExchangeMessageBytes);
  return v1::SwarmPeer::NewStub(grpc::CreateCustomChannel(address, credentials, args));
}

}  // namespace

absl::StatusOr<StageSnapshot> FetchStageState(const std::string& address, int stage, int64_t step,
                                              const FetchOptions& options) {
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<v1::SwarmPeer::Stub> stub, PeerStub(address, options));
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

namespace {

void AppendBytes(const at::Tensor& t, std::string* out) {
  const at::Tensor c = t.contiguous();
  out->append(static_cast<const char*>(c.data_ptr()), c.nbytes());
}

}  // namespace

EncodedUpdate EncodeUpdate(const StepUpdate& u) {
  EncodedUpdate e;
  e.header.set_step(u.step);
  e.header.set_lr(u.lr);
  e.header.set_clip_scale(u.clip_scale);
  if (!u.gradient.empty()) {
    e.header.set_kind(v1::UPDATE_KIND_GRADIENT);
    for (const at::Tensor& g : u.gradient) AppendBytes(g, &e.bytes);
  } else {
    e.header.set_kind(v1::UPDATE_KIND_DEMO);
    e.header.set_peers(static_cast<int32_t>(u.own_payloads.size()));
    e.header.set_tied_peers(static_cast<int32_t>(u.tied_payloads.size()));
    for (const at::Tensor& p : u.own_payloads) AppendBytes(p, &e.bytes);
    for (const at::Tensor& p : u.tied_payloads) AppendBytes(p, &e.bytes);
  }
  e.header.set_payload_bytes(static_cast<int64_t>(e.bytes.size()));
  return e;
}

absl::StatusOr<StepUpdate> DecodeUpdate(const SwarmStage& stage, const EncodedUpdate& e) {
  const v1::StepUpdateHeader& h = e.header;
  const std::string what = absl::StrCat("update of step ", h.step(), " for stage ", stage.stage());
  if (h.payload_bytes() != static_cast<int64_t>(e.bytes.size())) {
    return absl::DataLossError(absl::StrCat(what, ": ", e.bytes.size(), " bytes for a header of ",
                                            h.payload_bytes()));
  }
  StepUpdate u;
  u.step = h.step();
  u.lr = h.lr();
  u.clip_scale = h.clip_scale();
  int64_t at = 0;
  auto take = [&](int64_t n, std::vector<int64_t> shape, at::ScalarType dtype) {
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
    std::memcpy(t.data_ptr(), e.bytes.data() + at, static_cast<size_t>(n));
    at += n;
    return t;
  };
  if (stage.demo()) {
    if (h.kind() != v1::UPDATE_KIND_DEMO) {
      return absl::DataLossError(absl::StrCat(what, ": kind ", v1::UpdateKind_Name(h.kind()),
                                              " for a DeMo stage"));
    }
    const auto [own_bytes, tied_bytes] = stage.DemoPayloadBytes();
    if (h.peers() < 1 || h.tied_peers() < 0 || (tied_bytes == 0) != (h.tied_peers() == 0) ||
        h.peers() > 4096 || h.tied_peers() > 8192 ||
        h.payload_bytes() != h.peers() * own_bytes + h.tied_peers() * tied_bytes) {
      return absl::DataLossError(absl::StrCat(
          what, ": ", h.peers(), " + ", h.tied_peers(), " payloads in ", h.payload_bytes(),
          " bytes; this stage's payloads take ", own_bytes, " and ", tied_bytes, " bytes"));
    }
    for (int i = 0; i < h.peers(); ++i) {
      u.own_payloads.push_back(take(own_bytes, {own_bytes}, at::kByte));
    }
    for (int i = 0; i < h.tied_peers(); ++i) {
      u.tied_payloads.push_back(take(tied_bytes, {tied_bytes}, at::kByte));
    }
    return u;
  }
  if (h.kind() != v1::UPDATE_KIND_GRADIENT) {
    return absl::DataLossError(absl::StrCat(what, ": kind ", v1::UpdateKind_Name(h.kind()),
                                            " for an AdamW stage"));
  }
  int64_t want = 0;
  for (const at::Tensor& g : stage.Gradients()) want += g.nbytes();
  if (h.payload_bytes() != want) {
    return absl::DataLossError(absl::StrCat(what, ": a gradient of ", h.payload_bytes(),
                                            " bytes for a stage of ", want));
  }
  for (const at::Tensor& g : stage.Gradients()) {
    u.gradient.push_back(take(g.nbytes(), g.sizes().vec(), at::kFloat));
  }
  return u;
}

absl::StatusOr<std::vector<EncodedUpdate>> FetchUpdates(const std::string& address, int stage,
                                                        int64_t from_step, int64_t to_step,
                                                        const FetchOptions& options) {
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<v1::SwarmPeer::Stub> stub, PeerStub(address, options));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options.timeout));
  comm::AddBearer(&ctx, options.token);
  v1::GetUpdatesRequest request;
  request.set_stage(stage);
  request.set_from_step(from_step);
  request.set_to_step(to_step);
  std::unique_ptr<grpc::ClientReader<v1::StepUpdatePart>> reader = stub->GetUpdates(&ctx, request);
  std::vector<EncodedUpdate> out;
  absl::Status broken;
  v1::StepUpdatePart part;
  int64_t expect_step = from_step;
  while (reader->Read(&part)) {
    if (part.has_header()) {
      if (!out.empty() && static_cast<int64_t>(out.back().bytes.size()) !=
                              out.back().header.payload_bytes()) {
        broken = absl::DataLossError(absl::StrCat("step ", out.back().header.step(),
                                                  "'s payload ended early"));
        break;
      }
      const v1::StepUpdateHeader& h = part.header();
      if (h.step() != expect_step || h.payload_bytes() < 0 ||
          h.payload_bytes() > (int64_t{1} << 40) || (to_step != 0 && h.step() > to_step)) {
        broken = absl::DataLossError(absl::StrCat("a header of step ", h.step(), " (",
                                                  h.payload_bytes(), " bytes) where step ",
                                                  expect_step, " was due"));
        break;
      }
      ++expect_step;
      out.push_back(EncodedUpdate{h, {}});
      continue;
    }
    const v1::StateChunk& c = part.chunk();
    if (out.empty() || c.offset() != static_cast<int64_t>(out.back().bytes.size()) ||
        c.data().empty() ||
        static_cast<int64_t>(out.back().bytes.size() + c.data().size()) >
            out.back().header.payload_bytes()) {
      broken = absl::DataLossError(absl::StrCat("a chunk at ", c.offset(), " of ",
                                                c.data().size(), " bytes out of place"));
      break;
    }
    if (memory::Crc32c(c.data().data(), c.data().size()) != c.crc32c()) {
      broken = absl::DataLossError(absl::StrCat("the chunk at ", c.offset(), " of step ",
                                                out.back().header.step(), " fails its CRC32C"));
      break;
    }
    out.back().bytes.append(c.data());
  }
  if (!broken.ok()) ctx.TryCancel();
  absl::Status finished = comm::FromGrpc("GetUpdates", reader->Finish());
  if (broken.ok() && finished.ok() && !out.empty() &&
      static_cast<int64_t>(out.back().bytes.size()) != out.back().header.payload_bytes()) {
    broken = absl::DataLossError("the stream ended inside a step's payload");
  }
  const absl::Status& last = !broken.ok() ? broken : finished;
  if (!last.ok()) {
    return absl::Status(last.code(), absl::StrCat("catch-up log of stage ", stage, " from ",
                                                  address, ": ", last.message()));
  }
  return out;
}

}  // namespace shoal::runtime
