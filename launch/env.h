// Where this process sits in a distributed job, read from the environment the way the usual
// launchers set it, in this order of precedence:
//   1. torchrun / `shoal run`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
//      MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT (or SHOAL_RESTART_COUNT);
//   2. Open MPI's mpirun: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE;
//   3. PMIx (srun --mpi=pmix): PMIX_RANK (world size from SLURM_NTASKS);
//   4. Slurm: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID; MASTER_ADDR defaults to
//      the first host of SLURM_JOB_NODELIST (ranges like node[01-03,07] expanded).
// Nothing set: a single process (rank 0 of 1). Pure apart from reading the environment.
#ifndef SHOAL_LAUNCH_ENV_H_
#define SHOAL_LAUNCH_ENV_H_

#include <functional>
#include <vector>
#include <string>

#include "absl/status/statusor.h"

namespace shoal::launch {

struct DistributedEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  int node_rank = 0;                   // GROUP_RANK / SLURM_NODEID
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int restart_count = 0;               // how many times the launcher restarted the group
  std::string source = "single";       // "torchrun", "openmpi", "pmix", "slurm" or "single"
};

// Reads the variables through `getenv` (tests pass a map). kInvalidArgument names the variable
// for a non-integer, negative, or inconsistent value (rank >= world size, ...).
absl::StatusOr<DistributedEnv> DetectDistributedEnv(
    const std::function<const char*(const char*)>& getenv);

// The same over the process environment.
absl::StatusOr<DistributedEnv> DetectDistributedEnv();

// "node[01-03,07],gpu5" -> {"node01", "node02", "node03", "node07", "gpu5"}.
absl::StatusOr<std::vector<std::string>> ExpandSlurmNodeList(const std::string& list);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_ENV_H_
