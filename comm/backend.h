// Backend: collectives and point-to-point transfers among the ranks of one group.
//
// Contract (as in every collective library): every rank of the group issues the same collectives,
// with the same sizes, dtypes and ops, in the same order. Calls return at once with a Work;
// Work::Wait() blocks until the operation is done on this rank and returns its status. Tensors
// are CPU (Gloo, MPI) or CUDA (NCCL), contiguous, and must stay alive and untouched until Wait()
// returns; a result is only defined after Wait() returned OK (kAvg divides, and a ReduceScatter
// reduces its shards, inside Wait()). Several operations may be in flight at once; wait on
// every Work.
//
// Failures never hang: an operation that does not finish within its timeout fails with
// kDeadlineExceeded, and a peer that died or closed its connection gives kUnavailable. Messages
// say which op on which group, and what happened ("allreduce on gloo group of 4 (rank 1): ...").
// After either, the backend is unusable and the group must be rebuilt (the launcher restarts
// it): later calls fail with kFailedPrecondition naming the first failure, and the contents of
// tensors given to unfinished operations are undefined. Bad arguments (wrong sizes, a
// non-contiguous tensor, a rank out of range, an unsupported dtype) give kInvalidArgument and
// leave the backend usable.
//
// A Backend is used from one thread at a time. A Work may outlive its Backend.
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
  // Fail with kDeadlineExceeded when not done after this long; zero: the backend's default
  // (BackendOptions::timeout). Gloo cannot exceed its backend timeout, which bounds every
  // transfer inside an operation: the effective timeout there is min(this, backend timeout).
  absl::Duration timeout = absl::ZeroDuration();
};

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until done or failed, at most the operation's timeout; the operation's status.
  // Call once.
  virtual absl::Status Wait() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "gloo", "mpi", "nccl"

  // In place over `tensor`, on every rank. kAvg is the sum divided by size() (truncated toward
  // zero for integer dtypes).
  virtual std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                          const CollectiveOptions& options = {}) = 0;
  // `input` holds size() equal shards; rank r receives the reduction of shard r in `output`.
  // REQUIRES: input.numel() == size() * output.numel(), same dtype.
  virtual std::unique_ptr<Work> ReduceScatter(at::Tensor& output, const at::Tensor& input,
                                              ReduceOp op,
                                              const CollectiveOptions& options = {}) = 0;
  // `output` receives every rank's `input`, in rank order.
  // REQUIRES: output.numel() == size() * input.numel(), same dtype.
  virtual std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                          const CollectiveOptions& options = {}) = 0;
  // `tensor` of rank `root` is copied to every rank. REQUIRES: 0 <= root < size().
  virtual std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                          const CollectiveOptions& options = {}) = 0;
  // Point to point: a Send to `dst` with `tag` matches the Recv from this rank with the same tag
  // on `dst`; both sides give tensors of the same byte size. Messages between one pair with one
  // tag arrive in order. REQUIRES: dst/src != rank(), 0 <= tag < 2^31 (MPI: <= MPI_TAG_UB).
  virtual std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                                     const CollectiveOptions& options = {}) = 0;
  virtual std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                                     const CollectiveOptions& options = {}) = 0;
  // Done when every rank has entered the barrier.
  virtual std::unique_ptr<Work> Barrier(const CollectiveOptions& options = {}) = 0;
};

struct BackendOptions {
  std::string kind = "gloo";          // "gloo", "mpi" or "nccl"
  int rank = 0;                       // this rank, in [0, world_size)
  int world_size = 1;                 // ranks in the group
  // Rendezvous (gloo, nccl); unused by mpi. Give every group (and every rebuild of a group) its
  // own namespace, e.g. MakePrefixStore("dp0.gen3", base): two groups on the same keys would
  // mistake each other's addresses.
  std::shared_ptr<Store> store;
  absl::Duration timeout = absl::Seconds(60);  // rendezvous and default op timeout
  // Gloo: the host name or IP this rank's Gloo device binds to and advertises ("127.0.0.1" for
  // single-host runs). Empty: the interface named by GLOO_SOCKET_IFNAME if set, else Gloo's
  // default device (the address of this host's name, falling back to loopback).
  std::string gloo_hostname;
};

// Builds a backend; blocks until every rank of the group has joined (gloo, nccl: through
// `store`; mpi: MPI_COMM_WORLD must have exactly world_size ranks, this one being `rank`).
// kInvalidArgument for an unknown kind or bad rank/world_size/missing store, kUnimplemented for
// one not compiled in (mpi without MPI, nccl without CUDA+NCCL), kFailedPrecondition when MPI's
// rank/size differ from the options or MPI lacks thread support, kUnavailable /
// kDeadlineExceeded when rendezvous fails (within about options.timeout).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

}  // namespace shoal::comm

#endif  // SHOAL_COMM_BACKEND_H_
