#include "comm/swarm_client.h"

#include <grpcpp/grpcpp.h>

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/grpc_util.h"
#include "comm/peer_group.h"
#include "comm/tensor_stream.h"
#include "common/status.h"
#include "proto/coordinator.pb.h"

namespace shoal::comm {
namespace {

// The most bytes a reply may declare: a stage's activations are far below this.
constexpr int64_t kMaxReplyBytes = int64_t{1} << 34;

void FillCall(const StageCall& c, v1::CallInfo* out, int64_t samples) {
  out->set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
  out->set_stage(c.stage);
  out->set_step(c.step);
  out->set_micro_batch(c.micro_batch);
  out->set_trainer_id(c.trainer_id);
  out->set_samples(samples);
  out->set_rollbacks(c.rollbacks);
}

// One half-duplex call: the header, every tensor's pieces, half-close; then the reply's header
// and the pieces of its one tensor. `read_header` takes the reply header, fills `reply`'s scalar
// fields and returns the declared tensor (an unspecified codec: none).
template <typename Request, typename Reply, typename ReadHeader>
absl::StatusOr<StageReply> RunCall(const char* what, const std::string& address,
                                   grpc::ClientContext* ctx,
                                   grpc::ClientReaderWriter<Request, Reply>* stream,
                                   const Request& header, const std::vector<WireTensor>& tensors,
                                   ReadHeader read_header) {
  const std::string call = absl::StrCat(what, " to ", address);
  bool sent = stream->Write(header);
  for (size_t i = 0; sent && i < tensors.size(); ++i) {
    std::vector<v1::TensorPiece> pieces;
    AppendPieces(static_cast<int>(i), tensors[i].bytes, &pieces);
    for (v1::TensorPiece& p : pieces) {
      Request r;
      *r.mutable_piece() = std::move(p);
      if (!stream->Write(r)) {
        sent = false;
        break;
      }
    }
  }
  if (sent) stream->WritesDone();
  StageReply out;
  Reply reply;
  absl::Status decoded = absl::OkStatus();
  if (stream->Read(&reply)) {
    if (!reply.has_header()) {
      decoded = absl::InvalidArgumentError("the reply does not start with its header");
    } else {
      const v1::TensorMeta meta = read_header(reply.header(), &out);
      if (meta.codec() != v1::TENSOR_CODEC_UNSPECIFIED) {
        absl::StatusOr<TensorAssembler> in =
            TensorAssembler::Create({meta}, {"the reply's tensor"}, kMaxReplyBytes);
        decoded = in.status();
        while (decoded.ok() && stream->Read(&reply)) {
          decoded = reply.has_piece()
                        ? in->Add(reply.piece())
                        : absl::InvalidArgumentError("a second header in the reply");
        }
        if (decoded.ok()) decoded = in->CheckComplete();
        if (decoded.ok()) {
          absl::StatusOr<at::Tensor> t = in->Take(0);
          decoded = t.status();
          if (t.ok()) out.tensor = *std::move(t);
        }
      }
    }
  }
  if (!decoded.ok()) {
    ctx->TryCancel();
    (void)stream->Finish();
    return absl::InvalidArgumentError(absl::StrCat(call, ": ", decoded.message()));
  }
  SHOAL_RETURN_IF_ERROR(FromGrpc(call, stream->Finish()));
  return out;
}

absl::StatusOr<WireTensor> InputForWire(const at::Tensor& input, v1::TensorCodec codec) {
  if (input.defined() && input.scalar_type() == at::kLong) {
    return EncodeForWire(input, v1::TENSOR_CODEC_INT64);
  }
  return EncodeForWire(input, codec);
}

}  // namespace

absl::StatusOr<std::unique_ptr<StageClient>> StageClient::Create(
    const StageClientOptions& options) {
  if (options.forward_timeout <= absl::ZeroDuration() ||
      options.backward_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("stage client: timeouts must be > 0");
  }
  if (options.codec != v1::TENSOR_CODEC_FP32 && options.codec != v1::TENSOR_CODEC_BF16 &&
      options.codec != v1::TENSOR_CODEC_INT8_BLOCKWISE) {
    return absl::InvalidArgumentError(absl::StrCat("stage client: activation codec ",
                                                   v1::TensorCodec_Name(options.codec),
                                                   " is not fp32, bf16 or int8-blockwise"));
  }
  std::unique_ptr<StageClient> c(new StageClient(options));
  SHOAL_ASSIGN_OR_RETURN(c->credentials_,
                         ClientCredentials(options.tls_ca_file, "the swarm's CA file"));
  return c;
}

v1::SwarmPeer::Stub* StageClient::StubFor(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<v1::SwarmPeer::Stub>& stub = stubs_[address];
  if (stub == nullptr) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(kMaxExchangeMessageBytes);
    args.SetMaxSendMessageSize(kMaxExchangeMessageBytes);
    stub = v1::SwarmPeer::NewStub(grpc::CreateCustomChannel(address, credentials_, args));
  }
  return stub.get();
}

absl::StatusOr<StageReply> StageClient::Forward(const std::string& address, const StageCall& call,
                                                const at::Tensor& input) {
  SHOAL_ASSIGN_OR_RETURN(WireTensor in, InputForWire(input, options_.codec));
  v1::ForwardRequest header;
  FillCall(call, header.mutable_header()->mutable_call(), input.size(0));
  *header.mutable_header()->mutable_input() = in.meta;
  header.mutable_header()->set_output_codec(options_.codec);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.forward_timeout));
  AddBearer(&ctx, options_.token);
  auto stream = StubFor(address)->Forward(&ctx);
  return RunCall("Forward", address, &ctx, stream.get(), header, {std::move(in)},
                 [](const v1::ForwardReplyHeader& h, StageReply* r) {
                   r->compute_s = h.compute_s();
                   r->queued_s = h.queued_s();
                   return h.output();
                 });
}

absl::StatusOr<StageReply> StageClient::Backward(const std::string& address,
                                                 const StageCall& call, const at::Tensor& input,
                                                 const at::Tensor& grad_output, bool accumulate) {
  SHOAL_ASSIGN_OR_RETURN(WireTensor in, InputForWire(input, options_.codec));
  SHOAL_ASSIGN_OR_RETURN(WireTensor g, EncodeForWire(grad_output, options_.codec));
  v1::BackwardRequest header;
  v1::BackwardHeader* h = header.mutable_header();
  FillCall(call, h->mutable_call(), input.size(0));
  *h->mutable_input() = in.meta;
  *h->mutable_grad_output() = g.meta;
  h->set_accumulate(accumulate);
  h->set_grad_input_codec(options_.codec);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.backward_timeout));
  AddBearer(&ctx, options_.token);
  auto stream = StubFor(address)->Backward(&ctx);
  return RunCall("Backward", address, &ctx, stream.get(), header, {std::move(in), std::move(g)},
                 [](const v1::BackwardReplyHeader& rh, StageReply* r) {
                   r->compute_s = rh.compute_s();
                   r->queued_s = rh.queued_s();
                   r->accumulated = rh.accumulated_micro_batches();
                   return rh.grad_input();
                 });
}

absl::StatusOr<StageReply> StageClient::ForwardBackward(const std::string& address,
                                                        const StageCall& call,
                                                        const at::Tensor& input,
                                                        const at::Tensor& targets,
                                                        double loss_scale, bool accumulate) {
  SHOAL_ASSIGN_OR_RETURN(WireTensor in, InputForWire(input, options_.codec));
  SHOAL_ASSIGN_OR_RETURN(WireTensor y, EncodeForWire(targets, v1::TENSOR_CODEC_INT64));
  v1::ForwardBackwardRequest header;
  v1::ForwardBackwardHeader* h = header.mutable_header();
  FillCall(call, h->mutable_call(), input.size(0));
  *h->mutable_input() = in.meta;
  *h->mutable_targets() = y.meta;
  h->set_accumulate(accumulate);
  h->set_grad_input_codec(options_.codec);
  h->set_loss_scale(loss_scale);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.backward_timeout));
  AddBearer(&ctx, options_.token);
  auto stream = StubFor(address)->ForwardBackward(&ctx);
  return RunCall("ForwardBackward", address, &ctx, stream.get(), header,
                 {std::move(in), std::move(y)},
                 [](const v1::ForwardBackwardReplyHeader& rh, StageReply* r) {
                   r->loss = rh.loss();
                   r->compute_s = rh.compute_s();
                   r->queued_s = rh.queued_s();
                   r->accumulated = rh.accumulated_micro_batches();
                   return rh.grad_input();
                 });
}

}  // namespace shoal::comm
