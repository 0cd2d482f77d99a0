// The MPI backend: CPU collectives over plain MPI (OpenMPI), for ranks started by mpirun.
//
//   - The process initialises MPI once (MPI_Init_thread asking for MPI_THREAD_SERIALIZED; every
//     MPI call of the process is also serialised by one mutex) and finalises it at exit, unless
//     someone else initialised it first. Each backend works on its own duplicate of
//     MPI_COMM_WORLD, with MPI_ERRORS_RETURN, so a failed call returns a status.
//   - The group is MPI_COMM_WORLD: BackendOptions rank/world_size must equal MPI's
//     (kFailedPrecondition otherwise); the store is not used.
//   - Every operation is nonblocking (MPI_Iallreduce, MPI_Ireduce_scatter_block, MPI_Iallgather,
//     MPI_Ibcast, MPI_Isend/MPI_Irecv, MPI_Ibarrier); Work::Wait polls MPI_Test until done or the
//     timeout (kDeadlineExceeded). A timed-out request cannot be cancelled (MPI forbids freeing
//     an active collective request): it and its tensors are kept until the backend is destroyed,
//     which gives it one more second to finish and otherwise leaks it, its tensors and the
//     communicator (MPI may still progress it; the late peer can then complete its side).
//   - kAvg is MPI_SUM then a division in Wait(). float16/bfloat16 reductions use MPI_Op's of
//     our own (sum in float, rounded back per element).
//   - Counts are int in MPI: tensors over 2^31-1 elements give kInvalidArgument.
//   - A peer that dies makes OpenMPI 4.1 (without ULFM) abort the whole job: mpirun, not this
//     code, reports that failure.
// Use through CreateBackend (comm/backend.h); internal to comm/.
#ifndef SHOAL_COMM_MPI_BACKEND_H_
#define SHOAL_COMM_MPI_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/backend.h"

namespace shoal::comm::internal {

// REQUIRES: options.kind == "mpi" (not checked). Errors as CreateBackend's.
absl::StatusOr<std::unique_ptr<Backend>> CreateMpiBackend(const BackendOptions& options);

}  // namespace shoal::comm::internal

#endif  // SHOAL_COMM_MPI_BACKEND_H_
