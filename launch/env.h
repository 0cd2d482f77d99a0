// Where this process sits in a distributed job, read from the environment the way the usual
// launchers set it, in this order of precedence (the first source present wins outright; its
// variables are never mixed with another's):
//   1. torchrun / `shoal run` (source "torchrun", when RANK or WORLD_SIZE is set): RANK and
//      WORLD_SIZE (both required), LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK. Hand-written
//      exports may stop at RANK/WORLD_SIZE: LOCAL_WORLD_SIZE then defaults to WORLD_SIZE,
//      LOCAL_RANK to RANK mod LOCAL_WORLD_SIZE and GROUP_RANK to RANK / LOCAL_WORLD_SIZE.
//   2. Open MPI's mpirun ("openmpi"): OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE.
//      Checked before Slurm because under mpirun inside sbatch both sets exist and SLURM_PROCID
//      then numbers mpirun's daemons, not the ranks. node_rank = rank / local size (mpirun's
//      default --map-by slot; OMPI_COMM_WORLD_NODE_RANK is not a node index).
//   3. PMIx ("pmix", srun --mpi=pmix, which sets no OMPI_* variables): PMIX_RANK; world size
//      from SLURM_NTASKS (or SLURM_NPROCS), the rest as for Slurm.
//   4. Slurm ("slurm", inside a job step: SLURM_PROCID and SLURM_STEP_ID set): SLURM_PROCID,
//      SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID; local world size from SLURM_NTASKS_PER_NODE,
//      else this node's entry of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("4(x2),3").
//      The batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but no
//      SLURM_STEP_ID: a process started there without srun is a single process, not rank 0 of
//      a group that would never arrive.
// For every source: MASTER_ADDR if set, else the first host of SLURM_JOB_NODELIST (or
// SLURM_NODELIST; ranges like node[01-03,07] expanded), else 127.0.0.1. MASTER_PORT if set,
// else (outside torchrun, inside a Slurm job) 20000 + SLURM_JOB_ID % 10000 so that two jobs
// sharing a node do not collide, else 29500. restart_count from SHOAL_RESTART_COUNT, else
// TORCHELASTIC_RESTART_COUNT, else 0.
// Nothing set: a single process (rank 0 of 1, source "single"). Pure apart from reading the
// environment; thread-safe as far as the `getenv` passed in is.
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

// Reads the variables through `getenv` (tests pass a map); unset and empty variables are the
// same. kInvalidArgument names the variable for a non-integer, negative, or inconsistent value
// (rank >= world size, local rank >= local world size, a port outside 1-65535, a required
// partner variable missing, a malformed node list).
absl::StatusOr<DistributedEnv> DetectDistributedEnv(
    const std::function<const char*(const char*)>& getenv);

// The same over the process environment.
absl::StatusOr<DistributedEnv> DetectDistributedEnv();

// Slurm's compressed host list, as `scontrol show hostnames` expands it:
// "node[01-03,07],gpu5" -> {"node01", "node02", "node03", "node07", "gpu5"}; zero padding
// follows the lower bound; several bracket groups multiply ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1
// r2n2). kInvalidArgument, naming the list, for an empty list or name, unbalanced brackets, a
// bad or reversed range, or more than a million hosts.
absl::StatusOr<std::vector<std::string>> ExpandSlurmNodeList(const std::string& list);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_ENV_H_
