// SwarmPeakGflops (launch/swarm_worker.h): the denominator of a swarm trainer's MFU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "launch/swarm_worker.h"

namespace shoal::launch {
namespace {

v1::SwarmPeerEntry* AddPeer(v1::SwarmStageEntry* stage, const std::string& id,
                            const std::string& state, const std::string& host, double gflops) {
  v1::SwarmPeerEntry* p = stage->add_peers();
  p->set_id(id);
  p->set_state(state);
  p->set_host(host);
  p->set_peak_gflops(gflops);
  return p;
}

TEST(SwarmPeakGflopsTest, EmptyRosterHasNoPeak) {
  EXPECT_EQ(SwarmPeakGflops(v1::SwarmRoster()), 0.0);
}

TEST(SwarmPeakGflopsTest, PeersOfOneHostShareItsPeakAndHostsAdd) {
  v1::SwarmRoster r;
  v1::SwarmStageEntry* s0 = r.add_stages();
  v1::SwarmStageEntry* s1 = r.add_stages();
  AddPeer(s0, "a", "SERVING", "h1", 100);
  AddPeer(s1, "b", "SERVING", "h1", 100);
  EXPECT_DOUBLE_EQ(SwarmPeakGflops(r), 100);  // one host, counted once
  AddPeer(s1, "c", "DRAINING", "h2", 40);
  EXPECT_DOUBLE_EQ(SwarmPeakGflops(r), 140);
  // Peers of one host that measured it differently: the host's best measurement.
  AddPeer(s0, "d", "SERVING", "h2", 60);
  EXPECT_DOUBLE_EQ(SwarmPeakGflops(r), 160);
}

TEST(SwarmPeakGflopsTest, OnlyServingAndDrainingPeersWithARateCount) {
  v1::SwarmRoster r;
  v1::SwarmStageEntry* s = r.add_stages();
  AddPeer(s, "a", "SERVING", "h1", 10);
  AddPeer(s, "b", "SYNCING", "h2", 1000);  // computes nothing yet
  AddPeer(s, "c", "SERVING", "h3", 0);
  AddPeer(s, "d", "SERVING", "h4", -5);
  AddPeer(s, "e", "SERVING", "h5", std::numeric_limits<double>::quiet_NaN());
  AddPeer(s, "f", "SERVING", "h6", std::numeric_limits<double>::infinity());
  EXPECT_DOUBLE_EQ(SwarmPeakGflops(r), 10);
}

TEST(SwarmPeakGflopsTest, PeersWithoutAHostEachCountAsOne) {
  v1::SwarmRoster r;
  v1::SwarmStageEntry* s = r.add_stages();
  AddPeer(s, "a", "SERVING", "", 10);
  AddPeer(s, "b", "SERVING", "", 20);
  AddPeer(s, "c", "SERVING", "a", 5);  // a host named as a peer's id is still another host
  EXPECT_DOUBLE_EQ(SwarmPeakGflops(r), 35);
}

}  // namespace
}  // namespace shoal::launch
