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

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_SUBCOMMANDS_H_
