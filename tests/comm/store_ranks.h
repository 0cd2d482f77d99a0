// Starting rank processes around a TCP store that the test itself serves: the common opening of
// the multi-process tests that build their own groups (the ranks connect to 127.0.0.1 on the port
// they are given).
#ifndef SHOAL_TESTS_COMM_STORE_RANKS_H_
#define SHOAL_TESTS_COMM_STORE_RANKS_H_

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/store.h"
#include "tests/comm/rank_launcher.h"

namespace shoal::testing {

// Serves a TCP store for `world` ranks on a free port, starts ranks 0 .. world-1 with `env` plus
// `port_env` set to that port, and waits for them (LaunchRanks' `deadline`). The store lives until
// every rank has exited. The store server's error otherwise.
inline absl::StatusOr<std::vector<RankResult>> LaunchRanksWithStore(
    int world, std::map<std::string, std::string> env, const std::string& port_env,
    std::chrono::seconds deadline) {
  comm::TcpStoreOptions o;
  o.port = 0;  // a free port, published to the ranks
  o.is_server = true;
  o.world_size = world;
  o.timeout = absl::Seconds(30);
  absl::StatusOr<std::shared_ptr<comm::Store>> server = comm::MakeTcpStore(o);
  if (!server.ok()) return server.status();
  env[port_env] = std::to_string((*server)->port());
  std::vector<int> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(r);
  return LaunchRanks(ranks, env, deadline);
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_COMM_STORE_RANKS_H_
