// The swarm step ledger: the plain path, replays after a fence, re-leases after a trainer's death,
// every refusal and its code, and a randomized run of many thousands of events checked against a
// reference the test keeps itself (every commit it made, minus the fenced peers' records).
#include "scheduler/swarm_ledger.h"

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace shoal::scheduler {
namespace {

using Code = absl::StatusCode;

std::vector<int> AllStages(int s) {
  std::vector<int> out(s);
  for (int i = 0; i < s; ++i) out[i] = i;
  return out;
}

TEST(SwarmLedger, PlainPath) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(2, 4, {{"a0", "a1"}, {"b0"}, {"c0", "c1"}}).ok());
  EXPECT_EQ(ledger.step(), 2);
  EXPECT_EQ(ledger.Missing(), 12);
  auto leases = ledger.Lease("t", 10);
  ASSERT_TRUE(leases.ok()) << leases.status();
  ASSERT_EQ(leases->size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ((*leases)[i].id, 8 + i);  // global ids step * M + i
    EXPECT_EQ((*leases)[i].stages, AllStages(3));
    EXPECT_FALSE((*leases)[i].replay);
  }
  EXPECT_TRUE(ledger.Lease("u", 1)->empty());  // all leased
  // Ids 8, 9 to a0 and c0; 10, 11 to a1 and c1; b0 takes all. Id 11 commits stage by stage, top
  // down, as its backward runs.
  ASSERT_TRUE(ledger.Commit("t", 8, {{0, "a0"}, {1, "b0"}, {2, "c0"}}).ok());
  ASSERT_TRUE(ledger.Commit("t", 9, {{0, "a0"}, {1, "b0"}, {2, "c0"}}).ok());
  ASSERT_TRUE(ledger.Commit("t", 10, {{0, "a1"}, {1, "b0"}, {2, "c1"}}).ok());
  ASSERT_TRUE(ledger.Commit("t", 11, {{2, "c1"}}).ok());
  EXPECT_EQ(ledger.Close().status().code(), Code::kFailedPrecondition);
  ASSERT_TRUE(ledger.Commit("t", 11, {{1, "b0"}}).ok());
  ASSERT_TRUE(ledger.Commit("t", 11, {{0, "a1"}}).ok());
  EXPECT_EQ(ledger.Missing(), 0);
  EXPECT_EQ(ledger.Holder(1, 11), "b0");

  auto closed = ledger.Close();
  ASSERT_TRUE(closed.ok()) << closed.status();
  EXPECT_EQ(closed->step, 2);
  EXPECT_EQ(closed->micro_batches, 4);
  ASSERT_EQ(closed->stages.size(), 3u);
  using Held = std::map<std::string, std::vector<int64_t>>;
  EXPECT_EQ(closed->stages[0], (Held{{"a0", {8, 9}}, {"a1", {10, 11}}}));
  EXPECT_EQ(closed->stages[1], (Held{{"b0", {8, 9, 10, 11}}}));
  EXPECT_EQ(closed->stages[2], (Held{{"c0", {8, 9}}, {"c1", {10, 11}}}));
  EXPECT_TRUE(ledger.closed());
  EXPECT_TRUE(ledger.Close().ok());  // closing again returns the holdings again

  const SwarmLedgerCounters c = ledger.counters();
  EXPECT_EQ(c.leases, 4);
  EXPECT_EQ(c.replays, 0);
  EXPECT_EQ(c.commits, 6);
  EXPECT_EQ(c.accumulations, 12);
  EXPECT_EQ(c.lost, 0);

  // A closed step takes no more work; the next step opens.
  EXPECT_EQ(ledger.Lease("t", 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.FencePeer("a0").status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.OpenStep(2, 4, {{"a0"}}).code(), Code::kFailedPrecondition);
  ASSERT_TRUE(ledger.OpenStep(3, 2, {{"a0"}}).ok());
  EXPECT_EQ(ledger.Missing(), 2);
}

TEST(SwarmLedger, FencedPeersIdsComeBackAsReplaysOfItsStageOnly) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(0, 4, {{"a0"}, {"b0", "b1"}, {"c0"}}).ok());
  ASSERT_EQ(ledger.Lease("t", 4)->size(), 4u);
  for (int64_t id = 0; id < 4; ++id) {
    ASSERT_TRUE(ledger.Commit("t", id, {{0, "a0"}, {1, id < 2 ? "b0" : "b1"}, {2, "c0"}}).ok());
  }
  auto dropped = ledger.FencePeer("b0");
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 2);
  EXPECT_EQ(*ledger.FencePeer("b0"), 0);  // again: nothing more
  EXPECT_EQ(ledger.Missing(), 2);
  auto refused = ledger.Close();
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("stage 1 ids 0, 1"), std::string::npos)
      << refused.status();

  auto replays = ledger.Lease("u", 10);
  ASSERT_TRUE(replays.ok());
  ASSERT_EQ(replays->size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ((*replays)[i].id, i);
    EXPECT_EQ((*replays)[i].stages, std::vector<int>{1});
    EXPECT_TRUE((*replays)[i].replay);
  }
  // The fenced peer's name is refused; the ledger is unchanged, the lease still open.
  EXPECT_EQ(ledger.Commit("u", 0, {{1, "b0"}}).code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Holder(1, 0), std::nullopt);
  // Stages the replay does not need are refused as duplicates (they are held).
  EXPECT_EQ(ledger.Commit("u", 0, {{1, "b1"}, {2, "c0"}}).code(), Code::kAlreadyExists);
  ASSERT_TRUE(ledger.Commit("u", 0, {{1, "b1"}}).ok());
  ASSERT_TRUE(ledger.Commit("u", 1, {{1, "b1"}}).ok());

  auto closed = ledger.Close();
  ASSERT_TRUE(closed.ok()) << closed.status();
  using Held = std::map<std::string, std::vector<int64_t>>;
  EXPECT_EQ(closed->stages[1], (Held{{"b1", {0, 1, 2, 3}}}));  // b0 fenced: absent
  EXPECT_EQ(closed->stages[0], (Held{{"a0", {0, 1, 2, 3}}}));
  const SwarmLedgerCounters c = ledger.counters();
  EXPECT_EQ(c.replays, 2);
  EXPECT_EQ(c.fences, 1);
  EXPECT_EQ(c.accumulations_fenced, 2);
  EXPECT_EQ(c.duplicates_refused, 1);
  EXPECT_EQ(c.lost, 0);
}

TEST(SwarmLedger, FenceDuringALeaseLeavesTheNewNeedForALaterReplay) {
  // Id 0's stage-2 record is fenced while its replay of stage 1 is leased: the lease keeps its
  // stages; once it ends, id 0 is leased again for stage 2.
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(0, 1, {{"a"}, {"b0", "b1"}, {"c0", "c1"}}).ok());
  ASSERT_EQ(ledger.Lease("t", 1)->size(), 1u);
  ASSERT_TRUE(ledger.Commit("t", 0, {{0, "a"}, {1, "b0"}, {2, "c0"}}).ok());
  ASSERT_EQ(*ledger.FencePeer("b0"), 1);
  auto first = ledger.Lease("t", 1);
  ASSERT_EQ(first->size(), 1u);
  EXPECT_EQ((*first)[0].stages, std::vector<int>{1});
  ASSERT_EQ(*ledger.FencePeer("c0"), 1);
  // The running lease was for stage 1 only.
  EXPECT_EQ(ledger.Commit("t", 0, {{2, "c1"}}).code(), Code::kFailedPrecondition);
  EXPECT_TRUE(ledger.Lease("u", 1)->empty());  // one holder at a time
  ASSERT_TRUE(ledger.Commit("t", 0, {{1, "b1"}}).ok());
  auto second = ledger.Lease("u", 1);
  ASSERT_EQ(second->size(), 1u);
  EXPECT_EQ((*second)[0].stages, std::vector<int>{2});
  ASSERT_TRUE(ledger.Commit("u", 0, {{2, "c1"}}).ok());
  EXPECT_TRUE(ledger.Close().ok());
}

TEST(SwarmLedger, TrainerDeathReleasesItsLeases) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(1, 3, {{"a"}, {"b"}, {"c"}}).ok());
  auto leases = ledger.Lease("t1", 2);
  ASSERT_EQ(leases->size(), 2u);  // ids 3 and 4
  // t1 got id 3's top stage accumulated, then died.
  ASSERT_TRUE(ledger.Commit("t1", 3, {{2, "c"}}).ok());
  EXPECT_EQ(ledger.TrainerDied("t1"), 2);
  EXPECT_EQ(ledger.TrainerDied("t1"), 0);
  EXPECT_EQ(ledger.TrainerDied("nobody"), 0);

  auto again = ledger.Lease("t2", 5);
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(again->size(), 3u);
  // The partly done id first (a replay of what is missing), then the untouched ones.
  EXPECT_EQ((*again)[0].id, 3);
  EXPECT_EQ((*again)[0].stages, (std::vector<int>{0, 1}));
  EXPECT_TRUE((*again)[0].replay);
  EXPECT_EQ((*again)[1].id, 4);
  EXPECT_EQ((*again)[1].stages, AllStages(3));
  EXPECT_EQ((*again)[2].id, 5);
  // The dead trainer's late commit is refused.
  EXPECT_EQ(ledger.Commit("t1", 4, {{0, "a"}}).code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Holder(0, 4), std::nullopt);

  // A trainer may also hand a lease back itself.
  ASSERT_TRUE(ledger.Release("t2", 5).ok());
  EXPECT_EQ(ledger.Release("t2", 5).code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Release("t2", 99).code(), Code::kOutOfRange);
  EXPECT_EQ(ledger.counters().released, 3);
  auto back = ledger.Lease("t3", 5);
  ASSERT_EQ(back->size(), 1u);
  EXPECT_EQ((*back)[0].id, 5);
}

TEST(SwarmLedger, DuplicatesAreRefused) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(0, 2, {{"a"}, {"b"}}).ok());
  ASSERT_EQ(ledger.Lease("t", 2)->size(), 2u);
  ASSERT_TRUE(ledger.Commit("t", 0, {{0, "a"}, {1, "b"}}).ok());
  // The same commit retried (its response lost): the lease has ended, it reads as a duplicate.
  EXPECT_EQ(ledger.Commit("t", 0, {{0, "a"}, {1, "b"}}).code(), Code::kAlreadyExists);
  // Another trainer claiming the same accumulation.
  EXPECT_EQ(ledger.Commit("u", 0, {{1, "b"}}).code(), Code::kAlreadyExists);
  // Partly a duplicate: nothing of it is recorded.
  ASSERT_TRUE(ledger.Commit("t", 1, {{1, "b"}}).ok());
  EXPECT_EQ(ledger.Commit("t", 1, {{0, "a"}, {1, "b"}}).code(), Code::kAlreadyExists);
  EXPECT_EQ(ledger.Holder(0, 1), std::nullopt);
  EXPECT_EQ(ledger.counters().duplicates_refused, 3);
  EXPECT_EQ(ledger.counters().accumulations, 3);
  ASSERT_TRUE(ledger.Commit("t", 1, {{0, "a"}}).ok());
  EXPECT_TRUE(ledger.Close().ok());
}

TEST(SwarmLedger, CommitsNamingFencedOrUnknownPeersAreRefused) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(0, 2, {{"a0", "a1"}, {"b0", "b1"}}).ok());
  ASSERT_EQ(ledger.Lease("t", 1)->size(), 1u);  // id 0
  ASSERT_TRUE(ledger.FencePeer("a0").ok());
  EXPECT_EQ(ledger.Commit("t", 0, {{0, "a0"}, {1, "b0"}}).code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Commit("t", 0, {{0, "ghost"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.Commit("t", 0, {{0, "b1"}}).code(), Code::kInvalidArgument);  // other stage
  EXPECT_EQ(ledger.Commit("t", 0, {{2, "b1"}}).code(), Code::kInvalidArgument);  // no stage 2
  EXPECT_EQ(ledger.Commit("t", 0, {}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.Commit("", 0, {{0, "a1"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.Commit("t", 2, {{0, "a1"}}).code(), Code::kOutOfRange);  // step 0 is 0..1
  EXPECT_EQ(ledger.Commit("t", -1, {{0, "a1"}}).code(), Code::kOutOfRange);
  EXPECT_EQ(ledger.Commit("t", 1, {{0, "a1"}}).code(), Code::kFailedPrecondition);  // not leased
  EXPECT_EQ(ledger.Commit("u", 0, {{0, "a1"}}).code(), Code::kFailedPrecondition);  // t's lease
  EXPECT_EQ(ledger.FencePeer("ghost").status().code(), Code::kNotFound);
  // Nothing of that reached the ledger.
  EXPECT_EQ(ledger.Missing(), 4);
  EXPECT_EQ(ledger.counters().commits, 0);
  EXPECT_EQ(ledger.counters().commits_refused, 10);
  ASSERT_TRUE(ledger.Commit("t", 0, {{0, "a1"}, {1, "b0"}}).ok());
}

TEST(SwarmLedger, OpenStepChecks) {
  SwarmLedger ledger;
  EXPECT_EQ(ledger.Lease("t", 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Commit("t", 0, {{0, "a"}}).code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.Close().status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(ledger.TrainerDied("t"), 0);
  EXPECT_EQ(ledger.OpenStep(-1, 2, {{"a"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 0, {{"a"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 2, {}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 2, {{"a"}, {}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 2, {{"a", ""}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 2, {{"a", "a"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(0, 2, {{"a"}, {"a"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.OpenStep(int64_t{1} << 62, 4, {{"a"}}).code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.step(), std::nullopt);
  ASSERT_TRUE(ledger.OpenStep(5, 2, {{"a"}}).ok());
  EXPECT_EQ(ledger.Lease("t", 0).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ledger.Lease("", 1).status().code(), Code::kInvalidArgument);
  ASSERT_EQ(ledger.Lease("t", 2)->size(), 2u);
  ASSERT_TRUE(ledger.Commit("t", 10, {{0, "a"}}).ok());
  EXPECT_EQ(ledger.OpenStep(4, 2, {{"a"}}).code(), Code::kFailedPrecondition);  // backwards
  // Reopening the unfinished step with a new roster starts it over.
  ASSERT_TRUE(ledger.OpenStep(5, 2, {{"a", "z"}}).ok());
  EXPECT_EQ(ledger.Missing(), 2);
  EXPECT_EQ(ledger.Holder(0, 10), std::nullopt);
  ASSERT_EQ(ledger.Lease("t", 2)->size(), 2u);
}

TEST(SwarmLedger, AStageWithNoLivePeerLosesItsWork) {
  SwarmLedger ledger;
  ASSERT_TRUE(ledger.OpenStep(0, 3, {{"a"}, {"b0", "b1"}}).ok());
  ASSERT_EQ(ledger.Lease("t", 3)->size(), 3u);
  ASSERT_TRUE(ledger.Commit("t", 0, {{0, "a"}, {1, "b0"}}).ok());
  EXPECT_EQ(ledger.counters().lost, 0);
  ASSERT_TRUE(ledger.FencePeer("b0").ok());
  ASSERT_TRUE(ledger.FencePeer("b1").ok());
  // Stage 1 has nobody: its three needed accumulations cannot be placed this round.
  EXPECT_EQ(ledger.counters().lost, 3);
  auto lease = ledger.Lease("u", 1);
  EXPECT_EQ(lease.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(lease.status().message().find("stage 1"), std::string::npos) << lease.status();
  EXPECT_EQ(ledger.Close().status().code(), Code::kFailedPrecondition);
  // The coordinator reopens the step with a new roster.
  ASSERT_TRUE(ledger.OpenStep(0, 3, {{"a"}, {"b2"}}).ok());
  EXPECT_EQ(ledger.counters().lost, 0);
}

// --- A randomized run against the test's own reference ---------------------------------------

// What the test knows from the calls it made, kept without the ledger's help.
struct Reference {
  int stages = 0, m = 0;
  int64_t first = 0;
  std::vector<std::vector<std::string>> rosters;
  std::set<std::string> fenced;
  std::vector<std::tuple<int, int, std::string>> records;       // every accepted (stage, i, peer)
  std::map<int, std::pair<std::string, std::set<int>>> leases;  // i -> trainer, stages left

  int LiveCount(int s, int i) const {
    int n = 0;
    for (const auto& [rs, ri, peer] : records) n += rs == s && ri == i && !fenced.count(peer);
    return n;
  }
  int64_t Missing() const {
    int64_t n = 0;
    for (int s = 0; s < stages; ++s) {
      for (int i = 0; i < m; ++i) n += LiveCount(s, i) == 0;
    }
    return n;
  }
  std::vector<std::string> Live(int s) const {
    std::vector<std::string> out;
    for (const auto& p : rosters[s]) {
      if (!fenced.count(p)) out.push_back(p);
    }
    return out;
  }
  // Ids neither leased nor complete: what Lease may hand out.
  std::set<int> Free() const {
    std::set<int> out;
    for (int i = 0; i < m; ++i) {
      if (leases.count(i)) continue;
      for (int s = 0; s < stages; ++s) {
        if (LiveCount(s, i) == 0) {
          out.insert(i);
          break;
        }
      }
    }
    return out;
  }
};

TEST(SwarmLedger, RandomEventsKeepEveryAccumulationExactlyOnce) {
  std::mt19937_64 rng(20240611);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  SwarmLedger ledger;
  int64_t events = 0, duplicates = 0, fenced_records = 0, fences = 0, next_trainer = 0;
  for (int64_t step = 0; step < 250; ++step) {
    Reference ref;
    ref.stages = uniform(1, 4);
    ref.m = uniform(1, 24);
    ref.first = step * ref.m;
    for (int s = 0; s < ref.stages; ++s) {
      ref.rosters.emplace_back();
      const int n = uniform(1, 4);
      for (int k = 0; k < n; ++k)
        ref.rosters[s].push_back("s" + std::to_string(s) + "p" + std::to_string(k));
    }
    ASSERT_TRUE(ledger.OpenStep(step, ref.m, ref.rosters).ok());
    std::vector<std::string> trainers;
    for (int k = 0; k < 3; ++k) trainers.push_back("t" + std::to_string(next_trainer++));

    int guard = 0;
    while (ref.Missing() > 0) {
      ASSERT_LT(++guard, 100000) << "step " << step << " never became closable";
      ++events;
      const int roll = uniform(0, 99);
      const std::string& trainer = trainers[uniform(0, static_cast<int>(trainers.size()) - 1)];
      if (roll < 25) {  // lease
        const int max = uniform(1, 3);
        const std::set<int> free_before = ref.Free();
        auto leases = ledger.Lease(trainer, max);
        ASSERT_TRUE(leases.ok()) << leases.status();
        ASSERT_EQ(static_cast<int>(leases->size()), std::min<int>(max, free_before.size()));
        bool seen_fresh = false;
        for (const SwarmLease& l : *leases) {
          const int i = static_cast<int>(l.id - ref.first);
          ASSERT_TRUE(free_before.count(i)) << "id " << l.id << " handed out while not free";
          std::set<int> want;
          for (int s = 0; s < ref.stages; ++s) {
            if (ref.LiveCount(s, i) == 0) want.insert(s);
          }
          ASSERT_EQ(std::set<int>(l.stages.begin(), l.stages.end()), want) << "id " << l.id;
          ASSERT_EQ(l.replay, static_cast<int>(want.size()) < ref.stages);
          ASSERT_FALSE(l.replay && seen_fresh) << "a replay after an untouched id";
          seen_fresh = seen_fresh || !l.replay;
          ref.leases[i] = {trainer, want};
        }
      } else if (roll < 60) {  // commit some of a lease's stages to live peers
        if (ref.leases.empty()) continue;
        auto it =
            std::next(ref.leases.begin(), uniform(0, static_cast<int>(ref.leases.size()) - 1));
        const int i = it->first;
        auto& [holder, left] = it->second;
        std::map<int, std::string> record;
        for (int s : left) {
          if (record.empty() || uniform(0, 1) == 1) {
            const auto live = ref.Live(s);
            record[s] = live[uniform(0, static_cast<int>(live.size()) - 1)];
          }
        }
        ASSERT_TRUE(ledger.Commit(holder, ref.first + i, record).ok());
        for (const auto& [s, peer] : record) {
          ref.records.emplace_back(s, i, peer);
          left.erase(s);
        }
        if (left.empty()) ref.leases.erase(it);
      } else if (roll < 66) {  // a duplicate of a live record, by anyone
        std::vector<std::tuple<int, int, std::string>> live;
        for (const auto& r : ref.records) {
          if (!ref.fenced.count(std::get<2>(r))) live.push_back(r);
        }
        if (live.empty()) continue;
        const auto& [s, i, peer] = live[uniform(0, static_cast<int>(live.size()) - 1)];
        const auto peers = ref.Live(s);
        EXPECT_EQ(ledger
                      .Commit(trainer, ref.first + i,
                              {{s, peers[uniform(0, static_cast<int>(peers.size()) - 1)]}})
                      .code(),
                  Code::kAlreadyExists);
        ++duplicates;
      } else if (roll < 72) {  // a commit naming a fenced peer, a stranger or a wrong trainer
        if (ref.leases.empty()) continue;
        auto it =
            std::next(ref.leases.begin(), uniform(0, static_cast<int>(ref.leases.size()) - 1));
        const int i = it->first, s = *it->second.second.begin();
        const int kind = uniform(0, 2);
        absl::Status st;
        if (kind == 0) {
          std::vector<std::string> dead;
          for (const auto& p : ref.rosters[s]) {
            if (ref.fenced.count(p)) dead.push_back(p);
          }
          if (dead.empty()) continue;
          st = ledger.Commit(it->second.first, ref.first + i, {{s, dead[0]}});
          EXPECT_EQ(st.code(), Code::kFailedPrecondition) << st;
        } else if (kind == 1) {
          st = ledger.Commit(it->second.first, ref.first + i, {{s, "stranger"}});
          EXPECT_EQ(st.code(), Code::kInvalidArgument) << st;
        } else {
          st = ledger.Commit("not-" + it->second.first, ref.first + i, {{s, ref.Live(s)[0]}});
          EXPECT_EQ(st.code(), Code::kFailedPrecondition) << st;
        }
        EXPECT_EQ(ledger.Holder(s, ref.first + i), std::nullopt);
      } else if (roll < 76) {  // fence a live peer, keeping one per stage
        const int s = uniform(0, ref.stages - 1);
        const auto live = ref.Live(s);
        if (live.size() < 2) continue;
        const std::string victim = live[uniform(0, static_cast<int>(live.size()) - 1)];
        int64_t held = 0;
        for (const auto& [rs, ri, peer] : ref.records) held += peer == victim;
        auto dropped = ledger.FencePeer(victim);
        ASSERT_TRUE(dropped.ok()) << dropped.status();
        EXPECT_EQ(*dropped, held);
        ref.fenced.insert(victim);
        fenced_records += held;
        ++fences;
      } else if (roll < 80) {  // a trainer dies; a new one takes its place
        const int k = uniform(0, static_cast<int>(trainers.size()) - 1);
        const std::string dead = trainers[k];
        int64_t held = 0;
        for (auto it = ref.leases.begin(); it != ref.leases.end();) {
          if (it->second.first == dead) {
            ++held;
            it = ref.leases.erase(it);
          } else {
            ++it;
          }
        }
        EXPECT_EQ(ledger.TrainerDied(dead), held);
        trainers[k] = "t" + std::to_string(next_trainer++);
      } else if (roll < 83) {  // a trainer hands a lease back
        if (ref.leases.empty()) continue;
        auto it =
            std::next(ref.leases.begin(), uniform(0, static_cast<int>(ref.leases.size()) - 1));
        ASSERT_TRUE(ledger.Release(it->second.first, ref.first + it->first).ok());
        ref.leases.erase(it);
      } else if (roll < 86) {  // too early to close
        EXPECT_EQ(ledger.Close().status().code(), Code::kFailedPrecondition);
        EXPECT_EQ(ledger.Missing(), ref.Missing());
      }
    }

    // Closable by the reference: the ledger agrees, and its holdings are the reference's.
    EXPECT_EQ(ledger.Missing(), 0);
    auto closed = ledger.Close();
    ASSERT_TRUE(closed.ok()) << "step " << step << ": " << closed.status();
    std::map<std::pair<int, int>, std::string> want;
    for (const auto& [s, i, peer] : ref.records) {
      if (ref.fenced.count(peer)) continue;
      ASSERT_TRUE(want.emplace(std::make_pair(s, i), peer).second)
          << "the test recorded (stage " << s << ", id " << i << ") twice";
    }
    ASSERT_EQ(static_cast<int64_t>(want.size()), static_cast<int64_t>(ref.stages) * ref.m);
    std::map<std::pair<int, int>, int> times;
    ASSERT_EQ(static_cast<int>(closed->stages.size()), ref.stages);
    for (int s = 0; s < ref.stages; ++s) {
      std::set<std::string> listed;
      for (const auto& [peer, ids] : closed->stages[s]) {
        listed.insert(peer);
        EXPECT_FALSE(ref.fenced.count(peer)) << "fenced peer " << peer << " holds ids";
        EXPECT_TRUE(std::is_sorted(ids.begin(), ids.end()));
        for (int64_t id : ids) {
          const int i = static_cast<int>(id - ref.first);
          ++times[{s, i}];
          EXPECT_EQ((want[{s, i}]), peer) << "stage " << s << " id " << id;
        }
      }
      const auto live = ref.Live(s);
      EXPECT_EQ(listed, std::set<std::string>(live.begin(), live.end()));
    }
    for (int s = 0; s < ref.stages; ++s) {
      for (int i = 0; i < ref.m; ++i) {
        EXPECT_EQ((times[{s, i}]), 1) << "step " << step << " stage " << s << " id " << i;
      }
    }
    EXPECT_EQ(ledger.counters().lost, 0);
  }
  const SwarmLedgerCounters c = ledger.counters();
  EXPECT_EQ(c.duplicates_refused, duplicates);
  EXPECT_EQ(c.accumulations_fenced, fenced_records);
  EXPECT_EQ(c.fences, fences);
  EXPECT_GT(events, 10000);
  EXPECT_GT(fences, 50);
  EXPECT_GT(c.replays, 50);
}

}  // namespace
}  // namespace shoal::scheduler
