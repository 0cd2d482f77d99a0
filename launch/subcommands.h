// The subcommands of `shoal` that launch/ owns, as main.cc's table dispatches them (the benchmarks
// are bench/'s, bench/benches.h). Each takes argv starting at its own name, parses its own flags
// and returns the process exit code (0 ok, 2 bad input or usage, 1 anything else; exit_code.h).
#ifndef SHOAL_LAUNCH_SUBCOMMANDS_H_
#define SHOAL_LAUNCH_SUBCOMMANDS_H_

namespace shoal::launch {

// shoal coordinator --listen HOST:PORT [--token-file F] [--tls-cert C --tls-key K]
//                   [--http HOST:PORT] [--lease-s S] ...
int CoordinatorMain(int argc, char** argv);
// shoal worker --join HOST:PORT [--trainer] [--token-file F] [--advertise A] ...: a swarm's
// peer or trainer (swarm_worker.h)
int WorkerMain(int argc, char** argv);
// shoal status --coordinator HOST:PORT [--json] [--token-file F] [--tls-ca F]
int StatusMain(int argc, char** argv);
// shoal simulate --devices FILE [--churn RATE] [--steps N] [--seed S] [--json]
int SimulateMain(int argc, char** argv);
// shoal profile [--throttle F] [--refresh] [--disk-path P] [--json]: this machine's device profile
int ProfileMain(int argc, char** argv);

// shoal train --config FILE [--set section.key=value ...] [--resume] [--stop-after N]
//             [--throttle F [--throttle-rank R]] [--coordinator HOST:PORT
//             [--coordinator-token-file F] [--coordinator-ca F] [--coordinator-timeout S]]
int TrainMain(int argc, char** argv);
// shoal bench train --config FILE [--steps N] [--threads T] [--throttle F] [--throttle-rank R]
//                   [--set ...] (argv starts at "train"): the trainer in bench mode, 3 warm-up
// steps then N timed ones; rank 0 prints one JSON line (tokens_per_s, mfu, step_time_ms, ...).
int BenchTrainMain(int argc, char** argv);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_SUBCOMMANDS_H_
