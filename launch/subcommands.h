// Subcommands with their own argument parsing, dispatched from main() before the training CLI.
// Each takes argv starting at its own name and returns the process exit code (0 ok, 2 bad input
// or usage, 1 anything else).
#ifndef SHOAL_LAUNCH_SUBCOMMANDS_H_
#define SHOAL_LAUNCH_SUBCOMMANDS_H_

namespace shoal::launch {

// shoal coordinator --listen HOST:PORT [--token-file F] [--tls-cert C --tls-key K]
//                   [--http HOST:PORT] [--lease-s S] ...
int CoordinatorMain(int argc, char** argv);
// shoal status --coordinator HOST:PORT [--json] [--token-file F] [--tls-ca F]
int StatusMain(int argc, char** argv);
// shoal bench coordinator [--max-devices N] [--heartbeat-seconds S]   (argv starts at "coordinator")
int BenchCoordinatorMain(int argc, char** argv);
// shoal simulate --devices FILE [--churn RATE] [--steps N] [--seed S] [--json]
int SimulateMain(int argc, char** argv);
// shoal profile [--throttle F] [--refresh] [--disk-path P] [--json]: this machine's device profile
int ProfileMain(int argc, char** argv);
// shoal bench split --config FILE --throttle F [--stages K] [--micro-batches M] [--set ...]
// (argv starts at "split"): the solver's uneven split vs the uniform one on measured block times
int BenchSplitMain(int argc, char** argv);
// shoal bench hetero --config FILE [--throttle F] [--micro-batches M] [--steps N] [--set ...]
// (argv starts at "hetero"): a real 2-stage pipeline on two ranks, rank 1 slowed down, with the
// solver's split vs the uniform one; final JSON line with `ratio`
int BenchHeteroMain(int argc, char** argv);
// shoal bench pipeline [--stages 2,4] [--micro-batches 8] [--schedule 1f1b|gpipe|both]
//                      [--forward-ms 20] [--backward-ms 40] [--work sleep|gemm] [--steps 5]
// (argv starts at "pipeline"): the pipeline executor's measured bubble against theory, per
// schedule and stage count, on stages of fixed time; a table and a final JSON line
int BenchPipelineMain(int argc, char** argv);
// shoal bench demo --config FILE [--ranks 2] [--steps N] [--demo-lr X] [--adamw-lr X] [--set ...]
// (argv starts at "demo"): AdamW + all-reduce against DeMo on real ranks, same steps: bytes on
// the wire per step and final validation loss; a table and a JSON line with `bytes_ratio`
int BenchDemoMain(int argc, char** argv);
// shoal bench memory --config FILE [--budget 1GiB] [--disk-path DIR] [--steps 3] [--max-params N]
//                    [--over 4] [--part a|b|both] [--keep DIR] [--set ...]
// (argv starts at "memory"): training with the model states paged to a disk tier under a host
// budget against all in RAM; a table on stderr and a JSON line with `states_over_budget`,
// `throughput_ratio`
int BenchMemoryMain(int argc, char** argv);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_SUBCOMMANDS_H_
