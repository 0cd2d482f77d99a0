// Backend: collectives and point-to-point transfers among the ranks of one group.
//
// Contract (as in every collective library): every rank of the group issues the same collectives,
// with the same sizes, in the same order. Calls return at once with a Work; Work::Wait() blocks
// until the operation is done on this rank and returns its status. Tensors are CPU (Gloo, MPI) or
// CUDA (NCCL), contiguous, and must stay alive and untouched until Wait() returns.
//
// Failures never hang: an operation that does not finish within options.timeout fails with
// kDeadlineExceeded, and a peer that died or closed its connection gives kUnavailable; after
// either the backend is unusable and the group must be rebuilt (the launcher restarts it).
// A Backend is used from one thread at a time.
#ifndef SHOAL_COMM_BACKEND_H_
#define SHOAL_COMM_BACKEND_H_

#include <memory>
#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/store.h"

namespace shoal::comm {

enum class ReduceOp { kSum, kAvg, kMax, kMin };

struct CollectiveOptions {
  absl::Duration timeout = absl::Seconds(60);  // fail with kDeadlineExceeded after this
};

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until done; the operation's status.
  virtual absl::Status Wait() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "gloo", "mpi", "nccl"

  // In place over `tensor`, on every rank.
  virtual std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                          const CollectiveOptions& options = {}) = 0;
  // `input` holds size() equal shards; rank r receives the reduction of shard r in `output`.
  // REQUIRES: input.numel() == size() * output.numel().
  virtual std::unique_ptr<Work> ReduceScatter(at::Tensor& output, const at::Tensor& input,
                                              ReduceOp op,
                                              const CollectiveOptions& options = {}) = 0;
  // `output` receives every rank's `input`, in rank order.
  // REQUIRES: output.numel() == size() * input.numel().
  virtual std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                          const CollectiveOptions& options = {}) = 0;
  // `tensor` of rank `root` is copied to every rank.
  virtual std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                          const CollectiveOptions& options = {}) = 0;
  virtual std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                                     const CollectiveOptions& options = {}) = 0;
  virtual std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                                     const CollectiveOptions& options = {}) = 0;
  virtual std::unique_ptr<Work> Barrier(const CollectiveOptions& options = {}) = 0;
};

struct BackendOptions {
  std::string kind = "gloo";          // "gloo", "mpi" or "nccl"
  int rank = 0;
  int world_size = 1;
  std::shared_ptr<Store> store;       // rendezvous (gloo, nccl); unused by mpi
  absl::Duration timeout = absl::Seconds(60);  // rendezvous and default op timeout
};

// Builds a backend. kInvalidArgument for an unknown kind, kUnimplemented for one not compiled in
// (mpi without MPI, nccl without CUDA), kUnavailable / kDeadlineExceeded when rendezvous fails.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

}  // namespace shoal::comm

#endif  // SHOAL_COMM_BACKEND_H_
