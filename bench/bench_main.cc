#include "bench/bench_main.h"

#include "bench/benches.h"

namespace shoal::bench {

std::vector<Subcommand> Benches(const BenchHost& host) {
  // Each entry binds the host into the benchmark's main.
  auto bind = [&host](int (*main)(int, char**, const BenchHost&)) {
    return [main, host](int argc, char** argv) { return main(argc, argv, host); };
  };
  std::vector<Subcommand> table = {
      {"dp", "Data parallel on one host: 2 ranks x 1 thread vs 1 rank x 2 threads, same global batch",
       bind(DpBenchMain)},
      {"comm", "All-reduce time and bus bandwidth, 4 KB .. 256 MB, beside raw loopback TCP",
       bind(CommBenchMain)},
      {"split", "The solver's uneven pipeline split vs the uniform one on measured block times",
       bind(SplitBenchMain)},
      {"pipeline", "Pipeline schedules: measured bubble fraction against (p-1)/(m+p-1), p = 2, 4",
       bind(PipelineBenchMain)},
      {"hetero", "Two ranks, one slowed down: 2-stage pipeline with the solver's split vs uniform",
       bind(HeteroBenchMain)},
      {"demo", "AdamW + fp32 all-reduce vs DeMo on real ranks: bytes per step and validation loss",
       bind(DemoBenchMain)},
      {"memory", "Model states paged to disk under a host budget vs all in RAM: tokens/s, RSS",
       bind(MemoryBenchMain)},
      {"allocator",
       "Host memory: bench train with glibc's allocator defaults vs freed blocks kept for reuse",
       bind(AllocatorBenchMain)},
  };
#ifdef SHOAL_HAVE_COORDINATOR
  // They run the coordinator (SHOAL_COORDINATOR: gRPC).
  table.push_back({"swarm",
                   "A swarm vs the static pipeline with workers killed, and a straggler with and "
                   "without the rebalancer: committed tokens/s",
                   bind(SwarmBenchMain)});
  table.push_back(
      {"coordinator",
       "Coordinator: layout solve time on 16 .. 4096 synthetic devices, heartbeats per second",
       bind(CoordinatorBenchMain)});
#endif
  return table;
}

int BenchMain(int argc, char** argv, const BenchHost& host, const std::vector<Subcommand>& extra) {
  std::vector<Subcommand> table = extra;
  for (Subcommand& s : Benches(host)) table.push_back(std::move(s));
  return RunSubcommand("shoal bench",
                       "shoal bench: benchmarks that print figures (a table, then one JSON line)",
                       table, argc, argv);
}

}  // namespace shoal::bench
