// The benchmarks one by one, as bench_main.cc lists them. Each takes argv starting at its own
// name and returns the process's exit code (0 ok, 2 bad input or usage, 1 anything else; see
// BenchHost::exit_code).
#ifndef SHOAL_BENCH_BENCHES_H_
#define SHOAL_BENCH_BENCHES_H_

#include "bench/bench_main.h"

namespace shoal::bench {

// shoal bench dp --config FILE [--steps N] [--set ...]: `shoal bench train` as 2 ranks x 1
// thread against 1 rank x 2 threads at the same global batch; a JSON line with `ratio`.
int DpBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench allocator --config FILE [--steps N] [--rounds R] [--set ...]: `shoal bench train`
// with SHOAL_HOST_ALLOCATOR=system against =keep (common/host_allocator.h), alternated R times;
// a JSON line with `ratio` (keep's tokens/s over system's).
int AllocatorBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench comm [--backend gloo|mpi|nccl] [--ranks N] [--max-mb MB] [--iterations K]:
// outside a job, starts N ranks of this binary (`shoal run`, or mpirun for mpi) on the same
// command; inside one, RunCommBench on this rank (comm_bench.h).
int CommBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench coordinator [--max-devices N] [--heartbeat-seconds S] [--workers W]
//                         [--in-flight K]: layout solve time on synthetic clusters and
// heartbeats per second of a `shoal coordinator` child pinned to one core.
int CoordinatorBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench split --config FILE --throttle F [--stages K] [--micro-batches M] [--set ...]:
// the solver's uneven split vs the uniform one on measured block times.
int SplitBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench hetero --config FILE [--throttle F] [--micro-batches M] [--steps N] [--set ...]:
// a real 2-stage pipeline on two ranks, rank 1 slowed down, with the solver's split vs the
// uniform one; final JSON line with `ratio`.
int HeteroBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench pipeline [--stages 2,4] [--micro-batches 8] [--schedule 1f1b|gpipe|both]
//                      [--forward-ms 20] [--backward-ms 40] [--work sleep|gemm] [--steps 5]:
// the pipeline executor's measured bubble against theory, per schedule and stage count, on
// stages of fixed time (pipeline_bench.h); a table and a final JSON line.
int PipelineBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench demo --config FILE [--ranks 2] [--steps N] [--demo-lr X] [--adamw-lr X] [--set ...]:
// AdamW + all-reduce against DeMo on real ranks, same steps: bytes on the wire per step and
// final validation loss; a table and a JSON line with `bytes_ratio`.
int DemoBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench memory --config FILE [--budget 1GiB] [--disk-path DIR] [--steps 3] [--max-params N]
//                    [--over 4] [--part a|b|both] [--keep DIR] [--set ...]: training with the
// model states paged to a disk tier under a host budget against all in RAM; a table on stderr
// and a JSON line with `states_over_budget`, `throughput_ratio`.
int MemoryBenchMain(int argc, char** argv, const BenchHost& host);

// shoal bench swarm [--config FILE] [--seconds S] [--throttle F] [--kill-every S]
//                   [--arms churn,straggler] [--work-dir DIR] [--set ...]: a swarm (3 stages x 2
// peers) against the static pipeline (pp 3, dp 2) with and without a worker killed every S
// seconds, and a straggling stage with and without the rebalancer; committed tokens/s; a JSON
// line with `churn_ratio`, `churn_free_ratio`, `straggler_ratio`.
int SwarmBenchMain(int argc, char** argv, const BenchHost& host);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_BENCHES_H_
