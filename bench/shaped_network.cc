#include "bench/shaped_network.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_runs.h"
#include "common/status.h"

namespace shoal::bench {
namespace {

// Runs `command` (its output echoed, as every command a benchmark runs); an error naming the
// shaped network and the command when it fails.
absl::Status Sh(const std::string& command) {
  absl::Status s = RunEchoing(command);
  if (s.ok()) return s;
  return absl::FailedPreconditionError(absl::StrCat("shaped network: ", s.message()));
}

}  // namespace

void ShapedNetwork::RemoveStale() {
  std::vector<std::string> stale;
  // "shoal<pid>-<host>" or "shoal<pid>-br", maybe followed by " (id: N)"; grep finding none is
  // not an error here.
  (void)RunEchoing("ip netns list | grep '^shoal'", [&](const std::string& line) {
    int pid = 0;
    char rest[256];
    if (std::sscanf(line.c_str(), "shoal%d-%255s", &pid, rest) == 2 && pid > 0 &&
        ::kill(pid, 0) != 0 && errno == ESRCH) {
      stale.push_back(line.substr(0, line.find_first_of(" \n")));
    }
  });
  for (const std::string& ns : stale) (void)Sh("ip netns del " + ns);
}

absl::Status ShapedNetwork::Available() {
  if (::geteuid() != 0) {
    return absl::FailedPreconditionError(
        "the links arms (--link-mbit) put every process in a network namespace of its own "
        "behind a tc-shaped veth, which needs root: run as root, or leave links out of --arms");
  }
  if (!RunEchoing("command -v ip >/dev/null && command -v tc >/dev/null").ok()) {
    return absl::FailedPreconditionError(
        "the links arms (--link-mbit) need `ip` and `tc` (Debian: apt-get install iproute2)");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ShapedNetwork>> ShapedNetwork::Create(int hosts, double mbit) {
  if (hosts < 1 || hosts > 200) {
    return absl::InvalidArgumentError(absl::StrCat("shaped network: hosts must be in [1, 200], got ",
                                                   hosts));
  }
  if (!std::isfinite(mbit) || mbit < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--link-mbit must be a rate in Mb/s >= 0, got ", mbit));
  }
  SHOAL_RETURN_IF_ERROR(Available());
  RemoveStale();
  std::unique_ptr<ShapedNetwork> net(new ShapedNetwork());
  const int pid = static_cast<int>(::getpid());
  const std::string tag = absl::StrCat("shoal", pid);
  net->prefix_ = absl::StrCat("10.231.", pid % 256, ".");
  net->bridge_ = tag + "-br";
  net->self_ = absl::StrCat("sh", pid % 10000000);
  net->mbit_ = mbit;
  // A subnet another run (or the machine) already uses would route elsewhere.
  if (RunEchoing(absl::StrCat("ip -4 addr show | grep -q ' ", net->prefix_, "'")).ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shaped network: ", net->prefix_, "0/24 is in use on this machine"));
  }
  const std::string tbf =
      absl::StrCat(" root tbf rate ", mbit, "mbit burst 32kbit latency 400ms");
  std::vector<std::string> steps = {
      "ip netns add " + net->bridge_,
      "ip -n " + net->bridge_ + " link add br0 type bridge",
      "ip -n " + net->bridge_ + " link set br0 up",
      "ip -n " + net->bridge_ + " link set lo up",
      // This process's own, unshaped link.
      absl::StrCat("ip link add ", net->self_, " type veth peer name self netns ", net->bridge_),
      "ip -n " + net->bridge_ + " link set self master br0",
      "ip -n " + net->bridge_ + " link set self up",
      absl::StrCat("ip addr add ", net->prefix_, "254/24 dev ", net->self_),
      absl::StrCat("ip link set ", net->self_, " up"),
  };
  for (int i = 0; i < hosts; ++i) {
    const std::string ns = absl::StrCat(tag, "-", i);
    const std::string port = absl::StrCat("h", i);
    net->namespaces_.push_back(ns);
    for (const std::string& s : {
             "ip netns add " + ns,
             absl::StrCat("ip link add eth0 netns ", ns, " type veth peer name ", port, " netns ",
                          net->bridge_),
             absl::StrCat("ip -n ", net->bridge_, " link set ", port, " master br0"),
             absl::StrCat("ip -n ", net->bridge_, " link set ", port, " up"),
             absl::StrCat("ip -n ", ns, " addr add ", net->address(i), "/24 dev eth0"),
             absl::StrCat("ip -n ", ns, " link set eth0 up"),
             absl::StrCat("ip -n ", ns, " link set lo up"),
         }) {
      steps.push_back(s);
    }
    if (mbit > 0) {
      steps.push_back(absl::StrCat("ip netns exec ", ns, " tc qdisc replace dev eth0", tbf));
      steps.push_back(
          absl::StrCat("ip netns exec ", net->bridge_, " tc qdisc replace dev ", port, tbf));
    }
  }
  for (const std::string& step : steps) {
    if (absl::Status s = Sh(step); !s.ok()) {
      net->Remove();
      return s;
    }
  }
  return net;
}

std::string ShapedNetwork::address(int i) const { return absl::StrCat(prefix_, i + 1); }

ShapedNetwork::~ShapedNetwork() { Remove(); }

void ShapedNetwork::Remove() {
  // Quietly: after a failed Create some of them were never made.
  for (const std::string& ns : namespaces_) (void)RunEchoing("ip netns del " + ns + " 2>/dev/null");
  namespaces_.clear();
  if (!bridge_.empty()) (void)RunEchoing("ip netns del " + bridge_ + " 2>/dev/null");
  bridge_.clear();
  // Deleting the bridge's namespace removes the veth pair too, but not at once.
  if (!self_.empty()) (void)RunEchoing("ip link del " + self_ + " 2>/dev/null || true");
  self_.clear();
}

}  // namespace shoal::bench
