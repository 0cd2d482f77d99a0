// Hosts on one machine joined by rate-limited links, for benchmarks of slow networks
// (`shoal bench swarm --link-mbit`): each host is a network namespace of its own with one veth
// pair to a bridge (in a namespace of its own too), shaped with tc `tbf` to the rate in both
// directions; the calling process joins the bridge with an unshaped veth of its own, so it can
// reach every host (status pages) without slowing them. Everything it creates is named after
// this process's pid and removed when it is destroyed (and, should the process be killed first,
// by the next Create, which removes the namespaces of pids no longer running). Root only (ENVIRONMENT.md §8: veth, tbf
// and bridges work on this kernel; netem does not, so there is no added delay).
#ifndef SHOAL_BENCH_SHAPED_NETWORK_H_
#define SHOAL_BENCH_SHAPED_NETWORK_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace shoal::bench {

class ShapedNetwork {
 public:
  // `hosts` in [1, 200]; `mbit` > 0 limits every host's link to that many Mb/s each way, 0 leaves
  // them unlimited (the same topology, for the unshaped baseline). kFailedPrecondition when not
  // root or `ip`/`tc` fail (the message names the command and what it printed), after removing
  // whatever was made.
  static absl::StatusOr<std::unique_ptr<ShapedNetwork>> Create(int hosts, double mbit);
  // Whether this process can make one: kFailedPrecondition, saying why, when it is not root or
  // has no `ip` and `tc`.
  static absl::Status Available();
  ~ShapedNetwork();
  ShapedNetwork(const ShapedNetwork&) = delete;
  ShapedNetwork& operator=(const ShapedNetwork&) = delete;

  int hosts() const { return static_cast<int>(namespaces_.size()); }
  // The namespace host `i` runs in (ChildProcess::set_netns) and its IPv4 address.
  const std::string& netns(int i) const { return namespaces_[i]; }
  std::string address(int i) const;
  double mbit() const { return mbit_; }

 private:
  ShapedNetwork() = default;
  void Remove();
  // Deletes the namespaces an earlier run left behind (its pid no longer runs).
  static void RemoveStale();

  std::string prefix_;   // "10.231.N." : the /24 every host and this process are in
  std::string bridge_;   // the bridge's namespace
  std::string self_;     // this process's veth, in its own namespace
  std::vector<std::string> namespaces_;
  double mbit_ = 0;
};

}  // namespace shoal::bench

#endif  // SHOAL_BENCH_SHAPED_NETWORK_H_
