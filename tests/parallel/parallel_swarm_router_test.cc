// The swarm router (ALGORITHMS.md §2.4, §2.13 items 1, 2, 8): the throughput EMA against its
// closed form, the weighted round-robin's shares against t_i / sum(t) in a fake-clock simulation
// of peers of fixed speed, new-peer fairness, bans and their fallback, determinism.
#include "parallel/swarm_router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace shoal::parallel {
namespace {

std::unique_ptr<StageRouter> MakeRouter(uint64_t seed = 7, double initial = 1.0,
                                        uint64_t ban_choices = 0) {
  StageRouterOptions options;
  options.stage = "stage 1";
  options.seed = seed;
  options.initial_seconds_per_sample = initial;
  options.ban_choices = ban_choices;
  auto router = StageRouter::Create(options);
  EXPECT_TRUE(router.ok()) << router.status();
  return std::move(router).value();
}

// --- ThroughputEma -------------------------------------------------------------------------------

TEST(ThroughputEma, FirstUpdateIsTheMeasurementItself) {
  // Bias correction: after one update the EMA is samples / seconds, not alpha times it.
  ThroughputEma ema;
  EXPECT_FALSE(ema.measured());
  EXPECT_EQ(ema.Throughput(), 0.0);
  ASSERT_TRUE(ema.Update(4, 0.5).ok());
  EXPECT_EQ(ema.Throughput(), 8.0);  // exact: 4 samples in 0.5 s
  EXPECT_EQ(ema.SecondsPerSample(), 0.125);
  EXPECT_EQ(ema.updates(), 1);

  ThroughputEma odd;
  ASSERT_TRUE(odd.Update(3, 0.7).ok());
  EXPECT_DOUBLE_EQ(odd.Throughput(), 3 / 0.7);
}

TEST(ThroughputEma, ConstantRateIsReportedAsThatRate) {
  for (int n : {2, 5, 40, 300}) {
    ThroughputEma ema;
    for (int i = 0; i < n; ++i) ASSERT_TRUE(ema.Update(2.5, 2.5 / 3.0).ok());  // 3 samples/s
    EXPECT_NEAR(ema.Throughput(), 3.0, 3.0 * 1e-12) << n << " updates";
    EXPECT_EQ(ema.updates(), n);
  }
}

TEST(ThroughputEma, MatchesSwarmsRecurrence) {
  // The closed form as SWARM writes it: ema <- a x + (1 - a) ema; spp = ema / (1 - (1 - a)^n).
  const double a = 0.1;
  const std::vector<std::pair<double, double>> tasks = {{1, 0.5}, {2, 3.0}, {4, 1.0}, {1, 0.25}};
  ThroughputEma ema(a);
  double ref = 0;
  int n = 0;
  for (const auto& [samples, seconds] : tasks) {
    ASSERT_TRUE(ema.Update(samples, seconds).ok());
    ref = a * (seconds / samples) + (1 - a) * ref;
    ++n;
    const double spp = ref / (1 - std::pow(1 - a, n));
    EXPECT_NEAR(ema.SecondsPerSample(), spp, spp * 1e-12);
    EXPECT_NEAR(ema.Throughput(), 1 / spp, 1e-12 / spp);
  }
}

TEST(ThroughputEma, RefusesBadMeasurements) {
  ThroughputEma ema;
  EXPECT_EQ(ema.Update(0, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ema.Update(-1, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ema.Update(NAN, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ema.Update(1, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ema.Update(1, INFINITY).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ema.Update(1, NAN).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ema.measured());
  ASSERT_TRUE(ema.Update(1, 0).ok());  // a task that took no measurable time: finite, huge
  EXPECT_TRUE(std::isfinite(ema.Throughput()));
  EXPECT_GT(ema.Throughput(), 1e15);
}

// --- StageRouter: proportional shares ------------------------------------------------------------

// A fake-clock run: peers of fixed true throughputs, each serving its tasks one at a time in
// arrival order; the trainer keeps `in_flight` tasks of `size` going, submitting a new one
// whenever one ends, and reports each with its service time (its time less its wait in the
// peer's queue, as a peer's reply tells the trainer). With `jitter` > 0 each service time is
// multiplied by a factor drawn uniformly from [1 - jitter, 1 + jitter] (mean 1, seeded). Returns
// how many tasks each peer got.
std::map<std::string, int> Simulate(StageRouter* router, const std::map<std::string, double>& rate,
                                    int tasks, int in_flight, double size, double jitter = 0) {
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> factor(1 - jitter, 1 + jitter);
  std::map<std::string, int> count;
  std::map<std::string, double> free_at;  // when each peer finishes its queue
  struct Task {
    std::string peer;
    double service, ends;
  };
  std::vector<Task> running;
  double now = 0;
  int submitted = 0;
  auto submit = [&]() {
    auto peer = router->Choose(size);
    EXPECT_TRUE(peer.ok()) << peer.status();
    const double start = std::max(now, free_at[*peer]);
    const double service = size / rate.at(*peer) * (jitter > 0 ? factor(rng) : 1.0);
    free_at[*peer] = start + service;
    running.push_back({*peer, service, start + service});
    ++count[*peer];
    ++submitted;
  };
  for (int i = 0; i < in_flight; ++i) submit();
  while (!running.empty()) {
    auto first = std::min_element(running.begin(), running.end(),
                                  [](const Task& a, const Task& b) { return a.ends < b.ends; });
    Task done = *first;
    running.erase(first);
    now = done.ends;
    EXPECT_TRUE(router->Report(done.peer, size, done.service).ok());
    if (submitted < tasks) submit();
  }
  return count;
}

TEST(StageRouter, SharesFollowThroughputs) {
  // §2.13 item 1: peer i's share of 10^4 tasks is t_i / sum(t) within 2 %.
  const std::map<std::string, double> rate = {{"p1", 1}, {"p2", 2}, {"p4", 4}, {"p8", 8}};
  double total = 0;
  for (const auto& [id, t] : rate) total += t;
  for (int in_flight : {1, 6}) {
    auto router = MakeRouter(11);
    ASSERT_TRUE(router->SetRoster(1, {"p1", "p2", "p4", "p8"}).ok());
    const int tasks = 10000;
    auto count = Simulate(router.get(), rate, tasks, in_flight, 1.0);
    for (const auto& [id, t] : rate) {
      const double share = static_cast<double>(count[id]) / tasks, want = t / total;
      EXPECT_NEAR(share, want, 0.02 * want) << id << " with " << in_flight << " in flight";
      // The router's rate is the peer's true speed: it was told the service times.
      EXPECT_NEAR(*router->Throughput(id), t, 1e-9 * t) << id;
    }
  }
}

TEST(StageRouter, EqualPeersShareEquallyWhenCallsEndOutOfOrderAndReportTheirTimeLessTheQueue) {
  // A trainer's threads: 8 tasks in flight over two peers of the same speed, each peer serving
  // one at a time in arrival order; each report reaches the router a random while after its
  // task ended (so reports come out of order) and gives the task's time less what it waited in
  // the peer's queue. The shares are a half each within 3 %, and each peer is measured at its
  // true rate.
  const std::map<std::string, double> rate = {{"a", 4}, {"b", 4}};
  auto router = MakeRouter(13);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> delay(0, 0.5);
  std::map<std::string, int> count;
  std::map<std::string, double> free_at;
  struct Task {
    std::string peer;
    double service, reported_at;
  };
  std::vector<Task> running;
  double now = 0;
  const double size = 1;
  int submitted = 0;
  auto submit = [&]() {
    auto peer = router->Choose(size);
    ASSERT_TRUE(peer.ok()) << peer.status();
    const double start = std::max(now, free_at[*peer]);
    const double service = size / rate.at(*peer);
    free_at[*peer] = start + service;
    running.push_back({*peer, service, start + service + delay(rng) * service});
    ++count[*peer];
    ++submitted;
  };
  for (int i = 0; i < 8; ++i) submit();
  while (!running.empty()) {
    auto first = std::min_element(running.begin(), running.end(), [](const Task& x, const Task& y) {
      return x.reported_at < y.reported_at;
    });
    const Task done = *first;
    running.erase(first);
    now = done.reported_at;
    ASSERT_TRUE(router->Report(done.peer, size, done.service).ok());
    if (submitted < 4000) submit();
  }
  EXPECT_NEAR(count["a"] / 4000.0, 0.5, 0.015);
  EXPECT_NEAR(count["b"] / 4000.0, 0.5, 0.015);
  for (const char* id : {"a", "b"}) EXPECT_NEAR(*router->Throughput(id), 4, 1e-9) << id;
  EXPECT_FALSE(router->Report("a", size, -1).ok());
  EXPECT_TRUE(absl::IsNotFound(router->Report("z", size, 0.1)));
}

TEST(StageRouter, SharesFollowThroughputsWithNoisyServiceTimes) {
  // Service times off by up to 30 % either way, the EMA smooths the noise and
  // the shares still follow the mean throughputs.
  const std::map<std::string, double> rate = {{"p1", 1}, {"p2", 2}, {"p4", 4}, {"p8", 8}};
  auto router = MakeRouter(3);
  ASSERT_TRUE(router->SetRoster(1, {"p1", "p2", "p4", "p8"}).ok());
  const int tasks = 10000;
  auto count = Simulate(router.get(), rate, tasks, 4, 1.0, 0.3);
  for (const auto& [id, t] : rate) {
    const double share = static_cast<double>(count[id]) / tasks, want = t / 15.0;
    EXPECT_NEAR(share, want, 0.02 * want) << id;
  }
}

TEST(StageRouter, SharesOfWorkFollowThroughputsWithMixedSizes) {
  // Forward (1) and backward (2.5) tasks interleaved: the work each peer got, not its task
  // count, is proportional to its throughput.
  const std::map<std::string, double> rate = {{"a", 3}, {"b", 1}, {"c", 6}};
  auto router = MakeRouter(5);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  std::map<std::string, double> work;
  double total_work = 0;
  for (int i = 0; i < 10000; ++i) {
    const double size = i % 2 == 0 ? 1.0 : 2.5;
    auto peer = router->Choose(size);
    ASSERT_TRUE(peer.ok());
    // One task at a time: it takes size / rate.
    ASSERT_TRUE(router->Report(*peer, size, size / rate.at(*peer)).ok());
    work[*peer] += size;
    total_work += size;
  }
  for (const auto& [id, t] : rate) {
    const double want = t / 10.0;
    EXPECT_NEAR(work[id] / total_work, want, 0.02 * want) << id;
  }
}

TEST(StageRouter, BackwardsOnTheForwardsPeerKeepSharesOfWorkFollowingThroughputs) {
  // Each forward (1) chosen by the router, its backward (2.5) sent to the same peer (ChooseSame):
  // the backward's work still counts in the peer's virtual time, so the shares of work stay
  // proportional to throughputs.
  const std::map<std::string, double> rate = {{"a", 3}, {"b", 1}, {"c", 6}};
  auto router = MakeRouter(5);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  std::map<std::string, double> work;
  double total_work = 0;
  for (int i = 0; i < 5000; ++i) {
    auto forward = router->Choose(1.0);
    ASSERT_TRUE(forward.ok());
    auto backward = router->ChooseSame(*forward, 2.5);
    ASSERT_TRUE(backward.ok());
    ASSERT_EQ(*backward, *forward);
    for (double size : {1.0, 2.5}) {
      ASSERT_TRUE(router->Report(*forward, size, size / rate.at(*forward)).ok());
      work[*forward] += size;
      total_work += size;
    }
  }
  for (const auto& [id, t] : rate) {
    const double want = t / 10.0;
    EXPECT_NEAR(work[id] / total_work, want, 0.02 * want) << id;
  }
  const StageRouterCounters c = router->counters();
  EXPECT_EQ(c.choices, 10000u);
  EXPECT_EQ(c.same_peer_choices, 5000u);
}

TEST(StageRouter, APeerThatJoinsAMeasuredStageGetsItsShareOnceMeasured) {
  // Two peers of equal speed (100 samples/s, tasks of 8 samples), 8 tasks in flight. "a" serves
  // alone for 40 tasks and is measured; then "b" joins. b's first choice is charged at the
  // initial guess (1 s a sample: 8 s, a hundred of a's tasks); its first report must bring it
  // back, so it gets about half of the next 200 tasks, not a handful.
  auto router = MakeRouter(17);
  ASSERT_TRUE(router->SetRoster(1, {"a"}).ok());
  const double size = 8, rate = 100;
  std::map<std::string, double> free_at;
  struct Task {
    std::string peer;
    double ends;
  };
  std::vector<Task> running;
  std::map<std::string, int> count;
  double now = 0;
  int submitted = 0;
  auto submit = [&]() {
    auto peer = router->Choose(size);
    ASSERT_TRUE(peer.ok()) << peer.status();
    const double start = std::max(now, free_at[*peer]);
    free_at[*peer] = start + size / rate;
    running.push_back({*peer, free_at[*peer]});
    if (submitted++ >= 40) ++count[*peer];
  };
  for (int i = 0; i < 8; ++i) submit();
  while (submitted < 240) {
    auto first = std::min_element(running.begin(), running.end(),
                                  [](const Task& x, const Task& y) { return x.ends < y.ends; });
    const Task done = *first;
    running.erase(first);
    now = done.ends;
    ASSERT_TRUE(router->Report(done.peer, size, size / rate).ok());
    if (submitted == 40) ASSERT_TRUE(router->SetRoster(2, {"a", "b"}).ok());
    submit();
  }
  EXPECT_GE(count["b"], 80) << "a got " << count["a"];
  EXPECT_GE(count["a"], 80) << "b got " << count["b"];
}

TEST(StageRouter, ChooseSameFallsBackWhenThePeerCannotServe) {
  auto router = MakeRouter();
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  EXPECT_EQ(*router->ChooseSame("b", 2.5), "b");
  // Banned: another peer, chosen as Choose would.
  ASSERT_TRUE(router->Ban("b").ok());
  for (int i = 0; i < 20; ++i) EXPECT_NE(*router->ChooseSame("b", 2.5), "b");
  // Gone from the roster (and never heard of): another peer.
  ASSERT_TRUE(router->SetRoster(2, {"b", "c"}).ok());
  for (int i = 0; i < 20; ++i) {
    const std::string got = *router->ChooseSame("a", 2.5);
    EXPECT_TRUE(got == "b" || got == "c") << got;
    EXPECT_NE(*router->ChooseSame("nobody", 1), "a");
  }
  // A version lifted b's ban: it is kept again.
  EXPECT_EQ(*router->ChooseSame("b", 2.5), "b");
  EXPECT_EQ(router->counters().same_peer_choices, 2u);
  EXPECT_EQ(router->ChooseSame("b", 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->ChooseSame("b", std::nan("")).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Nothing to fall back on: kUnavailable naming the stage.
  auto empty = MakeRouter();
  absl::StatusOr<std::string> none = empty->ChooseSame("a", 1);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(none.status().message()).find("stage 1"), std::string::npos);
}

// --- StageRouter: held work --------------------------------------------------------------------

// The benchmark's pattern on a fake clock: steps of 16 micro-batches, 8 in flight, over two peers
// of one speed whose service times vary by up to 30 %. A micro-batch's forward (1 sample-unit of
// work) goes to the chosen peer, comes back after a while elsewhere (its later stages), and its
// backward (2.5) runs on the same peer; each peer serves its queue in arrival order. A step's
// micro-batches are leased once the step before has ended. With `hold`, the forward's choice
// holds both tasks until the backward ends (as the trainer does). Returns, per step, how many of
// its micro-batches the busier peer got.
std::vector<int> SimulateSteps(bool hold, int steps) {
  auto router = MakeRouter(17);
  EXPECT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  std::mt19937_64 rng(23);
  std::uniform_real_distribution<double> factor(0.7, 1.3), elsewhere(0.5, 1.5);
  std::map<std::string, double> free_at;
  std::vector<int> busier;
  double now = 0;
  for (int step = 0; step < steps; ++step) {
    struct Micro {
      std::string peer;
      double back_at;  // when its backward reaches the peer
      bool backward_sent = false;
      double ends = 0;  // when its backward ends
    };
    std::vector<Micro> running;
    std::map<std::string, int> count;
    int leased = 0, done = 0;
    auto submit = [&] {
      auto peer = router->Choose(1.0, hold ? 3.5 : 0.0);
      ASSERT_TRUE(peer.ok()) << peer.status();
      const double service = factor(rng) * 0.1;
      const double start = std::max(now, free_at[*peer]);
      free_at[*peer] = start + service;
      running.push_back({*peer, start + service + elsewhere(rng) * 0.2});
      ASSERT_TRUE(router->Report(*peer, 1.0, service).ok());
      ++count[*peer];
      ++leased;
    };
    for (int i = 0; i < 8; ++i) submit();
    while (done < 16) {
      // The next event: a backward reaching its peer, or one ending.
      auto next = running.end();
      double at = 0;
      for (auto it = running.begin(); it != running.end(); ++it) {
        const double t = it->backward_sent ? it->ends : it->back_at;
        if (next == running.end() || t < at) next = it, at = t;
      }
      now = at;
      if (!next->backward_sent) {
        auto same = router->ChooseSame(next->peer, 2.5);
        EXPECT_TRUE(same.ok());
        if (!same.ok()) return busier;
        EXPECT_EQ(*same, next->peer);
        const double service = factor(rng) * 0.25;
        const double start = std::max(now, free_at[next->peer]);
        free_at[next->peer] = start + service;
        next->backward_sent = true;
        next->ends = start + service;
        EXPECT_TRUE(router->Report(next->peer, 2.5, service).ok());
        continue;
      }
      if (hold) EXPECT_TRUE(router->Release(next->peer, 3.5).ok());
      running.erase(next);
      ++done;
      if (leased < 16) submit();
    }
    busier.push_back(std::max(count["a"], count["b"]));
  }
  return busier;
}

TEST(StageRouter, HeldWorkSplitsEveryStepEvenlyBetweenEqualPeers) {
  // Held work: every step's 16 micro-batches split 8/8 or 9/7 between the two peers. The
  // weighted round-robin alone balances the run but not each step (its virtual times drift with
  // the noisy measurements), so the step waits for the busier peer.
  const std::vector<int> held = SimulateSteps(true, 200);
  for (size_t i = 0; i < held.size(); ++i) EXPECT_LE(held[i], 9) << "step " << i;
  const std::vector<int> plain = SimulateSteps(false, 200);
  EXPECT_GT(*std::max_element(plain.begin(), plain.end()), 9);
}

TEST(StageRouter, ChooseTakesTheLeastHeldTimeAgainstBruteForce) {
  // Five peers of random measured rates (one never measured: priced at the measured peers' mean
  // seconds per sample), random holds and releases: every choice is a peer whose held work
  // takes least time, as a scan over the peers computes it.
  auto router = MakeRouter(29);
  const std::vector<std::string> ids = {"p0", "p1", "p2", "p3", "new"};
  ASSERT_TRUE(router->SetRoster(1, ids).ok());
  std::mt19937_64 rng(31);
  std::uniform_real_distribution<double> unit(0.1, 2.0);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(router->Report(ids[i], 1.0, unit(rng)).ok());
  }
  auto seconds_per_sample = [&](const std::string& id) {
    if (router->Throughput(id).has_value()) return 1.0 / *router->Throughput(id);
    double sum = 0;
    for (int i = 0; i < 4; ++i) sum += 1.0 / *router->Throughput(ids[i]);
    return sum / 4;
  };
  std::vector<std::pair<std::string, double>> outstanding;
  for (int n = 0; n < 500; ++n) {
    if (!outstanding.empty() && rng() % 3 == 0) {
      const size_t k = rng() % outstanding.size();
      ASSERT_TRUE(router->Release(outstanding[k].first, outstanding[k].second).ok());
      outstanding.erase(outstanding.begin() + static_cast<std::ptrdiff_t>(k));
      continue;
    }
    std::map<std::string, double> held_s;
    double least = 1e300;
    for (const std::string& id : ids) {
      held_s[id] = router->held(id) * seconds_per_sample(id);
      least = std::min(least, held_s[id]);
    }
    const double hold = unit(rng);
    auto peer = router->Choose(1.0, hold);
    ASSERT_TRUE(peer.ok());
    EXPECT_LE(held_s[*peer], least * (1 + 1e-12)) << n;
    outstanding.emplace_back(*peer, hold);
  }
  // What was held comes back to 0 once every hold is released.
  for (const auto& [id, work] : outstanding) ASSERT_TRUE(router->Release(id, work).ok());
  for (const std::string& id : ids) EXPECT_NEAR(router->held(id), 0, 1e-9) << id;
}

TEST(StageRouter, ReleaseChecksItsArguments) {
  auto router = MakeRouter();
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  auto a = router->Choose(1.0, 2.0);
  ASSERT_TRUE(a.ok());
  EXPECT_DOUBLE_EQ(router->held(*a), 2.0);
  EXPECT_TRUE(absl::IsInvalidArgument(router->Release(*a, -1)));
  EXPECT_TRUE(absl::IsInvalidArgument(router->Release(*a, std::nan(""))));
  EXPECT_TRUE(absl::IsInvalidArgument(router->Choose(1.0, -1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      router->Choose(1.0, std::numeric_limits<double>::infinity()).status()));
  EXPECT_TRUE(absl::IsNotFound(router->Release("z", 1)));
  EXPECT_DOUBLE_EQ(router->held(*a), 2.0);  // refused calls changed nothing
  ASSERT_TRUE(router->Release(*a, 5.0).ok());
  EXPECT_DOUBLE_EQ(router->held(*a), 0.0);  // never below 0
  // A peer that leaves takes its held work with it; one that comes back starts at 0.
  ASSERT_TRUE(router->Choose(1.0, 3.0).ok());
  ASSERT_TRUE(router->SetRoster(2, {"b"}).ok());
  ASSERT_TRUE(router->SetRoster(3, {"a", "b"}).ok());
  EXPECT_DOUBLE_EQ(router->held("a"), 0.0);
}

TEST(StageRouter, HeldWorkDoesNotOverrideABan) {
  // A banned peer is not chosen however little it holds; when every peer is banned the least
  // held one is.
  auto router = MakeRouter(3, 1.0, 0);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  ASSERT_TRUE(router->Choose(1.0, 4.0).ok());
  const std::string loaded = router->held("a") > 0 ? "a" : "b";
  const std::string idle = loaded == "a" ? "b" : "a";
  ASSERT_TRUE(router->Ban(idle).ok());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(*router->Choose(1.0, 1.0), loaded);
  ASSERT_TRUE(router->Ban(loaded).ok());
  EXPECT_EQ(*router->Choose(1.0), idle);
  EXPECT_EQ(router->counters().all_banned_choices, 1u);
}

// --- StageRouter: membership ---------------------------------------------------------------------

TEST(StageRouter, NewPeerIsChosenWithinStageSizeChoices) {
  // §2.13 item 2, from many states: peers measured at various speeds, a newcomer added.
  for (uint64_t seed = 0; seed < 50; ++seed) {
    auto router = MakeRouter(seed, 0.01);
    std::vector<std::string> roster = {"a", "b", "c", "d", "e"};
    ASSERT_TRUE(router->SetRoster(1, roster).ok());
    std::map<std::string, double> rate = {{"a", 1}, {"b", 3}, {"c", 9}, {"d", 0.5}, {"e", 2}};
    for (int i = 0; i < 37 + static_cast<int>(seed); ++i) {
      auto peer = router->Choose(1);
      ASSERT_TRUE(peer.ok());
      ASSERT_TRUE(router->Report(*peer, 1, 1 / rate[*peer]).ok());
    }
    roster.push_back("new");
    ASSERT_TRUE(router->SetRoster(2, roster).ok());
    int picks = 0;
    bool seen = false;
    while (!seen && picks < static_cast<int>(roster.size())) {
      auto peer = router->Choose(1);
      ASSERT_TRUE(peer.ok());
      seen = *peer == "new";
      ++picks;
    }
    EXPECT_TRUE(seen) << "seed " << seed << ": the newcomer was not chosen within " << roster.size()
                      << " choices";
  }
}

TEST(StageRouter, DepartedPeersAreNeverChosen) {
  auto router = MakeRouter();
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(router->Choose(1).ok());
  ASSERT_TRUE(router->SetRoster(2, {"a", "c"}).ok());
  for (int i = 0; i < 100; ++i) EXPECT_NE(*router->Choose(1), "b");
  EXPECT_EQ(router->peers(), (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(router->Report("b", 1, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(router->Throughput("b"), std::nullopt);
  EXPECT_GT(router->counters().stale_entries_skipped, 0u);
  EXPECT_EQ(router->counters().peers_dropped, 1u);

  // Every peer gone: kUnavailable naming the stage.
  ASSERT_TRUE(router->SetRoster(3, {}).ok());
  auto none = router->Choose(1);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(none.status().message().find("stage 1"), std::string::npos) << none.status();
}

TEST(StageRouter, RosterChecks) {
  auto router = MakeRouter();
  EXPECT_EQ(router->Choose(1).status().code(), absl::StatusCode::kUnavailable);  // no roster yet
  EXPECT_EQ(router->SetRoster(1, {"a", ""}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->SetRoster(1, {"a", "b", "a"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->roster_version(), std::nullopt);  // refused rosters change nothing
  ASSERT_TRUE(router->SetRoster(5, {"a", "b"}).ok());
  EXPECT_TRUE(router->SetRoster(5, {"b", "a"}).ok());  // the same roster again
  EXPECT_EQ(router->SetRoster(5, {"a"}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(router->SetRoster(4, {"a", "b"}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(router->roster_version(), 5u);
  EXPECT_EQ(router->counters().roster_changes, 1u);
  EXPECT_EQ(router->Choose(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Choose(-1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Choose(NAN).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Report("a", 1, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Ban("zz").code(), absl::StatusCode::kNotFound);

  StageRouterOptions bad;
  bad.alpha = 0;
  EXPECT_EQ(StageRouter::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.alpha = 0.1;
  bad.initial_seconds_per_sample = 0;
  EXPECT_EQ(StageRouter::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.initial_seconds_per_sample = 1;
  bad.ban_choices = (uint64_t{1} << 40) + 1;
  absl::StatusOr<std::unique_ptr<StageRouter>> long_ban = StageRouter::Create(bad);
  EXPECT_EQ(long_ban.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(long_ban.status().message().find("ban_choices"), std::string::npos);
  EXPECT_EQ(StageRouterOptions().ban_choices, 64u);  // bans expire unless asked otherwise
}

// --- StageRouter: bans ---------------------------------------------------------------------------

TEST(StageRouter, BanLastsUntilTheRosterVersionChanges) {
  auto router = MakeRouter();
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  ASSERT_TRUE(router->Ban("b").ok());
  ASSERT_TRUE(router->Ban("b").ok());  // again: no error, counted once
  EXPECT_TRUE(router->banned("b"));
  EXPECT_EQ(router->counters().bans, 1u);
  for (int i = 0; i < 200; ++i) EXPECT_NE(*router->Choose(1), "b");
  // Reports still reach a banned peer's measurements.
  EXPECT_TRUE(router->Report("b", 1, 0.5).ok());
  // The same roster again (same version) keeps the ban.
  ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
  for (int i = 0; i < 50; ++i) EXPECT_NE(*router->Choose(1), "b");
  // A new version lifts it: b re-enters at the heap minimum, chosen within |stage| choices.
  ASSERT_TRUE(router->SetRoster(2, {"a", "b", "c"}).ok());
  EXPECT_FALSE(router->banned("b"));
  std::set<std::string> next;
  for (int i = 0; i < 3; ++i) next.insert(*router->Choose(1));
  EXPECT_EQ(next.count("b"), 1u);
  EXPECT_EQ(router->counters().all_banned_choices, 0u);
  EXPECT_EQ(router->counters().bans_expired, 0u);
}

// How many choices it takes until `peer` is chosen, choosing at most `limit` times; every chosen
// peer's task is reported as taking 1 s per unit (so measured peers stay equal), `peer`'s only
// when `report_peer` (otherwise its call is taken as failed).
int ChoicesUntil(StageRouter& router, const std::string& peer, int limit,
                 bool report_peer = true) {
  for (int i = 1; i <= limit; ++i) {
    absl::StatusOr<std::string> got = router.Choose(1);
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok()) return -1;
    if (*got != peer || report_peer) EXPECT_TRUE(router.Report(*got, 1, 1).ok());
    if (*got == peer) return i;
  }
  return limit + 1;
}

TEST(StageRouter, BanExpiresAfterBanChoicesAndPeerReturnsAtOnce) {
  // A peer that failed one call but lives (the coordinator kept it in the roster) is tried again
  // once the stage has made ban_choices choices, at the heap minimum as a newcomer is: within
  // |stage| choices after that, however far the others' virtual times moved meanwhile.
  constexpr uint64_t kBan = 10;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto router = MakeRouter(seed, 1.0, kBan);
    ASSERT_TRUE(router->SetRoster(1, {"a", "b", "c"}).ok());
    for (const char* p : {"a", "b", "c"}) ASSERT_TRUE(router->Report(p, 1, 1).ok());
    ASSERT_TRUE(router->Ban("b").ok());
    const uint64_t banned_at = router->counters().choices;
    const int first = ChoicesUntil(*router, "b", 100);
    // Chosen neither before the ban ends nor later than |stage| choices after it.
    EXPECT_GT(static_cast<uint64_t>(first), kBan) << "seed " << seed;
    EXPECT_LE(static_cast<uint64_t>(first), kBan + 3) << "seed " << seed;
    EXPECT_FALSE(router->banned("b"));
    EXPECT_EQ(router->counters().bans_expired, 1u);
    EXPECT_EQ(router->counters().choices, banned_at + static_cast<uint64_t>(first));
    // And then in its share again: about one choice in three.
    std::map<std::string, int> count;
    for (int i = 0; i < 30; ++i) {
      const std::string got = *router->Choose(1);
      ASSERT_TRUE(router->Report(got, 1, 1).ok());
      ++count[got];
    }
    EXPECT_GE(count["b"], 9) << "seed " << seed;
    EXPECT_LE(count["b"], 11) << "seed " << seed;
  }
}

TEST(StageRouter, BanDoublesUntilACallSucceeds) {
  constexpr uint64_t kBan = 8;
  auto router = MakeRouter(3, 1.0, kBan);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  // Banned again each time it returns, with no successful call between: 8, 16, 32, 64, 128 and
  // then 128 again (kMaxBanDoublings = 4).
  std::vector<uint64_t> lengths;
  for (int ban = 0; ban < kMaxBanDoublings + 2; ++ban) {
    ASSERT_TRUE(router->Ban("b").ok());
    const uint64_t from = router->counters().choices;
    uint64_t length = 0;
    while (true) {
      const std::string got = *router->Choose(1);
      if (got == "b") break;  // no report for b: its call "failed" again
      ASSERT_TRUE(router->Report(got, 1, 1).ok());
      ASSERT_LT(router->counters().choices - from, 1000u);
    }
    length = router->counters().choices - from - 1;  // the choices b sat out
    lengths.push_back(length);
  }
  ASSERT_EQ(lengths.size(), static_cast<size_t>(kMaxBanDoublings + 2));
  for (int i = 0; i <= kMaxBanDoublings; ++i) {
    EXPECT_GE(lengths[i], kBan << i) << "ban " << i;
    EXPECT_LE(lengths[i], (kBan << i) + 2) << "ban " << i;
  }
  EXPECT_GE(lengths.back(), kBan << kMaxBanDoublings);
  EXPECT_LE(lengths.back(), (kBan << kMaxBanDoublings) + 2);
  // A call that succeeds after the ban (a report while b is not banned) resets the length.
  ASSERT_TRUE(router->Report("b", 1, 1).ok());
  ASSERT_TRUE(router->Ban("b").ok());
  const uint64_t from = router->counters().choices;
  const int first = ChoicesUntil(*router, "b", 1000);
  EXPECT_GE(static_cast<uint64_t>(first), kBan + 1);
  EXPECT_LE(static_cast<uint64_t>(first), kBan + 2);
  EXPECT_EQ(router->counters().choices, from + static_cast<uint64_t>(first));
  // A report that reaches b while it is banned (a call begun before the ban) resets nothing.
  ASSERT_TRUE(router->Ban("b").ok());
  ASSERT_TRUE(router->Report("b", 1, 1).ok());
  ASSERT_GE(ChoicesUntil(*router, "b", 1000, /*report_peer=*/false), static_cast<int>(kBan + 1));
  ASSERT_TRUE(router->Ban("b").ok());
  const int again = ChoicesUntil(*router, "b", 1000);
  EXPECT_GE(static_cast<uint64_t>(again), 2 * kBan + 1);
  EXPECT_LE(static_cast<uint64_t>(again), 2 * kBan + 2);
}

TEST(StageRouter, ExpiredBansAreLiftedEvenWhenEveryPeerIsBanned) {
  // Choices made ignoring bans still count towards the bans' ends.
  auto router = MakeRouter(5, 1.0, 4);
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  ASSERT_TRUE(router->Ban("a").ok());
  ASSERT_TRUE(router->Ban("b").ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(router->Choose(1).ok());
  EXPECT_EQ(router->counters().all_banned_choices, 4u);
  ASSERT_TRUE(router->Choose(1).ok());
  EXPECT_EQ(router->counters().all_banned_choices, 4u);
  EXPECT_FALSE(router->banned("a"));
  EXPECT_FALSE(router->banned("b"));
  EXPECT_EQ(router->counters().bans_expired, 2u);
  // ChooseSame sees a lifted ban too.
  ASSERT_TRUE(router->Ban("a").ok());
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(router->Choose(1).ok());
  EXPECT_EQ(*router->ChooseSame("a", 1), "a");
}

TEST(StageRouter, AllBannedFallsBackToIgnoringBans) {
  auto router = MakeRouter();
  ASSERT_TRUE(router->SetRoster(1, {"a", "b"}).ok());
  ASSERT_TRUE(router->Ban("a").ok());
  ASSERT_TRUE(router->Ban("b").ok());
  std::map<std::string, int> count;
  for (int i = 0; i < 10; ++i) {
    auto peer = router->Choose(1);
    ASSERT_TRUE(peer.ok()) << peer.status();
    ++count[*peer];
  }
  // Both peers are still used (by their virtual times), and every such choice is counted.
  EXPECT_EQ(count["a"] + count["b"], 10);
  EXPECT_GT(count["a"], 0);
  EXPECT_GT(count["b"], 0);
  EXPECT_EQ(router->counters().all_banned_choices, 10u);
  EXPECT_TRUE(router->banned("a"));
  // Once one peer is usable again, bans apply again.
  ASSERT_TRUE(router->SetRoster(2, {"a", "b"}).ok());
  ASSERT_TRUE(router->Ban("a").ok());
  for (int i = 0; i < 20; ++i) EXPECT_EQ(*router->Choose(1), "b");
  EXPECT_EQ(router->counters().all_banned_choices, 10u);
}

// --- StageRouter: determinism --------------------------------------------------------------------

std::vector<std::string> Script(uint64_t seed) {
  // Unmeasured equal peers tie on every virtual time: the order is the tie-breaks'.
  auto router = MakeRouter(seed);
  EXPECT_TRUE(router->SetRoster(1, {"a", "b", "c", "d", "e", "f"}).ok());
  std::vector<std::string> out;
  for (int i = 0; i < 60; ++i) {
    out.push_back(*router->Choose(1));
    if (i == 20) {
      EXPECT_TRUE(router->Ban("c").ok());
    }
    if (i == 30) {
      EXPECT_TRUE(router->SetRoster(2, {"a", "b", "c", "d", "g"}).ok());
    }
  }
  return out;
}

TEST(StageRouter, SameSeedSameChoices) {
  const auto first = Script(42);
  EXPECT_EQ(first, Script(42));
  int differing = 0;
  for (uint64_t seed = 0; seed < 10; ++seed) differing += Script(seed) != first;
  EXPECT_GT(differing, 0) << "the seed has no effect on tie-breaks";
}

}  // namespace
}  // namespace shoal::parallel
