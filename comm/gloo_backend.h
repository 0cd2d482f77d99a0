// The Gloo backend: CPU collectives over TCP through LibTorch's c10d::ProcessGroupGloo.
//
//   - Rendezvous: every rank publishes its Gloo address in BackendOptions::store and connects to
//     every other rank (a full mesh); Create blocks until that is done or options.timeout passed.
//   - Timeouts: options.timeout is Gloo's context timeout, which bounds every transfer; a
//     CollectiveOptions::timeout can shorten, not lengthen, an operation's wait.
//   - kAvg: Gloo 1.13 has no average; it sums and Wait() divides.
//   - ReduceScatter: c10d's Gloo group has none; it is an all-to-all of the shards followed by a
//     local reduction in Wait(). Each rank sends and receives (N-1)/N of the input, the same
//     traffic as a ring reduce-scatter (half of an allreduce's), at the cost of one temporary
//     the size of the input.
// Use through CreateBackend (comm/backend.h); internal to comm/.
#ifndef SHOAL_COMM_GLOO_BACKEND_H_
#define SHOAL_COMM_GLOO_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/backend.h"

namespace shoal::comm::internal {

// REQUIRES: options.kind == "gloo" (not checked). Errors as CreateBackend's.
absl::StatusOr<std::unique_ptr<Backend>> CreateGlooBackend(const BackendOptions& options);

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_GLOO_BACKEND_H_
