// A real Gloo group of two in one test process: rendezvous needs both ranks at once, so each is
// built on its own thread. For tests of what runs over a group (the pipeline executor, its
// benchmark).
#ifndef SHOAL_TESTS_GLOO_PAIR_H_
#define SHOAL_TESTS_GLOO_PAIR_H_

#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "comm/backend.h"
#include "comm/store.h"

namespace shoal {

inline void MakePairInThreads(std::shared_ptr<comm::Store> store,
                              std::unique_ptr<comm::Backend> out[2]) {
  absl::Status statuses[2];
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      comm::BackendOptions o;
      o.rank = r;
      o.world_size = 2;
      o.store = store;
      o.timeout = absl::Seconds(10);
      o.gloo_hostname = "127.0.0.1";
      auto b = comm::CreateBackend(o);
      statuses[r] = b.status();
      if (b.ok()) out[r] = std::move(*b);
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(statuses[0].ok() && statuses[1].ok()) << statuses[0] << " / " << statuses[1];
}

}  // namespace shoal

#endif  // SHOAL_TESTS_GLOO_PAIR_H_
