// `shoal run`: a torchrun-compatible launcher for the ranks of one node.
//
//   shoal run [--nproc-per-node N|cpu|auto] [--nnodes N] [--node-rank R]
//             [--master-addr A] [--master-port P] [--rdzv-endpoint HOST[:PORT]]
//             [--rdzv-backend static|c10d] [--rdzv-id ID] [--standalone]
//             [--max-restarts K] [--monitor-interval S] [--stop-grace S] [--signal-grace S]
//             [--worker-binary PATH] -- <worker arguments, e.g. train --config x.toml>
//
// Flags take torchrun's names, with hyphens or underscores (--nproc_per_node), and torchrun's
// PET_<NAME> environment variables as defaults (PET_NPROC_PER_NODE=4). The `--` may be left
// out when the worker arguments start with a word (`shoal run --nproc-per-node 2 train ...`).
//
// What it does:
//  * Starts N local ranks, each `--worker-binary` (default: this `shoal` binary, via
//    /proc/self/exe) with the worker arguments, stdin from /dev/null, in its own process group,
//    and with PR_SET_PDEATHSIG so that no rank outlives a killed launcher. Each rank's
//    environment adds RANK (= node_rank * N + local_rank), LOCAL_RANK, WORLD_SIZE
//    (= nnodes * N), LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_NAME, ROLE_RANK,
//    ROLE_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT and
//    SHOAL_RESTART_COUNT (the restart number), TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID,
//    and OMP_NUM_THREADS=1 when N > 1 and it is unset (with a one-line notice).
//  * Relays every line a rank writes, prefixed "[rank<R>]: ", to the launcher's stdout or
//    stderr (whichever the rank used), one write per line. Programs that buffer a piped stdout
//    show it in blocks; shoal's own logging goes to stderr unbuffered.
//  * Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGUSR1 to every rank's process group. After
//    INT/TERM/HUP/QUIT the ranks get --signal-grace (default 30 s, torchrun's) to write a
//    checkpoint and exit, then SIGKILL; the launcher then exits 128 + that signal and never
//    restarts. After SIGUSR1 (Slurm's warning before preemption or the time limit) it waits for
//    the ranks and exits with the first failed rank's code, or 0.
//  * When a rank fails (non-zero exit or a signal) while others run, sends SIGTERM to the
//    others, SIGKILL after --stop-grace (default 5 s), and prints a root-cause block in
//    torchrun's style on stderr: the first failed rank and local rank, its exit code or signal,
//    pid, host, time and last 10 lines, then any other failures and the ranks it stopped.
//  * Then, while restarts remain (--max-restarts, default 0), starts the whole group again with
//    the restart counter + 1 and `--resume` appended to the worker arguments (unless already
//    there), so that `shoal train` workers continue from their newest valid checkpoint.
//    Otherwise exits with the failed rank's code (128 + signal for a signal).
//  * All ranks exiting 0: exit 0. Bad flags: a message naming the flag and exit 2. The
//    launcher itself failing (fork, pipe): exit 1.
//
// Rendezvous is static: the ranks meet at MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500;
// --rdzv-endpoint HOST[:PORT] is the same thing, port 29400 by default; --rdzv-backend c10d is
// accepted and means the same). --standalone (one node) picks a free port on 127.0.0.1.
// Multi-node: every node runs the same command with its own --node-rank,
//   node 0:  shoal run --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr n0 -- train ...
//   node 1:  shoal run --nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr n0 -- train ...
// (deploy/slurm/train-multinode.sbatch does this through srun). --node-rank and --master-addr
// (or --rdzv-endpoint) are required when --nnodes > 1; elastic ranges (--nnodes 1:4) are not
// supported. Restarts are per node: they work across nodes when a failure brings every node's
// group down (the surviving ranks fail on the lost peer) and every node has restarts left.
#ifndef SHOAL_LAUNCH_LAUNCHER_H_
#define SHOAL_LAUNCH_LAUNCHER_H_

namespace shoal::launch {

// Entry point of `shoal run ...`: argv[0] is "run". Parses its own flags, starts the local
// ranks, supervises and restarts them as above, and returns the process exit code. Blocks until
// the ranks are done. Installs its own signal handlers for the duration (restored on return);
// call it from the main thread, once.
int RunLauncherMain(int argc, char** argv);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_LAUNCHER_H_
