#include "comm/backend.h"

#include "absl/strings/str_cat.h"
#include "comm/gloo_backend.h"
#if defined(SHOAL_HAVE_MPI)
#include "comm/mpi_backend.h"
#endif
#if defined(SHOAL_HAVE_NCCL)
#include "comm/nccl_backend.h"
#endif

namespace shoal::comm {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(options.kind, " backend: rank ", options.rank,
                                                   " is not in [0, world_size ",
                                                   options.world_size, ")"));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.kind, " backend: timeout ", absl::FormatDuration(options.timeout), " <= 0"));
  }
  if (options.kind == "gloo") return internal::CreateGlooBackend(options);
  if (options.kind == "mpi") {
#if defined(SHOAL_HAVE_MPI)
    return internal::CreateMpiBackend(options);
#else
    return absl::UnimplementedError("mpi backend: this build of shoal has no MPI");
#endif
  }
  if (options.kind == "nccl") {
#if defined(SHOAL_HAVE_NCCL)
    return internal::CreateNcclBackend(options);
#else
    return absl::UnimplementedError("nccl backend: this build of shoal has no CUDA/NCCL");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend kind '", options.kind, "' (expected gloo, mpi or nccl)"));
}

}  // namespace shoal::comm
