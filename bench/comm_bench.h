// `shoal bench comm`: how fast one backend all-reduces, next to what the raw transport can do.
//
// RunCommBench runs inside every rank (a launcher or mpirun starts the ranks) and is collective:
// every rank calls it with the same options except `rank`. It builds the backend, then for each
// message size (min_bytes, x4 ... max_bytes: 4 KB, 16 KB, ..., 256 MB by default) times
// `iterations` float32 all-reduces (sum) after `warmup` untimed ones; the time of a size is the
// slowest rank's average. Rank 0 prints, to `out`:
//   - one line per size: time per all-reduce, algorithm bandwidth (bytes / time) and bus
//     bandwidth (2 (N-1)/N x bytes / time, the traffic per rank of a ring all-reduce, so it is
//     comparable with the link speed and across N);
//   - once, the raw TCP bandwidth of 127.0.0.1 measured in the same run: rank 1 (or, with one
//     rank or ranks on different hosts, a thread of rank 0) receives `loopback_bytes` that rank 0
//     streams over one plain socket;
//   - a final line of JSON with all of it ({"bench":"comm", ...}).
// Blocks until done. Errors: CreateBackend's, a failed collective's, kUnavailable for a socket
// failure of the loopback measurement, kInvalidArgument for bad sizes.
#ifndef SHOAL_BENCH_COMM_BENCH_H_
#define SHOAL_BENCH_COMM_BENCH_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "comm/store.h"

namespace shoal::bench {

struct CommBenchOptions {
  std::string backend = "gloo";         // "gloo", "mpi" or "nccl"
  int rank = 0;                         // this rank
  int world_size = 1;                   // ranks N
  // Rendezvous for gloo/nccl: rank 0 serves a TCP store on master_addr:master_port, the others
  // connect. Ignored by mpi, and when `store` is given.
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::shared_ptr<comm::Store> store;   // optional: rendezvous through this store instead
  std::string gloo_hostname;            // comm::BackendOptions::gloo_hostname
  absl::Duration timeout = absl::Seconds(120);  // rendezvous and per-operation timeout
  int64_t min_bytes = int64_t{4} << 10;   // first message size (bytes, a multiple of 4)
  int64_t max_bytes = int64_t{256} << 20; // last message size
  int iterations = 10;                  // timed all-reduces per size
  int warmup = 2;                       // untimed all-reduces per size, before the timed ones
  int64_t loopback_bytes = int64_t{256} << 20;  // streamed over TCP on 127.0.0.1; 0: skip
  std::ostream* out = nullptr;          // rank 0's report; nullptr: std::cout
};

absl::Status RunCommBench(const CommBenchOptions& options);

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_COMM_BENCH_H_
