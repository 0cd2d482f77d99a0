// `shoal bench <name> ...`: the table of benchmarks and its dispatcher.
//
// bench/ is a library above the ones it measures (comm, parallel, runtime, scheduler); launch/
// links it and hands `shoal bench ...` to BenchMain. What a benchmark needs from the program that
// runs it, and which only launch/ may decide (where this process sits in a job, how a status
// becomes an exit code), comes in through BenchHost, so bench/ never depends on launch/.
//
// A benchmark is a `main`: it parses its own flags (CLI11; a usage error is exit 2, --help exit
// 0), prints its figures (a table on stdout or stderr, then one JSON line on stdout, which tests
// and scripts parse) and returns the process's exit code. Every call blocks until the benchmark
// is done; none is thread-safe (they start processes and print).
#ifndef SHOAL_BENCH_BENCH_MAIN_H_
#define SHOAL_BENCH_BENCH_MAIN_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/subcommand_table.h"

namespace shoal::bench {

// This process's place in a distributed job, as the launcher's environment gives it.
struct RankEnv {
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int restart_count = 0;  // how many times the launcher restarted the group
};

// What the program running the benchmarks provides.
struct BenchHost {
  // Reads this process's RankEnv from the environment (torchrun / `shoal run`, mpirun, Slurm, or
  // a single process); kInvalidArgument naming a malformed variable.
  std::function<absl::StatusOr<RankEnv>()> detect_rank;
  // The exit code for a failed status (launch/'s one mapping). Prints nothing: the benchmark
  // prints its own "shoal bench <name>: error: ..." line.
  std::function<int(const absl::Status&)> exit_code;
};

// The benchmarks of this library, `host` bound into each (common/subcommand_table.h), in the
// order `shoal bench --help` lists them.
std::vector<Subcommand> Benches(const BenchHost& host);

// `shoal bench <name> [flags]`, argv starting at "bench": runs the benchmark called <name> among
// `extra` (benchmarks the caller owns: launch/'s `bench train` runs the trainer itself) and
// Benches(host), and returns its exit code. `--help` lists them (exit 0); no name or an unknown
// one is a usage error (exit 2, the list on stderr).
int BenchMain(int argc, char** argv, const BenchHost& host,
              const std::vector<Subcommand>& extra = {});

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_BENCH_MAIN_H_
