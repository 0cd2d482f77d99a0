// The NCCL backend: GPU collectives through NCCL on CUDA tensors, one GPU per rank.
//
//   - Built when the CUDA toolkit and NCCL are found under /usr/local/cuda (configure says so).
//   - Rendezvous: rank 0 creates the NCCL unique id and publishes it in BackendOptions::store;
//     the others read it (within options.timeout). The rank uses GPU rank % device count.
//   - The communicator is non-blocking (ncclConfig_t.blocking = 0), so initialisation and every
//     operation can be bounded: Work::Wait polls the operation's CUDA event and the
//     communicator's async error until done, and on a timeout aborts the communicator
//     (kDeadlineExceeded); a failed peer surfaces as kUnavailable.
//   - Tensors must be contiguous CUDA tensors; Debian's LibTorch is CPU-only, so on the project's
//     CI machines this backend can only be built and asked for, which reports kUnavailable (no
//     device) or kInvalidArgument (a CPU tensor). bench/gpu/ checks NCCL itself on a GPU host.
// Use through CreateBackend (comm/backend.h); internal to comm/.
#ifndef SHOAL_COMM_NCCL_BACKEND_H_
#define SHOAL_COMM_NCCL_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/backend.h"

namespace shoal::comm::internal {

// REQUIRES: options.kind == "nccl" (not checked). Errors as CreateBackend's; kUnavailable when
// this host has no usable CUDA device; kInvalidArgument without a store.
absl::StatusOr<std::unique_ptr<Backend>> CreateNcclBackend(const BackendOptions& options);

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_NCCL_BACKEND_H_
