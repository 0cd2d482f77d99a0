// DeMo (decoupled momentum) over the model's flat buffers: every data-parallel worker keeps its
// own residual buffer `delta` per parameter, sends only the top-k DCT coefficients of it each
// step, and applies the sign of the mean of everybody's coefficients. No gradient all-reduce.
//
// One step of one worker (the reference's update, parallel/demo_codec.h holds the math):
//   for every parameter p (groups in order, entries in layout order):
//     delta ← decay·delta + lr·grad_scale·grad;  sel_p = top-k(DCT(delta));  delta −= sent
//   payload = header ‖ sel_0 ‖ sel_1 ‖ …          (Compress)
//   payloads = all-gather(payload)                 (a DemoExchange: comm/ now, gRPC later)
//   p ← p·(1 − lr·λ_group) − lr·sign(IDCT(mean over workers of sel_p))   (Apply)
//
// Payload (shoal's wire format; every worker's has the same size because it depends only on
// the parameter shapes and the settings):
//   bytes 0..3    magic "SDM1"
//   bytes 4..7    uint32 fingerprint of the settings and the parameter layout (names, shapes,
//                 chunk, topk, wire dtype), so a peer configured differently is refused by name
//   bytes 8..15   int64 step this payload belongs to (1 for the first step)
//   then per parameter: tiles·k int16 indices, then tiles·k values in the wire dtype, each
//   block starting at an even byte offset (the int16 blocks are aligned to 2).
// Integers are little-endian (the byte order of every machine shoal builds on).
//
// Determinism: the decode of the gathered payloads uses DemoCodec::DecompressMean, which
// accumulates in a fixed worker order, so replicas that share a BLAS build apply bit-identical
// updates whatever order the bytes arrived in. CheckReplicasAgree verifies that.
//
// Not thread-safe; every call blocks until done.
#ifndef SHOAL_PARALLEL_DEMO_H_
#define SHOAL_PARALLEL_DEMO_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "parallel/adamw.h"  // ParamGroup
#include "parallel/demo_codec.h"

namespace shoal::parallel {

struct DemoOptions {
  DemoCodecOptions codec;     // chunk (64), topk (32), wire dtype of the values
  double decay = 0.999;       // compression decay β of delta, in [0, 1)
  double weight_decay = 0.0;  // decoupled, on groups with decay = true
  // Which parameters this optimizer codes and moves, by name (empty: all of them). A swarm
  // stage runs two: its own parameters over the stage's peers, and the tied embedding over the
  // first and the last stage's peers together.
  std::function<bool(const std::string& name)> include;
};

// The wire dtype's config name ("fp32", "bf16", "fp16") and back; kInvalidArgument names the
// accepted ones.
const char* DemoWireName(at::ScalarType dtype);
absl::StatusOr<at::ScalarType> DemoWireDtype(const std::string& name);

// Bytes of the payload header.
inline constexpr int64_t kDemoHeaderBytes = 16;

// Moves one worker's payload to every worker of the data-parallel group. Implementations: over a
// comm::Backend (below); a gRPC one for the peers of a swarm stage comes later.
class DemoExchange {
 public:
  virtual ~DemoExchange() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every worker's `payload` (1-D uint8, contiguous, the same byte size on every worker), in
  // worker order, this worker's included. The backend's kUnavailable / kDeadlineExceeded on a
  // dead or silent peer.
  virtual absl::StatusOr<std::vector<at::Tensor>> AllGather(const at::Tensor& payload) = 0;
};

// The exchange over `backend` (not owned; Gloo, MPI or NCCL): one all-gather of bytes per step.
std::unique_ptr<DemoExchange> MakeBackendExchange(comm::Backend* backend,
                                                  comm::CollectiveOptions options = {});

// Bytes moved by one worker in its last step, counted as the reference does: `sent` is this
// worker's payload, `received` every worker's payload, its own included (W · sent).
struct DemoTraffic {
  int64_t sent = 0;
  int64_t received = 0;
};

class Demo {
 public:
  // A DeMo optimizer over `groups` (each a flat parameter buffer and its gradient buffer, float32).
  // Every entry of every group gets a DemoCodec for its shape. kInvalidArgument when the options
  // are out of range (decay outside [0, 1), chunk or topk <= 0, a wire dtype other than float32,
  // bfloat16, float16, weight_decay negative or not finite) or a parameter cannot be coded (the
  // message names it and the codec's reason).
  static absl::StatusOr<std::unique_ptr<Demo>> Create(std::vector<ParamGroup> groups,
                                                      DemoOptions options);

  // Before the exchange: for every parameter, delta ← decay·delta + lr·grad_scale·grad, select
  // the top-k of its DCT, subtract what is sent (error feedback), and write the selection into
  // the returned payload (1-D uint8 of PayloadBytes(), header for step steps() + 1).
  at::Tensor Compress(double lr, double grad_scale);

  // After the exchange: `payloads` are every worker's Compress output in worker order (this
  // worker's included). Each is checked first — size, magic, fingerprint, step, then every
  // parameter's indices (via DecompressMean) — and on any error nothing is changed and the status
  // names the worker (and the parameter): kInvalidArgument for a payload of another size, magic or
  // fingerprint, kFailedPrecondition for a payload of another step, kDataLoss for a bad index.
  // Then every parameter moves: p ← p·(1 − lr·λ) − lr·sign(IDCT(mean)), λ = weight_decay on
  // decay groups, 0 elsewhere; steps() increases by one and last_traffic() is set.
  absl::Status Apply(const std::vector<at::Tensor>& payloads, double lr);

  // Compress, exchange->AllGather, Apply. The exchange's error is returned as is.
  absl::Status Step(double lr, double grad_scale, DemoExchange* exchange);

  // kDemoHeaderBytes + the payload blocks of every parameter (see the top of this file).
  int64_t PayloadBytes() const { return payload_bytes_; }
  DemoTraffic last_traffic() const { return last_traffic_; }
  int64_t steps() const { return steps_; }
  uint32_t fingerprint() const { return fingerprint_; }
  const DemoOptions& options() const { return options_; }

  // This worker's state as named tensors: "demo.step" (int64 scalar) and "demo.delta.<param>"
  // per parameter (views sharing storage with the optimizer). Every worker's delta differs.
  std::vector<std::pair<std::string, at::Tensor>> StateDict() const;
  // Restores StateDict()'s tensors (copied). kDataLoss names a missing tensor, a shape or dtype
  // mismatch, or a negative step; nothing changes unless everything is right.
  absl::Status LoadStateDict(const std::vector<std::pair<std::string, at::Tensor>>& state);
  // Starts afresh: delta = 0 everywhere (a worker joining a run), the step count kept.
  void ResetDelta();

 private:
  struct Param {
    std::string name;
    at::Tensor value;  // view into the group's parameter buffer
    at::Tensor grad;   // view into the group's gradient buffer
    at::Tensor delta;  // view into delta_[group]
    double weight_decay = 0;
    std::unique_ptr<DemoCodec> codec;
    int64_t index_offset = 0;  // byte offset of the int16 indices in the payload
    int64_t value_offset = 0;  // byte offset of the values
  };

  Demo() = default;

  DemoOptions options_;
  std::vector<at::Tensor> delta_;  // per group, like the group's flat parameter buffer
  std::vector<Param> params_;
  int64_t payload_bytes_ = kDemoHeaderBytes;
  uint32_t fingerprint_ = 0;
  int64_t steps_ = 0;
  DemoTraffic last_traffic_;
};

// 64-bit FNV-1a over the raw bytes of `tensors` (each made contiguous), in order: a cheap
// fingerprint of a replica's parameters.
uint64_t HashTensors(const std::vector<at::Tensor>& tensors);

// The replica drift check: all-gathers every rank's `hash` over `backend` and returns kDataLoss
// when any differs from rank 0's, naming the step, the ranks and both hashes (in hex).
// The backend's errors otherwise. A collective: every rank of the group calls it.
absl::Status CheckReplicasAgree(comm::Backend* backend, uint64_t hash, int64_t step,
                                comm::CollectiveOptions options = {});

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_DEMO_H_
