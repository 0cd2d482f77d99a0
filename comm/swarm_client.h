// StageClient: a trainer's calls to the peers of swarm stages (proto/swarm.proto's Forward,
// Backward and ForwardBackward). A call carries everything the peer needs, so a failed one is
// sent again, whole, to another peer of the stage. Tensors travel as checked pieces
// (comm/tensor_stream.h) in the options' codec; token ids as int64.
//
// Errors are the peer's status with the call and the address in front ("Forward to
// 127.0.0.1:4711: ..."): kUnavailable for a peer that cannot be reached or died mid-call,
// kDeadlineExceeded past the call's timeout, kInvalidArgument for a reply that does not decode.
// Thread-safe: calls to one or several peers may run at once.
#ifndef SHOAL_COMM_SWARM_CLIENT_H_
#define SHOAL_COMM_SWARM_CLIENT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <ATen/core/Tensor.h>
#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/swarm.grpc.pb.h"

namespace shoal::comm {

struct StageClientOptions {
  std::string token;                 // the job's token; empty: none
  std::string tls_ca_file;           // PEM roots; empty: plaintext
  absl::Duration forward_timeout = absl::Seconds(30);
  absl::Duration backward_timeout = absl::Seconds(75);  // a backward recomputes its forward
  v1::TensorCodec codec = v1::TENSOR_CODEC_FP32;        // activations and their gradients
};

// Which micro-batch a call is about.
struct StageCall {
  int stage = 0;
  int64_t step = 0;
  int64_t micro_batch = 0;
  std::string trainer_id;
  int64_t rollbacks = 0;  // the lease's epoch (LeaseResponse.rollbacks)
};

struct StageReply {
  at::Tensor tensor;        // Forward: the output; Backward / ForwardBackward: grad of the input
                            // (undefined for the first stage)
  double loss = 0;          // ForwardBackward: the micro-batch's mean loss
  double compute_s = 0;     // the peer's compute time
  double queued_s = 0;      // how long the call waited at the peer behind others
  int64_t accumulated = 0;  // Backward / ForwardBackward: micro-batches the peer holds for the step
};

class StageClient {
 public:
  // kNotFound / kInvalidArgument for a bad CA file; kInvalidArgument for timeouts <= 0 or a codec
  // that is not fp32, bf16 or int8-blockwise.
  static absl::StatusOr<std::unique_ptr<StageClient>> Create(const StageClientOptions& options);

  absl::StatusOr<StageReply> Forward(const std::string& address, const StageCall& call,
                                     const at::Tensor& input);
  absl::StatusOr<StageReply> Backward(const std::string& address, const StageCall& call,
                                      const at::Tensor& input, const at::Tensor& grad_output,
                                      bool accumulate);
  absl::StatusOr<StageReply> ForwardBackward(const std::string& address, const StageCall& call,
                                             const at::Tensor& input, const at::Tensor& targets,
                                             double loss_scale, bool accumulate);

 private:
  explicit StageClient(const StageClientOptions& options) : options_(options) {}
  v1::SwarmPeer::Stub* StubFor(const std::string& address);

  StageClientOptions options_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<v1::SwarmPeer::Stub>> stubs_;
};

}  // namespace shoal::comm

#endif  // SHOAL_COMM_SWARM_CLIENT_H_
