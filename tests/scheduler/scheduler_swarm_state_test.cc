// The coordinator's swarm state machine, driven as the coordinator and the peers would drive it:
// joins spread by weakness, a plain step whose clip scale is checked against a closed form,
// deaths and trainer deaths in the middle of a step, joiners and their donors, drift, drains and
// rollbacks, every refusal and its code; then a randomized run of thousands of events checked
// against an account the test keeps itself (which peer accumulated which micro-batch, which
// leases each trainer holds, and what every stage's reduced gradient must come to).
//
// The peers here are simulated: a micro-batch's gradient at a stage is a scalar g(stage, id), a
// stage's reduced gradient is the sum of its plan peers' own accumulations (in plan order), its
// sum of squares that sum squared, and a peer's parameter hash at state K is StateHash(stage, K)
// unless the test corrupts it. The closed forms below sum g over the step's ids directly, so a
// micro-batch counted twice or lost anywhere shows up as a wrong clip scale.
#include "scheduler/swarm_state.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace shoal::scheduler {
namespace {

using Code = absl::StatusCode;

constexpr int kStages = 3;
constexpr int kM = 8;

double LearningRate(int64_t step) { return 0.001 * static_cast<double>(step + 1); }

uint64_t StateHash(int stage, int64_t step) {
  uint64_t x = static_cast<uint64_t>(step + 1) * 0x9e3779b97f4a7c15ULL ^
               static_cast<uint64_t>(stage + 1) * 0xc2b2ae3d27d4eb4fULL;
  x ^= x >> 31;
  return x * 0xbf58476d1ce4e5b9ULL;
}

// Micro-batch `id`'s gradient at `stage`.
double G(int stage, int64_t id) {
  return 0.5 + 0.25 * stage + 0.0625 * static_cast<double>((id * 7 + stage) % 11) -
         0.3 * static_cast<double>(id % 4 == 1);
}

// The closed form: stage s's reduced gradient over step `step`'s ids, each once.
double ClosedFormStageSum(int stage, int64_t step, int m) {
  double sum = 0;
  for (int i = 0; i < m; ++i) sum += G(stage, step * m + i);
  return sum;
}

double ClosedFormClipScale(int64_t step, int stages, int m, double clip) {
  double total = 0;
  for (int s = 0; s < stages; ++s) {
    const double g = ClosedFormStageSum(s, step, m);
    total += g * g;
  }
  if (clip <= 0) return 1;
  return std::min(1.0, clip / (std::sqrt(total) + 1e-6));
}

SwarmJob Job(double clip = 1.0, int64_t checkpoint = -1) {
  SwarmJob job;
  job.stages = kStages;
  job.micro_batches = kM;
  job.stage_bytes = {100, 200, 300};
  job.grad_clip = clip;
  job.checkpoint_step = checkpoint;
  return job;
}

SwarmStateOptions Options() {
  SwarmStateOptions o;
  o.learning_rate = LearningRate;
  return o;
}

const SwarmPeerInfo* FindPeer(const SwarmSnapshot& snap, const std::string& id) {
  for (const SwarmStageInfo& st : snap.stages) {
    for (const SwarmPeerInfo& p : st.peers) {
      if (p.id == id) return &p;
    }
  }
  return nullptr;
}

std::vector<std::string> StagePeerIds(const SwarmSnapshot& snap, int stage) {
  std::vector<std::string> out;
  for (const SwarmPeerInfo& p : snap.stages[stage].peers) out.push_back(p.id);
  return out;
}

// Where a trainer routes a stage's work: the round's SERVING peers, or its DRAINING ones when it
// has none serving.
std::vector<std::string> Routable(const SwarmSnapshot& snap, int stage) {
  std::vector<std::string> serving, draining;
  for (const SwarmPeerInfo& p : snap.stages[stage].peers) {
    if (!p.in_round) continue;
    (p.state == SwarmPeerState::kServing ? serving : draining).push_back(p.id);
  }
  return serving.empty() ? draining : serving;
}

// Everything a refused call must leave as it was.
std::string Flatten(const SwarmSnapshot& s) {
  std::ostringstream o;
  o << "v" << s.roster_version << " open " << s.open_step.value_or(-1) << " next " << s.next_step
    << " ckpt " << s.checkpoint_step << " wait '" << s.waiting << "' rb "
    << (s.rollback ? s.rollback->reason : "-") << "\n";
  for (const SwarmStageInfo& st : s.stages) {
    o << "stage " << st.index << " " << SwarmStagePhaseName(st.phase) << " missing " << st.missing
      << " plan " << (st.reduction ? st.reduction->plan : 0) << " reported " << st.reported.size()
      << "\n";
    for (const SwarmPeerInfo& p : st.peers) {
      o << "  " << p.id << " " << SwarmPeerStateName(p.state) << " t" << p.throughput << " q"
        << p.queue_length << " acc" << p.accumulated << " r" << p.in_round << " d" << p.drifts
        << " j" << p.joiners << " " << SwarmSyncSourceName(p.source) << " '" << p.donor << "' s"
        << p.synced << "@" << p.synced_step << " v" << p.verified << " l" << p.can_leave << "\n";
    }
  }
  for (const SwarmTrainerInfo& t : s.trainers) o << "trainer " << t.id << " " << t.alive << "\n";
  const SwarmCounters& c = s.counters;
  o << c.joins << " " << c.leaves << " " << c.deaths << " " << c.evictions << " " << c.drifts
    << " " << c.fences << " " << c.replays << " " << c.syncs_refused << " " << c.rollbacks << " "
    << c.steps_applied << " | " << s.ledger.leases << " " << s.ledger.commits << " "
    << s.ledger.accumulations << " " << s.ledger.released;
  return o.str();
}

// The swarm and its simulated peers.
class World {
 public:
  // A round opens only while a trainer is alive: the world starts with `trainers`.
  explicit World(const SwarmJob& job = Job(), const std::vector<std::string>& trainers = {"t"})
      : job_(job) {
    auto st = SwarmState::Create(job, Options());
    EXPECT_TRUE(st.ok()) << st.status();
    st_ = *std::move(st);
    for (const std::string& t : trainers) EXPECT_TRUE(st_->AddTrainer(t).ok()) << t;
  }

  SwarmState& st() { return *st_; }
  SwarmSnapshot Snap() const { return st_->Snapshot(); }

  SwarmJoin Join(const std::string& id, int64_t free_bytes = 1000, double link = 0) {
    auto join = st_->AddPeer(id, id + ".addr:7000", free_bytes, link);
    EXPECT_TRUE(join.ok()) << join.status();
    return join.ok() ? *join : SwarmJoin{};
  }

  // Every syncing peer with a source claims the newest state, with the right hash.
  void SyncAll() {
    const SwarmSnapshot snap = Snap();
    for (const SwarmStageInfo& stage : snap.stages) {
      for (const SwarmPeerInfo& p : stage.peers) {
        if (p.state != SwarmPeerState::kSyncing || p.synced ||
            p.source == SwarmSyncSource::kWaitForDonor) {
          continue;
        }
        absl::Status s = st_->PeerSynced(p.id, snap.next_step, StateHash(p.stage, snap.next_step));
        EXPECT_TRUE(s.ok()) << s;
      }
    }
  }

  // The trainer runs the lease: the backward goes top down, and at each stage the peer `pick`
  // names accumulates the micro-batch and commits it.
  void Run(const std::string& trainer, const SwarmLease& lease,
           const std::function<std::string(int stage, int64_t id)>& pick) {
    for (auto s = lease.stages.rbegin(); s != lease.stages.rend(); ++s) {
      const std::string peer = pick(*s, lease.id);
      absl::Status c = Commit(peer, trainer, lease.id);
      ASSERT_TRUE(c.ok()) << c;
    }
  }

  // A peer-originated commit; the peer keeps the accumulation only if it is accepted.
  absl::Status Commit(const std::string& peer, const std::string& trainer, int64_t id) {
    absl::Status c = st_->Commit(peer, trainer, id);
    if (c.ok()) {
      EXPECT_TRUE(own_[peer].insert(id).second) << peer << " accumulated " << id << " twice";
    }
    return c;
  }

  // Leases everything the step has for `trainer` and runs it with `pick`.
  void RunAll(const std::string& trainer,
              const std::function<std::string(int stage, int64_t id)>& pick) {
    auto leases = st_->Lease(trainer, 4 * kM);
    ASSERT_TRUE(leases.ok()) << leases.status();
    for (const SwarmLease& l : *leases) Run(trainer, l, pick);
  }

  // Round-robin over the routable peers of each stage.
  std::function<std::string(int, int64_t)> Spread() {
    return [this](int stage, int64_t id) {
      const std::vector<std::string> peers = Routable(Snap(), stage);
      EXPECT_FALSE(peers.empty()) << "stage " << stage << " has no routable peer";
      return peers.empty() ? std::string() : peers[id % peers.size()];
    };
  }

  // Stage `stage`'s reduced gradient under its current plan, from the peers' own accumulations.
  double Reduced(const SwarmSnapshot& snap, int stage) {
    const SwarmReduction& red = *snap.stages[stage].reduction;
    double sum = 0;
    for (const std::string& peer : red.peers) {
      for (int64_t id : own_[peer]) sum += G(stage, id);
    }
    return sum;
  }

  // `peer` reports after its stage's reduction; `hash_xor` corrupts its hash.
  absl::StatusOr<SwarmReportOutcome> Report(const std::string& peer, uint64_t hash_xor = 0) {
    const SwarmSnapshot snap = Snap();
    const SwarmPeerInfo* p = FindPeer(snap, peer);
    EXPECT_NE(p, nullptr) << peer;
    if (p == nullptr) return absl::NotFoundError(peer);
    const SwarmStageInfo& stage = snap.stages[p->stage];
    EXPECT_TRUE(stage.reduction.has_value()) << "stage " << p->stage << " has no plan";
    if (!stage.reduction.has_value()) return absl::FailedPreconditionError("no plan");
    const std::set<int64_t>& mine = own_[peer];
    // The plan's ids for this peer are what it accumulated itself.
    EXPECT_EQ(stage.reduction->ids.at(peer), std::vector<int64_t>(mine.begin(), mine.end()))
        << peer;
    const double g = Reduced(snap, p->stage);
    SwarmStageReport r;
    r.peer = peer;
    r.step = snap.next_step;
    r.plan = stage.reduction->plan;
    r.ids.assign(mine.rbegin(), mine.rend());  // any order
    r.sum_squares = g * g;
    r.param_hash = StateHash(p->stage, snap.next_step) ^ hash_xor;
    auto out = st_->StageReport(r);
    if (out.ok()) Absorb(*out);
    return out;
  }

  // Reports every plan peer of `stage` that has not reported. Returns the last outcome.
  SwarmReportOutcome ReportStage(int stage) {
    SwarmReportOutcome last;
    const SwarmSnapshot snap = Snap();
    const SwarmStageInfo& info = snap.stages[stage];
    EXPECT_TRUE(info.reduction.has_value()) << "stage " << stage << " has no plan";
    if (!info.reduction) return last;
    for (const std::string& peer : info.reduction->peers) {
      if (std::count(info.reported.begin(), info.reported.end(), peer)) continue;
      auto out = Report(peer);
      EXPECT_TRUE(out.ok()) << out.status();
      if (out.ok()) last = *out;
    }
    return last;
  }

  // Reports every stage; returns the decision.
  std::optional<SwarmApply> ReportAll() {
    std::optional<SwarmApply> apply;
    for (int s = 0; s < job_.stages; ++s) {
      SwarmReportOutcome out = ReportStage(s);
      if (out.apply) apply = out.apply;
    }
    return apply;
  }

  // The peer is gone (or resyncs): its accumulations with it.
  void Drop(const std::string& peer) { own_.erase(peer); }
  const std::set<int64_t>& Own(const std::string& peer) { return own_[peer]; }

 private:
  // After a report: drifted peers drop what they held, and a decision ends the round.
  void Absorb(const SwarmReportOutcome& out) {
    for (const SwarmDrift& d : out.drifted) own_.erase(d.peer);
    if (out.apply) own_.clear();
  }

  SwarmJob job_;
  std::unique_ptr<SwarmState> st_;
  std::map<std::string, std::set<int64_t>> own_;
};

void ExpectClosedForm(const SwarmApply& a, double clip) {
  EXPECT_EQ(a.lr, LearningRate(a.step));
  ASSERT_EQ(a.stage_sum_squares.size(), static_cast<size_t>(kStages));
  for (int s = 0; s < kStages; ++s) {
    const double g = ClosedFormStageSum(s, a.step, kM);
    EXPECT_NEAR(a.stage_sum_squares[s], g * g, 1e-12 * g * g) << "stage " << s;
    EXPECT_EQ(a.stage_hashes[s], StateHash(s, a.step)) << "stage " << s;
  }
  const double want = ClosedFormClipScale(a.step, kStages, kM, clip);
  EXPECT_NEAR(a.clip_scale, want, 1e-12 * want) << "step " << a.step;
}

// With a trainer alive, a round opens as soon as every stage has a serving peer, so the first
// round has the first peer to sync of each stage; the others enter the next one. Runs that first
// step (trainer t).
void Warm(World& w) {
  w.RunAll("t", w.Spread());
  ASSERT_TRUE(w.ReportAll().has_value());
}

// Joins a, b, c (one per stage, from init) and d (stage 0 again), all synced: step 0 opens
// (with a, b and c: d enters at step 1).
void StartFour(World& w) {
  EXPECT_EQ(w.Join("a").stage, 0);
  EXPECT_EQ(w.Join("b").stage, 1);
  EXPECT_EQ(w.Join("c").stage, 2);
  EXPECT_EQ(w.Join("d").stage, 0);  // every stage has one syncing peer: the lowest index
  w.SyncAll();
  ASSERT_EQ(w.Snap().open_step, 0);
}

TEST(SwarmState, JoinersSpreadOverTheStagesByWeakness) {
  World w;
  // Empty stages first, each from init at step 0 (no checkpoint, nothing applied).
  for (const auto& [id, stage] : std::vector<std::pair<std::string, int>>{
           {"a", 0}, {"b", 1}, {"c", 2}}) {
    const SwarmJoin j = w.Join(id);
    EXPECT_EQ(j.stage, stage) << id;
    EXPECT_EQ(j.source, SwarmSyncSource::kInit);
    EXPECT_EQ(j.step, 0);
    EXPECT_TRUE(j.donor.empty());
  }
  EXPECT_FALSE(w.Snap().open_step.has_value());
  EXPECT_NE(w.Snap().waiting.find("stage"), std::string::npos) << w.Snap().waiting;
  w.SyncAll();
  SwarmSnapshot snap = w.Snap();
  ASSERT_EQ(snap.open_step, 0);
  for (const char* id : {"a", "b", "c"}) {
    EXPECT_EQ(FindPeer(snap, id)->state, SwarmPeerState::kServing) << id;
    EXPECT_TRUE(FindPeer(snap, id)->in_round) << id;
  }
  ASSERT_TRUE(w.st().ReportLoad("a", 10, 0).ok());
  ASSERT_TRUE(w.st().ReportLoad("b", 2, 3).ok());
  ASSERT_TRUE(w.st().ReportLoad("c", 5, 1).ok());

  // Capacities 10, 2, 5: stage 1. A joiner there counts as the stage's mean (2) while syncing:
  // 4, and stage 2 (5) is on one peer within 1 / 0.75 of it, so stage 2 (policy rule 3); then
  // 4 < 10: stage 1.
  SwarmJoin d = w.Join("d");
  EXPECT_EQ(d.stage, 1);
  EXPECT_EQ(d.source, SwarmSyncSource::kDonor);
  EXPECT_EQ(d.donor, "b");
  EXPECT_EQ(d.donor_address, "b.addr:7000");
  EXPECT_EQ(d.step, 0);
  SwarmJoin e = w.Join("e");
  EXPECT_EQ(e.stage, 2);
  EXPECT_EQ(e.donor, "c");
  SwarmJoin f = w.Join("f");
  EXPECT_EQ(f.stage, 1);
  EXPECT_EQ(f.donor, "b");
  // Memory: 150 bytes fit stage 0 only (100, 200, 300), although it is the strongest.
  SwarmJoin g = w.Join("g", 150);
  EXPECT_EQ(g.stage, 0);
  EXPECT_EQ(g.donor, "a");
  // Nothing fits 50 bytes: refused, and nothing changes.
  const std::string before = Flatten(w.Snap());
  auto small = w.st().AddPeer("h", "h.addr:7000", 50);
  EXPECT_EQ(small.status().code(), Code::kResourceExhausted);
  EXPECT_NE(small.status().message().find("50"), std::string::npos) << small.status();
  EXPECT_EQ(Flatten(w.Snap()), before);

  // Stage 1 (2 + 2 x 2 = 6) is still the weakest against 5 + 5 and 10 + 10, but its only donor
  // has two joiners already: i waits.
  SwarmJoin i = w.Join("i");
  EXPECT_EQ(i.stage, 1);
  EXPECT_EQ(i.source, SwarmSyncSource::kWaitForDonor);
  snap = w.Snap();
  EXPECT_EQ(FindPeer(snap, "b")->joiners, 2);
  // d finishes: b has room, i gets it.
  ASSERT_TRUE(w.st().PeerSynced("d", 0, StateHash(1, 0)).ok());
  snap = w.Snap();
  EXPECT_EQ(FindPeer(snap, "i")->source, SwarmSyncSource::kDonor);
  EXPECT_EQ(FindPeer(snap, "i")->donor, "b");
  EXPECT_EQ(FindPeer(snap, "b")->joiners, 2);  // e and i
  EXPECT_EQ(snap.counters.joins, 8);
}

// No round opens before a trainer is there to feed it: a round's peers are fixed when it opens,
// so peers joining while a round waited for the trainer would sit out that whole step. Six peers
// join before any has synced (each from init), then sync: all six serve step 0.
TEST(SwarmState, TheFirstRoundWaitsForATrainerAndTakesEveryPeerSyncedByThen) {
  World w(Job(), /*trainers=*/{});
  for (const char* id : {"a", "b", "c", "d", "e", "f"}) {
    const SwarmJoin j = w.Join(id);
    EXPECT_EQ(j.source, SwarmSyncSource::kInit) << id;  // no peer serves yet: no donor
  }
  w.SyncAll();
  SwarmSnapshot snap = w.Snap();
  EXPECT_FALSE(snap.open_step.has_value());
  EXPECT_NE(snap.waiting.find("waits for a trainer"), std::string::npos) << snap.waiting;
  for (int s = 0; s < kStages; ++s) {
    EXPECT_TRUE(Routable(snap, s).empty()) << "stage " << s;  // in no round
    for (const SwarmPeerInfo& p : snap.stages[s].peers) {
      EXPECT_EQ(p.state, SwarmPeerState::kServing) << p.id;  // serving (and donors) already
    }
  }
  // So a later joiner syncs from one of them, and is left out of step 0 only if still syncing
  // when the trainer comes.
  const SwarmJoin late = w.Join("g");
  EXPECT_EQ(late.source, SwarmSyncSource::kDonor);
  EXPECT_EQ(late.stage, 0);

  ASSERT_TRUE(w.st().AddTrainer("t").ok());
  snap = w.Snap();
  ASSERT_EQ(snap.open_step, 0);
  EXPECT_TRUE(snap.waiting.empty()) << snap.waiting;
  for (int s = 0; s < kStages; ++s) EXPECT_EQ(Routable(snap, s).size(), 2u) << "stage " << s;
  EXPECT_EQ(FindPeer(snap, "g")->state, SwarmPeerState::kSyncing);
  w.RunAll("t", w.Spread());
  snap = w.Snap();
  for (int s = 0; s < kStages; ++s) {
    ASSERT_TRUE(snap.stages[s].reduction.has_value()) << "stage " << s;
    EXPECT_EQ(snap.stages[s].reduction->peers.size(), 2u) << "stage " << s;
  }
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  EXPECT_EQ(w.Snap().open_step, 1);  // the trainer is still there
}

TEST(SwarmState, AStepAppliesWithTheClosedFormClipScale) {
  for (double clip : {1.0, 1000.0, 0.0}) {
    SCOPED_TRACE(clip);
    World w(Job(clip));
    for (const char* id : {"a", "b", "c", "d", "e", "f"}) w.Join(id);  // two per stage
    w.SyncAll();
    for (int64_t step = 0; step < 3; ++step) {
      SwarmSnapshot snap = w.Snap();
      ASSERT_EQ(snap.open_step, step);
      const uint64_t version = snap.roster_version;
      w.RunAll("t", w.Spread());
      snap = w.Snap();
      for (int s = 0; s < kStages; ++s) {
        EXPECT_EQ(snap.stages[s].phase, SwarmStagePhase::kReducing);
        EXPECT_EQ(snap.stages[s].missing, 0);
      }
      EXPECT_EQ(w.st().Decision(step).status().code(), Code::kUnavailable);
      std::optional<SwarmApply> apply = w.ReportAll();
      ASSERT_TRUE(apply.has_value());
      EXPECT_EQ(apply->step, step);
      ExpectClosedForm(*apply, clip);
      if (clip == 1.0) {
        EXPECT_LT(apply->clip_scale, 1.0);  // the closed form's norm is about 14
      } else {
        EXPECT_EQ(apply->clip_scale, 1.0);
      }
      auto again = w.st().Decision(step);
      ASSERT_TRUE(again.ok());
      EXPECT_EQ(again->clip_scale, apply->clip_scale);
      snap = w.Snap();
      EXPECT_GT(snap.roster_version, version);
      EXPECT_EQ(snap.open_step, step + 1);  // the next step opens by itself
      EXPECT_EQ(snap.counters.steps_applied, step + 1);
    }
    EXPECT_EQ(w.st().Decision(7).status().code(), Code::kOutOfRange);
  }
}

TEST(SwarmState, APeerDyingWithAccumulationsIsFencedAndItsIdsReplayedAtItsStageOnly) {
  World w;
  for (const char* id : {"a", "b", "c", "d", "e", "f"}) w.Join(id);  // a, d | b, e | c, f
  w.SyncAll();
  Warm(w);  // all six serve from step 1
  // Step 1 (ids 8-15). Stage 1: b takes ids 8-11, e takes 12-15; the others alternate.
  ASSERT_EQ(w.Snap().open_step, 1);
  w.RunAll("t", [&](int stage, int64_t id) -> std::string {
    if (stage == 1) return id % kM < 4 ? "b" : "e";
    return Routable(w.Snap(), stage)[id % 2];
  });
  ASSERT_EQ(w.Snap().stages[1].phase, SwarmStagePhase::kReducing);
  auto removed = w.st().RemovePeer("b", SwarmLeaveReason::kDead);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(removed->dropped, 4);
  EXPECT_FALSE(removed->needs_rollback);
  w.Drop("b");
  SwarmSnapshot snap = w.Snap();
  EXPECT_EQ(snap.stages[1].phase, SwarmStagePhase::kCollecting);
  EXPECT_EQ(snap.stages[1].missing, 4);
  EXPECT_EQ(snap.counters.deaths, 1);
  EXPECT_EQ(snap.counters.fences, 1);

  auto replays = w.st().Lease("t", 100);
  ASSERT_TRUE(replays.ok());
  ASSERT_EQ(replays->size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ((*replays)[k].id, kM + k);
    EXPECT_EQ((*replays)[k].stages, std::vector<int>{1});
    EXPECT_TRUE((*replays)[k].replay);
    w.Run("t", (*replays)[k], [](int, int64_t) { return std::string("e"); });
  }
  EXPECT_EQ(w.Snap().counters.replays, 4);
  // Stage 0 agrees, then one of its peers dies: its micro-batches are in the reduced gradient
  // the other holds, so nothing is fenced and the step still closes.
  w.ReportStage(0);
  ASSERT_EQ(w.Snap().stages[0].phase, SwarmStagePhase::kAgreed);
  removed = w.st().RemovePeer("d", SwarmLeaveReason::kDead);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(removed->dropped, 0);
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  snap = w.Snap();
  EXPECT_EQ(snap.counters.fences, 1);
  EXPECT_EQ(snap.ledger.accumulations_fenced, 4);
  EXPECT_EQ(snap.open_step, 2);
  EXPECT_EQ(StagePeerIds(snap, 0), std::vector<std::string>{"a"});
  EXPECT_EQ(StagePeerIds(snap, 1), std::vector<std::string>{"e"});
}

TEST(SwarmState, ATrainerDyingMidLeaseHasItsIdsReleasedWithoutDuplicates) {
  World w(Job(), {"t1", "t2"});
  StartFour(w);
  auto first = w.st().Lease("t1", 3);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->size(), 3u);  // ids 0, 1, 2
  w.Run("t1", (*first)[0], w.Spread());
  // Id 1's backward reached stage 2 only.
  ASSERT_TRUE(w.Commit("c", "t1", 1).ok());
  auto died = w.st().RemoveTrainer("t1");
  ASSERT_TRUE(died.ok());
  EXPECT_EQ(*died, 2);
  EXPECT_EQ(w.st().RemoveTrainer("t1").status().code(), Code::kNotFound);
  // A peer that ran id 2 for the dead trainer is refused: it drops the accumulation.
  EXPECT_EQ(w.Commit("c", "t1", 2).code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.st().Lease("t1", 1).status().code(), Code::kFailedPrecondition);

  auto again = w.st().Lease("t2", 100);
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(again->size(), 7u);
  EXPECT_EQ((*again)[0].id, 1);  // the replay first, for what is missing only
  EXPECT_EQ((*again)[0].stages, (std::vector<int>{0, 1}));
  EXPECT_TRUE((*again)[0].replay);
  EXPECT_EQ((*again)[1].id, 2);
  EXPECT_EQ((*again)[1].stages, (std::vector<int>{0, 1, 2}));
  // Id 1 at stage 2 is held by c already: a second accumulation is refused.
  EXPECT_EQ(w.Commit("c", "t2", 1).code(), Code::kAlreadyExists);
  for (const SwarmLease& l : *again) w.Run("t2", l, w.Spread());
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  const SwarmSnapshot snap = w.Snap();
  EXPECT_EQ(snap.ledger.duplicates_refused, 1);
  EXPECT_EQ(snap.ledger.released, 2);
  EXPECT_EQ(snap.trainers.size(), 2u);
  EXPECT_FALSE(snap.trainers[0].alive);
  // Alive again under the same name.
  EXPECT_TRUE(w.st().AddTrainer("t1").ok());
  EXPECT_EQ(w.st().AddTrainer("t1").code(), Code::kAlreadyExists);
}

TEST(SwarmState, AJoinerSyncsFromADonorAtTheNewestStateAndServesFromTheNextRound) {
  World w;
  StartFour(w);  // a, d | b | c
  for (const char* id : {"a", "d", "c"}) ASSERT_TRUE(w.st().ReportLoad(id, 10, 0).ok());
  ASSERT_TRUE(w.st().ReportLoad("b", 1, 4).ok());
  auto part = w.st().Lease("t", 4);
  ASSERT_TRUE(part.ok());
  for (const SwarmLease& l : *part) w.Run("t", l, w.Spread());

  // Stage 1 is the weakest; its only donor takes two joiners, the third waits.
  SwarmJoin j1 = w.Join("j1"), j2 = w.Join("j2"), j3 = w.Join("j3");
  for (const SwarmJoin& j : {j1, j2}) {
    EXPECT_EQ(j.stage, 1);
    EXPECT_EQ(j.source, SwarmSyncSource::kDonor);
    EXPECT_EQ(j.donor, "b");
    EXPECT_EQ(j.step, 0);
  }
  EXPECT_EQ(j3.stage, 1);
  EXPECT_EQ(j3.source, SwarmSyncSource::kWaitForDonor);
  EXPECT_EQ(FindPeer(w.Snap(), "b")->joiners, 2);

  // j1 is done before stage 1 has agreed on its hash: accepted, checked later. Its slot goes to
  // j3, whose donor is b again, not j1: a peer that is not serving is never a donor.
  ASSERT_TRUE(w.st().PeerSynced("j1", 0, StateHash(1, 0)).ok());
  ASSERT_TRUE(w.st().PeerSynced("j1", 0, StateHash(1, 0)).ok());  // a repeat
  SwarmSnapshot snap = w.Snap();
  const SwarmPeerInfo* p1 = FindPeer(snap, "j1");
  EXPECT_EQ(p1->state, SwarmPeerState::kSyncing);
  EXPECT_TRUE(p1->synced);
  EXPECT_FALSE(p1->verified);
  EXPECT_FALSE(p1->in_round);
  EXPECT_EQ(FindPeer(snap, "j3")->source, SwarmSyncSource::kDonor);
  EXPECT_EQ(FindPeer(snap, "j3")->donor, "b");
  EXPECT_EQ(w.st().PeerSynced("j1", 0, 77).code(), Code::kFailedPrecondition);

  // Not in the round in progress: a commit from j1 is refused.
  auto more = w.st().Lease("t", 1);
  ASSERT_TRUE(more.ok());
  ASSERT_EQ(more->size(), 1u);
  EXPECT_EQ(w.Commit("j1", "t", (*more)[0].id).code(), Code::kFailedPrecondition);
  w.Run("t", (*more)[0], w.Spread());
  w.RunAll("t", w.Spread());

  // Stage 1 agrees: j1's claim is checked. j2 finishes afterwards and is checked at once.
  w.ReportStage(1);
  EXPECT_TRUE(FindPeer(w.Snap(), "j1")->verified);
  const std::string before = Flatten(w.Snap());
  absl::Status bad = w.st().PeerSynced("j2", 0, StateHash(1, 0) ^ 1);
  EXPECT_EQ(bad.code(), Code::kDataLoss);
  std::ostringstream want_hash, got_hash;
  want_hash << std::hex << StateHash(1, 0);
  got_hash << std::hex << (StateHash(1, 0) ^ 1);
  EXPECT_NE(bad.message().find(want_hash.str()), std::string::npos) << bad;
  EXPECT_NE(bad.message().find(got_hash.str()), std::string::npos) << bad;
  absl::Status ahead = w.st().PeerSynced("j2", 1, StateHash(1, 1));
  EXPECT_EQ(ahead.code(), Code::kOutOfRange);
  EXPECT_NE(ahead.message().find("newest state is 0"), std::string::npos) << ahead;
  EXPECT_EQ(Flatten(w.Snap()), before);
  ASSERT_TRUE(w.st().PeerSynced("j2", 0, StateHash(1, 0)).ok());
  EXPECT_TRUE(FindPeer(w.Snap(), "j2")->verified);

  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);

  // Step 1: the synced joiners serve; j3, still syncing, moves to a donor at the new state.
  snap = w.Snap();
  ASSERT_EQ(snap.open_step, 1);
  for (const char* id : {"j1", "j2"}) {
    EXPECT_EQ(FindPeer(snap, id)->state, SwarmPeerState::kServing) << id;
    EXPECT_TRUE(FindPeer(snap, id)->in_round) << id;
  }
  const SwarmPeerInfo* p3 = FindPeer(snap, "j3");
  EXPECT_EQ(p3->source, SwarmSyncSource::kDonor);
  EXPECT_EQ(p3->donor, "j1");  // least loaded and never chosen before, the most senior of those
  EXPECT_EQ(w.st().PeerSynced("j1", 1, StateHash(1, 1)).code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.st().PeerSynced("j3", 0, StateHash(1, 0)).code(), Code::kOutOfRange);

  // j1 fails j3: the next donor is one it has not failed with.
  absl::StatusOr<SwarmJoin> wrong = w.st().DonorFailed("j3", "b");
  EXPECT_EQ(wrong.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(wrong.status().message().find("'j1'"), std::string::npos) << wrong.status();
  absl::StatusOr<SwarmJoin> next = w.st().DonorFailed("j3", "j1");
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->donor, "j2");
  EXPECT_EQ(next->step, 1);
  EXPECT_EQ(w.st().DonorFailed("j1", "b").status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.st().DonorFailed("nobody", "b").status().code(), Code::kNotFound);

  // j3 syncs state 1 in round 1 and serves in round 2.
  ASSERT_TRUE(w.st().PeerSynced("j3", 1, StateHash(1, 1)).ok());
  w.RunAll("t", w.Spread());
  apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  snap = w.Snap();
  EXPECT_EQ(snap.open_step, 2);
  EXPECT_EQ(FindPeer(snap, "j3")->state, SwarmPeerState::kServing);
  EXPECT_EQ(snap.counters.syncs_refused, 0);
}

TEST(SwarmState, AClaimFoundWrongWhenItsStageAgreesSendsTheJoinerBack) {
  World w;
  StartFour(w);
  SwarmJoin j = w.Join("j");
  ASSERT_EQ(j.stage, 1);
  ASSERT_TRUE(w.st().PeerSynced("j", 0, 12345).ok());  // nobody can check it yet
  w.RunAll("t", w.Spread());
  SwarmReportOutcome out = w.ReportStage(1);
  ASSERT_EQ(out.syncs_refused.size(), 1u);
  EXPECT_NE(out.syncs_refused[0].find("'j'"), std::string::npos) << out.syncs_refused[0];
  const SwarmSnapshot snap = w.Snap();
  const SwarmPeerInfo* p = FindPeer(snap, "j");
  EXPECT_FALSE(p->synced);
  EXPECT_EQ(p->source, SwarmSyncSource::kDonor);
  EXPECT_EQ(p->donor, "b");
  EXPECT_EQ(snap.counters.syncs_refused, 1);
  ASSERT_TRUE(w.ReportAll().has_value());
  EXPECT_EQ(FindPeer(w.Snap(), "j")->state, SwarmPeerState::kSyncing);  // not admitted
}

TEST(SwarmState, AHashMismatchFencesThePeerAndASecondOneEvictsIt) {
  World w;
  for (int k = 0; k < 9; ++k) w.Join("p" + std::to_string(k));  // stage 1: p1, p4, p7
  w.SyncAll();
  ASSERT_EQ(StagePeerIds(w.Snap(), 1), (std::vector<std::string>{"p1", "p4", "p7"}));
  Warm(w);
  constexpr uint64_t kCorrupt = 0x5bd1e995;

  for (int round = 1; round <= 2; ++round) {
    SCOPED_TRACE(round);
    const int64_t step = w.Snap().next_step;
    w.RunAll("t", w.Spread());
    const std::vector<int64_t> p4_ids(w.Own("p4").begin(), w.Own("p4").end());
    ASSERT_FALSE(p4_ids.empty());
    w.ReportStage(0);
    w.ReportStage(2);
    ASSERT_TRUE(w.Report("p1").ok());
    ASSERT_TRUE(w.Report("p4", kCorrupt).ok());
    auto out = w.Report("p7");
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->drifted.size(), 1u);
    const SwarmDrift& d = out->drifted[0];
    EXPECT_EQ(d.peer, "p4");
    EXPECT_EQ(d.stage, 1);
    EXPECT_EQ(d.drifts, round);
    EXPECT_EQ(d.evicted, round == 2);
    EXPECT_NE(d.message.find("'p4'"), std::string::npos) << d.message;
    EXPECT_NE(d.message.find(round == 2 ? "evicted" : "syncing again"), std::string::npos)
        << d.message;
    EXPECT_FALSE(out->apply.has_value());

    SwarmSnapshot snap = w.Snap();
    EXPECT_EQ(snap.stages[1].phase, SwarmStagePhase::kCollecting);
    EXPECT_EQ(snap.stages[1].missing, static_cast<int64_t>(p4_ids.size()));
    EXPECT_EQ(snap.counters.drifts, round);
    const SwarmPeerInfo* p4 = FindPeer(snap, "p4");
    if (round == 1) {
      ASSERT_NE(p4, nullptr);
      EXPECT_EQ(p4->state, SwarmPeerState::kSyncing);
      EXPECT_FALSE(p4->in_round);
      EXPECT_TRUE(p4->donor == "p1" || p4->donor == "p7") << p4->donor;
    } else {
      EXPECT_EQ(p4, nullptr);
      EXPECT_EQ(snap.counters.evictions, 1);
    }
    // Its micro-batches come back as replays of stage 1 alone, and go to the others.
    auto replays = w.st().Lease("t", 100);
    ASSERT_TRUE(replays.ok());
    ASSERT_EQ(replays->size(), p4_ids.size());
    for (size_t k = 0; k < p4_ids.size(); ++k) {
      EXPECT_EQ((*replays)[k].id, p4_ids[k]);
      EXPECT_EQ((*replays)[k].stages, std::vector<int>{1});
      w.Run("t", (*replays)[k], w.Spread());
    }
    SwarmReportOutcome last = w.ReportStage(1);
    ASSERT_TRUE(last.apply.has_value());
    EXPECT_EQ(last.apply->step, step);
    ExpectClosedForm(*last.apply, 1.0);
    if (round == 1) {
      // p4 resyncs during the next round and serves from the one after.
      ASSERT_TRUE(w.st().PeerSynced("p4", step + 1, StateHash(1, step + 1)).ok());
      w.RunAll("t", w.Spread());
      ASSERT_TRUE(w.ReportAll().has_value());
      ASSERT_EQ(FindPeer(w.Snap(), "p4")->state, SwarmPeerState::kServing);
    }
  }
  EXPECT_EQ(w.Snap().counters.fences, 2);
}

TEST(SwarmState, ATieBetweenTwoReportsGoesToTheSeniorPeer) {
  World w;
  StartFour(w);  // stage 0: a (senior), d
  Warm(w);
  w.RunAll("t", w.Spread());
  ASSERT_TRUE(w.Report("a", 0xabc).ok());  // a is the one that is wrong: nobody can tell
  auto out = w.Report("d");
  ASSERT_TRUE(out.ok());
  ASSERT_EQ(out->drifted.size(), 1u);
  EXPECT_EQ(out->drifted[0].peer, "d");
}

TEST(SwarmState, DrainingAStagesLastPeerSendsTheNextJoinerThere) {
  World w;
  StartFour(w);  // a, d | b | c
  for (const char* id : {"a", "d", "b"}) ASSERT_TRUE(w.st().ReportLoad(id, 10, 0).ok());
  ASSERT_TRUE(w.st().ReportLoad("c", 1, 0).ok());  // stage 2 is the weakest
  const uint64_t version = w.Snap().roster_version;
  ASSERT_TRUE(w.st().Drain("b").ok());
  EXPECT_GT(w.Snap().roster_version, version);
  const std::string drained = Flatten(w.Snap());
  ASSERT_TRUE(w.st().Drain("b").ok());  // again: nothing changes
  EXPECT_EQ(Flatten(w.Snap()), drained);
  EXPECT_EQ(w.st().Drain("nobody").code(), Code::kNotFound);
  SwarmSnapshot snap = w.Snap();
  EXPECT_EQ(FindPeer(snap, "b")->state, SwarmPeerState::kDraining);
  EXPECT_TRUE(FindPeer(snap, "b")->in_round);
  EXPECT_FALSE(FindPeer(snap, "b")->can_leave);

  // b finishes the round (it is all stage 1 has); step 1 cannot open without a serving peer.
  w.RunAll("t", w.Spread());
  ASSERT_TRUE(w.ReportAll().has_value());
  snap = w.Snap();
  EXPECT_FALSE(snap.open_step.has_value());
  EXPECT_NE(snap.waiting.find("stage 1"), std::string::npos) << snap.waiting;
  absl::StatusOr<SwarmApply> pending = w.st().Decision(1);
  EXPECT_EQ(pending.status().code(), Code::kUnavailable);
  EXPECT_NE(pending.status().message().find("stage 1"), std::string::npos) << pending.status();
  EXPECT_EQ(w.st().Lease("t", 1).status().code(), Code::kFailedPrecondition);

  // The next joiner goes to stage 1, not to the weaker stage 2, and syncs from b.
  SwarmJoin j = w.Join("j");
  EXPECT_EQ(j.stage, 1);
  EXPECT_EQ(j.source, SwarmSyncSource::kDonor);
  EXPECT_EQ(j.donor, "b");
  EXPECT_EQ(j.step, 1);
  EXPECT_FALSE(FindPeer(w.Snap(), "b")->can_leave);
  EXPECT_EQ(w.st().Drain("j").code(), Code::kFailedPrecondition);  // syncing
  ASSERT_TRUE(w.st().PeerSynced("j", 1, StateHash(1, 1)).ok());
  snap = w.Snap();
  ASSERT_EQ(snap.open_step, 1);
  EXPECT_EQ(FindPeer(snap, "j")->state, SwarmPeerState::kServing);
  EXPECT_TRUE(FindPeer(snap, "b")->can_leave);
  auto left = w.st().RemovePeer("b", SwarmLeaveReason::kLeft);
  ASSERT_TRUE(left.ok());
  EXPECT_EQ(left->dropped, 0);
  EXPECT_FALSE(left->needs_rollback);
  w.Drop("b");
  w.RunAll("t", w.Spread());
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  EXPECT_EQ(w.Snap().counters.leaves, 1);
}

TEST(SwarmState, AMovedPeerFinishesItsRoundThenSyncsItsNewStage) {
  World w;
  StartFour(w);  // a, d | b | c
  Warm(w);       // step 1 is open with a and d at stage 0
  ASSERT_EQ(w.Snap().open_step, 1);
  // Everyone accumulates a share of step 1 (d too), then d is sent to stage 1.
  w.RunAll("t", w.Spread());
  ASSERT_FALSE(w.Own("d").empty());
  ASSERT_TRUE(w.st().MovePeer("d", 1).ok());
  SwarmSnapshot snap = w.Snap();
  const SwarmPeerInfo* d = FindPeer(snap, "d");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->stage, 0);  // it holds micro-batches stage 0 still needs
  EXPECT_EQ(d->state, SwarmPeerState::kDraining);
  EXPECT_EQ(d->moving_to, 1);
  EXPECT_TRUE(d->in_round);
  EXPECT_EQ(Routable(snap, 0), std::vector<std::string>{"a"});
  EXPECT_EQ(snap.counters.moves, 0);
  // Stage 0 reduces with d; once it agrees, d is a joiner of stage 1 syncing from b.
  w.ReportStage(0);
  snap = w.Snap();
  d = FindPeer(snap, "d");
  EXPECT_EQ(d->stage, 1);
  EXPECT_EQ(d->state, SwarmPeerState::kSyncing);
  EXPECT_EQ(d->source, SwarmSyncSource::kDonor);
  EXPECT_EQ(d->donor, "b");
  EXPECT_EQ(d->moving_to, -1);
  EXPECT_EQ(StagePeerIds(snap, 1), (std::vector<std::string>{"b", "d"}));  // newest last
  EXPECT_EQ(snap.counters.moves, 1);
  // d's micro-batches count once: the step's clip scale is the closed form's.
  w.Drop("d");
  ASSERT_TRUE(w.st().PeerSynced("d", 1, StateHash(1, 1)).ok());
  std::optional<SwarmApply> apply;
  for (int s = 1; s < kStages; ++s) {
    SwarmReportOutcome out = w.ReportStage(s);
    if (out.apply) apply = out.apply;
  }
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  // d synced state 1 one step behind, checked: it serves stage 1 in step 2.
  snap = w.Snap();
  ASSERT_EQ(snap.open_step, 2);
  EXPECT_EQ(FindPeer(snap, "d")->state, SwarmPeerState::kServing);
  EXPECT_EQ(StagePeerIds(snap, 0), std::vector<std::string>{"a"});
  w.RunAll("t", w.Spread());
  EXPECT_FALSE(w.Own("d").empty());
  apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
}

TEST(SwarmState, AMoveIsCheckedAndAPeerHoldingNothingMovesAtOnce) {
  World w;
  StartFour(w);  // a, d | b | c
  Warm(w);
  w.Join("small");  // syncing
  const std::string before = Flatten(w.Snap());
  EXPECT_EQ(w.st().MovePeer("nobody", 1).code(), Code::kNotFound);
  EXPECT_EQ(w.st().MovePeer("d", 0).code(), Code::kInvalidArgument);   // its own stage
  EXPECT_EQ(w.st().MovePeer("d", 3).code(), Code::kInvalidArgument);   // no such stage
  EXPECT_EQ(w.st().MovePeer("d", -1).code(), Code::kInvalidArgument);
  EXPECT_EQ(w.st().MovePeer("b", 0).code(), Code::kFailedPrecondition);  // stage 1's only one
  EXPECT_EQ(w.st().MovePeer("small", 0).code(), Code::kFailedPrecondition);  // syncing
  EXPECT_EQ(Flatten(w.Snap()), before);
  // A peer with 150 bytes serves stage 0 (100) but cannot move to stage 2 (300).
  World v;
  EXPECT_EQ(v.Join("a", 150).stage, 0);
  EXPECT_EQ(v.Join("b").stage, 1);
  EXPECT_EQ(v.Join("c").stage, 2);
  EXPECT_EQ(v.Join("d").stage, 0);
  v.SyncAll();
  Warm(v);
  EXPECT_EQ(v.st().MovePeer("a", 2).code(), Code::kResourceExhausted);
  // d holds nothing of step 1 yet: it moves at once, syncing from c.
  ASSERT_TRUE(v.st().MovePeer("d", 2).ok());
  const SwarmSnapshot snap = v.Snap();
  const SwarmPeerInfo* d = FindPeer(snap, "d");
  EXPECT_EQ(d->stage, 2);
  EXPECT_EQ(d->state, SwarmPeerState::kSyncing);
  EXPECT_EQ(d->donor, "c");
  EXPECT_EQ(snap.counters.moves, 1);
  EXPECT_EQ(snap.stages[0].missing, kM);  // the round goes on without it
  v.RunAll("t", v.Spread());
  std::optional<SwarmApply> apply = v.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
}

TEST(SwarmState, RebalanceMovesAPeerIntoTheBottleneckAfterTwoChecksInARow) {
  World w;
  StartFour(w);  // a, d | b | c
  Warm(w);
  // Before every serving peer has reported its throughput: no check.
  ASSERT_TRUE(w.st().ReportLoad("a", 10, 0).ok());
  absl::StatusOr<std::optional<SwarmMove>> m = w.st().Rebalance(0);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FALSE(m->has_value());
  for (const char* id : {"d", "c"}) ASSERT_TRUE(w.st().ReportLoad(id, 10, 0).ok());
  ASSERT_TRUE(w.st().ReportLoad("b", 4, 0).ok());  // stage 1: 4 samples/s, the others 20 and 10
  m = w.st().Rebalance(1);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FALSE(m->has_value());  // the first win
  EXPECT_EQ(w.st().Rebalance(1).status().code(), Code::kInvalidArgument);  // not increasing
  m = w.st().Rebalance(2);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_TRUE(m->has_value());
  EXPECT_EQ((*m)->from, 0);
  EXPECT_EQ((*m)->to, 1);
  EXPECT_DOUBLE_EQ((*m)->bottleneck_before, 4);
  EXPECT_DOUBLE_EQ((*m)->bottleneck_after, 10);
  const SwarmSnapshot snap = w.Snap();
  const SwarmPeerInfo* moved = FindPeer(snap, (*m)->peer);
  ASSERT_NE(moved, nullptr);
  EXPECT_EQ(moved->stage, 1);  // it held nothing of the open step
  EXPECT_EQ(moved->state, SwarmPeerState::kSyncing);
  // Its stage-0 rate says nothing of stage 1: forgotten until it reports there.
  EXPECT_FALSE(moved->throughput_reported);
  // While it syncs the pools are changing: no check.
  m = w.st().Rebalance(3);
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->has_value());
  // Bad rebalancer options are refused when the state is made.
  SwarmStateOptions bad = Options();
  bad.rebalance.balance_quality = 0;
  EXPECT_EQ(SwarmState::Create(Job(), bad).status().code(), Code::kInvalidArgument);
}

// The payback rule reads the link each peer joined with: stage 1's 200 bytes over a 1 byte/s
// link take 200 s, more than a period (60 s), so the same bottleneck moves nothing.
TEST(SwarmState, RebalanceMovesNothingWhoseStateTransferWouldNotPayBack) {
  World w;
  EXPECT_EQ(w.Join("a", 1000, 1.0).stage, 0);
  EXPECT_EQ(w.Join("b", 1000, 1.0).stage, 1);
  EXPECT_EQ(w.Join("c", 1000, 1.0).stage, 2);
  EXPECT_EQ(w.Join("d", 1000, 1.0).stage, 0);
  w.SyncAll();
  Warm(w);
  for (const char* id : {"a", "d", "c"}) ASSERT_TRUE(w.st().ReportLoad(id, 10, 0).ok());
  ASSERT_TRUE(w.st().ReportLoad("b", 4, 0).ok());
  for (int64_t period = 1; period <= 4; ++period) {
    absl::StatusOr<std::optional<SwarmMove>> m = w.st().Rebalance(period);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_FALSE(m->has_value()) << "period " << period;
  }
}

TEST(SwarmState, AStageLosingItsLastPeerNeedsARollback) {
  World w;
  StartFour(w);  // a, d | b | c
  w.RunAll("t", w.Spread());
  ASSERT_TRUE(w.ReportAll().has_value());
  ASSERT_TRUE(w.st().CheckpointSaved(1).ok());
  ASSERT_TRUE(w.st().CheckpointSaved(1).ok());  // again: OK
  EXPECT_EQ(w.st().CheckpointSaved(0).code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.st().CheckpointSaved(2).code(), Code::kOutOfRange);

  // Step 1: c, stage 2's only peer, dies mid-round.
  auto part = w.st().Lease("t", 3);
  ASSERT_TRUE(part.ok());
  for (const SwarmLease& l : *part) w.Run("t", l, w.Spread());
  auto removed = w.st().RemovePeer("c", SwarmLeaveReason::kDead);
  ASSERT_TRUE(removed.ok());
  EXPECT_TRUE(removed->needs_rollback);
  EXPECT_EQ(removed->dropped, 3);
  w.Drop("c");
  SwarmSnapshot snap = w.Snap();
  ASSERT_TRUE(snap.rollback.has_value());
  EXPECT_EQ(snap.rollback->stage, 2);
  EXPECT_EQ(snap.rollback->from_step, 1);
  EXPECT_EQ(snap.rollback->to_step, 1);
  EXPECT_EQ(snap.rollback->source, SwarmSyncSource::kCheckpoint);
  EXPECT_NE(snap.rollback->reason.find("stage 2"), std::string::npos) << snap.rollback->reason;
  // Nothing moves until the rollback.
  EXPECT_EQ(w.st().Lease("t", 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.Commit("a", "t", (*part)[0].id).code(), Code::kFailedPrecondition);
  EXPECT_EQ(w.st().Decision(1).status().code(), Code::kUnavailable);
  SwarmJoin j = w.Join("j");
  EXPECT_EQ(j.stage, 2);
  EXPECT_EQ(j.source, SwarmSyncSource::kCheckpoint);
  EXPECT_EQ(j.step, 1);
  EXPECT_EQ(w.st().PeerSynced("j", 1, StateHash(2, 1)).code(), Code::kFailedPrecondition);

  // The checkpoint is state 1, what every other peer still holds: they keep it, the round
  // restarts once stage 2 has a peer.
  auto back = w.st().RollBack();
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, 1);
  EXPECT_EQ(w.st().RollBack().status().code(), Code::kFailedPrecondition);
  snap = w.Snap();
  EXPECT_FALSE(snap.rollback.has_value());
  EXPECT_EQ(snap.counters.rollbacks, 1);
  EXPECT_FALSE(snap.open_step.has_value());
  EXPECT_NE(snap.waiting.find("stage 2"), std::string::npos) << snap.waiting;
  for (const char* id : {"a", "d", "b"}) {
    EXPECT_EQ(FindPeer(snap, id)->state, SwarmPeerState::kServing) << id;
  }
  EXPECT_TRUE(w.st().Decision(0).ok());
  ASSERT_TRUE(w.st().PeerSynced("j", 1, StateHash(2, 1)).ok());
  ASSERT_EQ(w.Snap().open_step, 1);
  for (const char* peer : {"a", "d", "b"}) w.Drop(peer);  // the round was dropped
  w.RunAll("t", w.Spread());
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);

  // Step 2: b, stage 1's only peer, dies. State 2 is nowhere: everyone goes back to state 1.
  ASSERT_EQ(w.Snap().open_step, 2);
  removed = w.st().RemovePeer("b", SwarmLeaveReason::kDead);
  ASSERT_TRUE(removed.ok());
  EXPECT_TRUE(removed->needs_rollback);
  back = w.st().RollBack();
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, 1);
  snap = w.Snap();
  EXPECT_EQ(snap.next_step, 1);
  for (const SwarmStageInfo& st : snap.stages) {
    for (const SwarmPeerInfo& p : st.peers) {
      EXPECT_EQ(p.state, SwarmPeerState::kSyncing) << p.id;
      EXPECT_EQ(p.source, SwarmSyncSource::kCheckpoint) << p.id;
    }
  }
  EXPECT_EQ(w.st().Decision(1).status().code(), Code::kUnavailable);  // undone, pending again
  EXPECT_TRUE(w.st().Decision(0).ok());
  EXPECT_EQ(w.Join("k").stage, 1);
  w.SyncAll();
  ASSERT_EQ(w.Snap().open_step, 1);
  w.RunAll("t", w.Spread());
  apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
  EXPECT_EQ(w.Snap().counters.rollbacks, 2);
}

TEST(SwarmState, WithoutACheckpointARollbackGoesBackToInit) {
  World w;
  StartFour(w);
  w.RunAll("t", w.Spread());
  ASSERT_TRUE(w.ReportAll().has_value());
  // Between rounds nobody holds stage 2's state 1 once c is gone, and no checkpoint has it.
  auto removed = w.st().RemovePeer("c", SwarmLeaveReason::kEvicted);
  ASSERT_TRUE(removed.ok());
  ASSERT_TRUE(removed->needs_rollback);
  const SwarmSnapshot snap = w.Snap();
  EXPECT_EQ(snap.rollback->to_step, 0);
  EXPECT_EQ(snap.rollback->source, SwarmSyncSource::kInit);
  EXPECT_EQ(snap.counters.evictions, 1);
  ASSERT_EQ(*w.st().RollBack(), 0);
  EXPECT_EQ(FindPeer(w.Snap(), "a")->source, SwarmSyncSource::kInit);
  EXPECT_EQ(w.Join("c2").stage, 2);
  w.SyncAll();
  ASSERT_EQ(w.Snap().open_step, 0);
}

TEST(SwarmState, ASwarmResumesFromACheckpoint) {
  World w(Job(1.0, 5));
  SwarmJoin a = w.Join("a");
  EXPECT_EQ(a.source, SwarmSyncSource::kCheckpoint);
  EXPECT_EQ(a.step, 5);
  w.Join("b");
  w.Join("c");
  EXPECT_EQ(w.st().PeerSynced("a", 0, StateHash(0, 0)).code(), Code::kOutOfRange);
  w.SyncAll();
  ASSERT_EQ(w.Snap().open_step, 5);
  w.RunAll("t", w.Spread());
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  EXPECT_EQ(apply->step, 5);
  ExpectClosedForm(*apply, 1.0);
}

TEST(SwarmState, EveryInputIsCheckedAndARefusedCallChangesNothing) {
  {
    SwarmJob bad = Job();
    bad.stages = 0;
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    bad = Job();
    bad.micro_batches = 0;
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    bad = Job();
    bad.stage_bytes = {1, 2};
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    bad = Job();
    bad.stage_bytes[1] = -1;
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    bad = Job();
    bad.grad_clip = std::nan("");
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    bad = Job();
    bad.checkpoint_step = -2;
    EXPECT_EQ(SwarmState::Create(bad, Options()).status().code(), Code::kInvalidArgument);
    SwarmStateOptions o = Options();
    o.max_joiners_per_donor = 0;
    EXPECT_EQ(SwarmState::Create(Job(), o).status().code(), Code::kInvalidArgument);
    o = Options();
    o.default_throughput = -1;
    EXPECT_EQ(SwarmState::Create(Job(), o).status().code(), Code::kInvalidArgument);
    o = Options();
    o.learning_rate = nullptr;
    EXPECT_EQ(SwarmState::Create(Job(), o).status().code(), Code::kInvalidArgument);
  }

  World w;
  StartFour(w);
  auto two = w.st().Lease("t", 2);  // ids 0 and 1
  ASSERT_TRUE(two.ok());
  SwarmState& st = w.st();
  const std::string before = Flatten(w.Snap());
  auto expect = [&](const absl::Status& s, Code code, const std::string& names) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(names), std::string::npos) << "'" << names << "' not in " << s;
    EXPECT_EQ(Flatten(w.Snap()), before) << s;
  };
  expect(st.AddPeer("", "x:1", 1).status(), Code::kInvalidArgument, "empty peer id");
  expect(st.AddPeer("x", "", 1).status(), Code::kInvalidArgument, "'x'");
  expect(st.AddPeer("x", "x:1", -1).status(), Code::kInvalidArgument, "-1");
  expect(st.AddPeer("x", "x:1", 1000, -5).status(), Code::kInvalidArgument, "link -5");
  expect(st.AddPeer("x", "x:1", 1000, std::nan("")).status(), Code::kInvalidArgument, "link nan");
  expect(st.AddPeer("a", "a:1", 1000).status(), Code::kAlreadyExists, "'a'");
  expect(st.DonorFailed("nobody", "a").status(), Code::kNotFound, "'nobody'");
  expect(st.DonorFailed("a", "b").status(), Code::kFailedPrecondition, "'a'");
  expect(st.PeerSynced("nobody", 0, 0), Code::kNotFound, "'nobody'");
  expect(st.PeerSynced("a", 0, 0), Code::kFailedPrecondition, "SERVING");
  expect(st.RemovePeer("nobody", SwarmLeaveReason::kDead).status(), Code::kNotFound, "'nobody'");
  expect(st.RemovePeer("a", static_cast<SwarmLeaveReason>(7)).status(), Code::kInvalidArgument,
         "7");
  expect(st.Drain("nobody"), Code::kNotFound, "'nobody'");
  expect(st.ReportLoad("a", -1, 0), Code::kInvalidArgument, "-1");
  expect(st.ReportLoad("a", std::nan(""), 0), Code::kInvalidArgument, "nan");
  expect(st.ReportLoad("a", 1, -2), Code::kInvalidArgument, "-2");
  expect(st.ReportLoad("nobody", 1, 1), Code::kNotFound, "'nobody'");
  expect(st.AddTrainer(""), Code::kInvalidArgument, "empty");
  expect(st.AddTrainer("t"), Code::kAlreadyExists, "'t'");
  expect(st.RemoveTrainer("nobody").status(), Code::kNotFound, "'nobody'");
  expect(st.Lease("nobody", 1).status(), Code::kNotFound, "'nobody'");
  expect(st.Lease("t", 0).status(), Code::kInvalidArgument, "0");
  expect(st.Release("nobody", 0), Code::kNotFound, "'nobody'");
  expect(st.Release("t", 99), Code::kOutOfRange, "99");
  expect(st.Release("t", 5), Code::kFailedPrecondition, "5");
  expect(st.Commit("nobody", "t", 0), Code::kNotFound, "'nobody'");
  expect(st.Commit("a", "nobody", 0), Code::kNotFound, "'nobody'");
  expect(st.Commit("a", "t", 99), Code::kOutOfRange, "99");
  expect(st.Commit("a", "t", 5), Code::kFailedPrecondition, "5");
  SwarmStageReport r;
  r.peer = "nobody";
  expect(st.StageReport(r).status(), Code::kNotFound, "'nobody'");
  r.peer = "a";
  r.step = 3;
  expect(st.StageReport(r).status(), Code::kOutOfRange, "step 3");
  r.step = 0;
  expect(st.StageReport(r).status(), Code::kFailedPrecondition, "collecting");
  r.sum_squares = std::nan("");
  expect(st.StageReport(r).status(), Code::kInvalidArgument, "nan");
  r.sum_squares = -1;
  expect(st.StageReport(r).status(), Code::kInvalidArgument, "-1");
  expect(st.Decision(-1).status(), Code::kOutOfRange, "-1");
  expect(st.CheckpointSaved(-1), Code::kOutOfRange, "-1");
  expect(st.CheckpointSaved(2), Code::kOutOfRange, "newest state is 0");
  expect(st.RollBack().status(), Code::kFailedPrecondition, "none");

  // Reports against a plan.
  for (const SwarmLease& l : *two) w.Run("t", l, w.Spread());
  w.RunAll("t", w.Spread());
  SwarmSnapshot snap = w.Snap();
  ASSERT_TRUE(snap.stages[0].reduction.has_value());
  const SwarmReduction plan = *snap.stages[0].reduction;
  const std::vector<int64_t> a_ids = plan.ids.at("a");
  ASSERT_FALSE(a_ids.empty());
  const double g = w.Reduced(snap, 0);
  r = SwarmStageReport{"a", 0, plan.plan, a_ids, g * g, StateHash(0, 0)};
  const std::string planned = Flatten(snap);
  auto expect_planned = [&](const absl::Status& s, Code code, const std::string& names) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(names), std::string::npos) << "'" << names << "' not in " << s;
    EXPECT_EQ(Flatten(w.Snap()), planned) << s;
  };
  SwarmStageReport wrong = r;
  wrong.ids.pop_back();
  expect_planned(st.StageReport(wrong).status(), Code::kInvalidArgument,
                 "missing from the report: " + std::to_string(a_ids.back()));
  wrong = r;
  wrong.ids.push_back(a_ids.back());
  expect_planned(st.StageReport(wrong).status(), Code::kInvalidArgument, "repeated");
  wrong = r;
  wrong.plan = plan.plan + 100;
  expect_planned(st.StageReport(wrong).status(), Code::kFailedPrecondition,
                 "current plan " + std::to_string(plan.plan));
  wrong = r;
  wrong.peer = "b";  // stage 1's plan is another one
  EXPECT_EQ(st.StageReport(wrong).status().code(), Code::kFailedPrecondition);
  ASSERT_TRUE(st.StageReport(r).ok());
  const std::string reported = Flatten(w.Snap());
  auto repeat = st.StageReport(r);  // a retry: accepted, nothing changes
  ASSERT_TRUE(repeat.ok());
  EXPECT_EQ(repeat->stage_phase, SwarmStagePhase::kReducing);
  EXPECT_EQ(Flatten(w.Snap()), reported);
  wrong = r;
  wrong.sum_squares = 2 * r.sum_squares;
  EXPECT_EQ(st.StageReport(wrong).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(Flatten(w.Snap()), reported);
  std::optional<SwarmApply> apply = w.ReportAll();
  ASSERT_TRUE(apply.has_value());
  ExpectClosedForm(*apply, 1.0);
}

// Trainers on their own threads lease and commit while another thread reads the status: the
// step still closes with every micro-batch once per stage.
TEST(SwarmState, ConcurrentTrainersAndReaders) {
  constexpr int kSteps = 4;
  World w;
  for (const char* id : {"a", "b", "c", "d", "e", "f"}) w.Join(id);
  w.SyncAll();
  Warm(w);
  std::vector<std::string> trainers = {"t1", "t2", "t3"};
  for (const std::string& t : trainers) ASSERT_TRUE(w.st().AddTrainer(t).ok());
  for (int k = 0; k < kSteps; ++k) {
    const int64_t step = w.Snap().next_step;
    std::mutex mu;
    std::map<std::string, std::set<int64_t>> own;  // guarded by mu
    std::atomic<bool> done{false};
    std::thread reader([&] {
      uint64_t last = 0;
      while (!done.load()) {
        const SwarmSnapshot snap = w.st().Snapshot();
        EXPECT_GE(snap.roster_version, last);
        last = snap.roster_version;
      }
    });
    std::vector<std::thread> threads;
    for (const std::string& t : trainers) {
      threads.emplace_back([&, t] {
        for (;;) {
          auto leases = w.st().Lease(t, 1);
          ASSERT_TRUE(leases.ok()) << leases.status();
          if (leases->empty()) return;
          const SwarmLease& l = (*leases)[0];
          const SwarmSnapshot snap = w.st().Snapshot();
          for (auto s = l.stages.rbegin(); s != l.stages.rend(); ++s) {
            const std::vector<std::string> peers = Routable(snap, *s);
            const std::string& peer = peers[l.id % peers.size()];
            ASSERT_TRUE(w.st().Commit(peer, t, l.id).ok());
            std::lock_guard<std::mutex> lock(mu);
            ASSERT_TRUE(own[peer].insert(l.id).second);
          }
        }
      });
    }
    for (std::thread& th : threads) th.join();
    done = true;
    reader.join();
    // Every stage is held: the plans' ids are what the threads recorded.
    const SwarmSnapshot snap = w.Snap();
    std::optional<SwarmApply> apply;
    for (int s = 0; s < kStages; ++s) {
      ASSERT_EQ(snap.stages[s].phase, SwarmStagePhase::kReducing) << "stage " << s;
      const SwarmReduction& red = *snap.stages[s].reduction;
      double g = 0;
      for (const std::string& peer : red.peers) {
        ASSERT_EQ(red.ids.at(peer), std::vector<int64_t>(own[peer].begin(), own[peer].end()));
        for (int64_t id : own[peer]) g += G(s, id);
      }
      for (const std::string& peer : red.peers) {
        auto out = w.st().StageReport(
            {peer, step, red.plan, red.ids.at(peer), g * g, StateHash(s, step)});
        ASSERT_TRUE(out.ok()) << out.status();
        if (out->apply) apply = out->apply;
      }
    }
    ASSERT_TRUE(apply.has_value());
    ExpectClosedForm(*apply, 1.0);
  }
}

// Thousands of random events: joins, syncs, donor failures, deaths, drains and leaves, trainers
// coming and going, leases, peer commits, reports (a few with a corrupted hash), checkpoints and
// rollbacks. The test keeps its own account of who accumulated what and checks the state machine
// against it after every event, and every decision against the closed form.
TEST(SwarmState, RandomEventsKeepEveryMicroBatchExactlyOncePerStage) {
  constexpr int kEvents = 30000;
  constexpr int kMaxPeers = 13;
  constexpr double kClip = 13.98;  // about the median step's norm: half the steps clip
  constexpr uint64_t kCorrupt = 0x5bd1e995;
  std::mt19937_64 rng(20250611);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto pick = [&](const auto& v) -> const auto& {
    return v[uniform(0, static_cast<int>(v.size()) - 1)];
  };

  SwarmJob job = Job(kClip);
  job.stage_bytes = {100, 100, 100};
  auto created = SwarmState::Create(job, Options());
  ASSERT_TRUE(created.ok());
  SwarmState& st = **created;

  // The test's account of the round in progress.
  std::map<std::string, std::set<int64_t>> own;        // peer -> what it accumulated
  std::map<std::pair<int, int64_t>, std::string> held;  // (stage, id) -> the peer holding it
  struct TrainerLease {
    int64_t id;
    std::vector<int> left;  // stages still to accumulate, highest first (the backward's order)
  };
  std::map<std::string, std::vector<TrainerLease>> leases;  // trainer -> its leases
  std::map<uint64_t, std::string> corrupted;               // plan -> its corrupted reporter
  std::map<int, double> agreed;                             // stage -> its agreed reduced sum
  auto forget_peer = [&](const std::string& peer, bool fenced) {
    own.erase(peer);
    if (!fenced) return;
    for (auto it = held.begin(); it != held.end();) {
      it = it->second == peer ? held.erase(it) : std::next(it);
    }
  };

  std::map<std::string, int> stage_of;  // every peer's stage at the last event
  int64_t moves_started = 0, moves_seen = 0;
  int next_peer = 0, next_trainer = 0;
  int64_t applies = 0, drifts = 0, deaths = 0, rollbacks = 0, replays_leased = 0, leaves = 0;
  int64_t clipped = 0, trainer_waits = 0;
  uint64_t last_version = 0, last_apply_version = 0;
  std::tuple<int64_t, int64_t, int64_t> round_key{-2, -1, -1};

  for (int event = 0; event < kEvents; ++event) {
    SCOPED_TRACE(event);
    const SwarmSnapshot snap = st.Snapshot();
    // --- Invariants of every state --------------------------------------------------------
    ASSERT_GE(snap.roster_version, last_version);
    last_version = snap.roster_version;
    const std::tuple<int64_t, int64_t, int64_t> key{
        snap.open_step.value_or(-1), snap.counters.rollbacks, snap.counters.steps_applied};
    if (key != round_key) {
      if (std::get<2>(key) != std::get<2>(round_key)) {
        for (const auto& [t, ls] : leases) ASSERT_TRUE(ls.empty()) << t << " holds a lease";
      }
      own.clear();
      held.clear();
      leases.clear();
      corrupted.clear();
      agreed.clear();
      round_key = key;
    }
    // A peer whose move completed left its old stage's round: what it held there is the stage's
    // (agreed) or was nothing (it held none when it left a collecting stage).
    for (const SwarmStageInfo& stage : snap.stages) {
      for (const SwarmPeerInfo& p : stage.peers) {
        auto was = stage_of.find(p.id);
        if (was != stage_of.end() && was->second != p.stage) {
          ASSERT_EQ(p.state, SwarmPeerState::kSyncing) << p.id;
          ASSERT_FALSE(p.in_round) << p.id;
          own.erase(p.id);
          ++moves_seen;
        }
        stage_of[p.id] = p.stage;
      }
    }
    std::map<std::string, int> donor_load;
    for (const SwarmStageInfo& stage : snap.stages) {
      bool live = false;
      for (const SwarmPeerInfo& p : stage.peers) {
        const bool holds =
            p.state == SwarmPeerState::kServing || p.state == SwarmPeerState::kDraining;
        if (snap.open_step && !snap.rollback) {
          ASSERT_EQ(holds, p.in_round) << p.id;
        }
        live = live || p.in_round;
        ASSERT_EQ(p.accumulated, p.in_round ? static_cast<int64_t>(own[p.id].size()) : 0) << p.id;
        if (p.state == SwarmPeerState::kSyncing && !p.synced &&
            p.source == SwarmSyncSource::kDonor) {
          const SwarmPeerInfo* d = FindPeer(snap, p.donor);
          ASSERT_NE(d, nullptr) << p.id << "'s donor " << p.donor;
          ASSERT_EQ(d->stage, p.stage);
          // Never a peer behind: donors hold the newest state, and in a round they are in it.
          ASSERT_TRUE(d->state == SwarmPeerState::kServing ||
                      d->state == SwarmPeerState::kDraining)
              << p.donor;
          ASSERT_TRUE(!snap.open_step || d->in_round) << p.donor;
          ++donor_load[p.donor];
        }
      }
      if (snap.open_step && !snap.rollback) {
        ASSERT_TRUE(live) << "stage " << stage.index << " has no round peer, and no rollback";
        int64_t held_here = 0;
        for (const auto& [k, peer] : held) held_here += k.first == stage.index;
        ASSERT_EQ(stage.missing, kM - held_here) << "stage " << stage.index;
      }
    }
    for (const auto& [donor, n] : donor_load) {
      ASSERT_LE(n, 2) << donor;
      ASSERT_EQ(FindPeer(snap, donor)->joiners, n) << donor;
    }
    if (!snap.open_step && !snap.rollback) {
      ASSERT_FALSE(snap.waiting.empty());
    }

    std::vector<const SwarmPeerInfo*> all, serving, syncing, leavable;
    for (const SwarmStageInfo& stage : snap.stages) {
      for (const SwarmPeerInfo& p : stage.peers) {
        all.push_back(&p);
        if (p.state == SwarmPeerState::kServing) serving.push_back(&p);
        if (p.state == SwarmPeerState::kSyncing && !p.synced &&
            p.source != SwarmSyncSource::kWaitForDonor) {
          syncing.push_back(&p);
        }
        if (p.can_leave) leavable.push_back(&p);
      }
    }
    std::vector<std::string> alive_trainers;
    for (const SwarmTrainerInfo& t : snap.trainers) {
      if (t.alive) alive_trainers.push_back(t.id);
    }
    const bool running = snap.open_step.has_value() && !snap.rollback.has_value();

    // --- One event ------------------------------------------------------------------------
    const int roll = uniform(0, 999);
    if (roll < 60) {  // a join
      if (static_cast<int>(all.size()) >= kMaxPeers) continue;
      // A stage with nobody serving or syncing comes first (the lowest).
      int empty = -1;
      for (const SwarmStageInfo& stage : snap.stages) {
        bool anyone = false;
        for (const SwarmPeerInfo& p : stage.peers) {
          anyone = anyone || p.state != SwarmPeerState::kDraining;
        }
        if (!anyone && empty < 0) empty = stage.index;
      }
      const std::string id = "p" + std::to_string(next_peer++);
      auto join = st.AddPeer(id, id + ":1", 1000);
      ASSERT_TRUE(join.ok()) << join.status();
      if (empty >= 0) {
        ASSERT_EQ(join->stage, empty);
      }
      ASSERT_GT(st.roster_version(), snap.roster_version);
    } else if (roll < 150) {  // a joiner finishes, or its donor fails it
      if (syncing.empty()) continue;
      const SwarmPeerInfo& p = *pick(syncing);
      if (p.source == SwarmSyncSource::kDonor && chance(0.15)) {
        auto next = st.DonorFailed(p.id, p.donor);
        ASSERT_TRUE(next.ok()) << next.status();
      } else {
        absl::Status s = st.PeerSynced(p.id, snap.next_step, StateHash(p.stage, snap.next_step));
        if (snap.rollback) {
          ASSERT_EQ(s.code(), Code::kFailedPrecondition) << s;
          continue;
        }
        ASSERT_TRUE(s.ok()) << s;
      }
      ASSERT_GT(st.roster_version(), snap.roster_version);
    } else if (roll < 170) {  // a death
      if (all.empty()) continue;
      const SwarmPeerInfo& p = *pick(all);
      const bool fenced = p.in_round && snap.stages[p.stage].phase != SwarmStagePhase::kAgreed;
      int64_t want = 0;
      for (const auto& [k, peer] : held) want += fenced && peer == p.id;
      auto removed = st.RemovePeer(p.id, SwarmLeaveReason::kDead);
      ASSERT_TRUE(removed.ok()) << removed.status();
      ASSERT_EQ(removed->dropped, want) << p.id;
      forget_peer(p.id, fenced);
      ++deaths;
      ASSERT_GT(st.roster_version(), snap.roster_version);
    } else if (roll < 190) {  // a drained peer leaves when it may: nothing is lost
      if (leavable.empty()) continue;
      const SwarmPeerInfo& p = *pick(leavable);
      const bool fenced = p.in_round && snap.stages[p.stage].phase != SwarmStagePhase::kAgreed;
      auto removed = st.RemovePeer(p.id, SwarmLeaveReason::kLeft);
      ASSERT_TRUE(removed.ok()) << removed.status();
      ASSERT_EQ(removed->dropped, 0);
      ASSERT_EQ(removed->needs_rollback, snap.rollback.has_value()) << p.id << " could leave";
      forget_peer(p.id, fenced);
      ++leaves;
    } else if (roll < 205) {  // a drain, or a move to another stage
      if (serving.empty()) continue;
      const SwarmPeerInfo& p = *pick(serving);
      int serving_here = 0;
      for (const SwarmPeerInfo* q : serving) serving_here += q->stage == p.stage;
      const int to = (p.stage + uniform(1, kStages - 1)) % kStages;
      if (chance(0.5)) {
        absl::Status moved = st.MovePeer(p.id, to);
        if (snap.rollback || serving_here < 2) {
          ASSERT_EQ(moved.code(), Code::kFailedPrecondition) << moved;
          continue;
        }
        ASSERT_TRUE(moved.ok()) << moved;
        ++moves_started;
      } else {
        ASSERT_TRUE(st.Drain(p.id).ok());
      }
      ASSERT_GT(st.roster_version(), snap.roster_version);
    } else if (roll < 235) {  // trainers come and go
      if (alive_trainers.size() < 3 && (alive_trainers.empty() || chance(0.6))) {
        ASSERT_TRUE(st.AddTrainer("t" + std::to_string(next_trainer++)).ok());
        // A step that waited only for a trainer opens now.
        if (alive_trainers.empty() && snap.waiting.find("waits for a trainer") !=
                                          std::string::npos) {
          ASSERT_EQ(st.Snapshot().open_step, snap.next_step) << snap.waiting;
          ++trainer_waits;
        }
      } else if (!alive_trainers.empty()) {
        const std::string t = pick(alive_trainers);
        auto released = st.RemoveTrainer(t);
        ASSERT_TRUE(released.ok());
        ASSERT_EQ(*released, static_cast<int64_t>(leases[t].size())) << t;
        leases.erase(t);
      }
    } else if (roll < 380) {  // a lease
      if (alive_trainers.empty()) continue;
      const std::string t = pick(alive_trainers);
      const int max = uniform(1, 3);
      auto got = st.Lease(t, max);
      if (!running) {
        ASSERT_EQ(got.status().code(), Code::kFailedPrecondition) << got.status();
        continue;
      }
      ASSERT_TRUE(got.ok()) << got.status();
      // What the account says is free: not leased, and needed at some stage.
      std::set<int64_t> leased;
      for (const auto& [tr, ls] : leases) {
        for (const TrainerLease& l : ls) leased.insert(l.id);
      }
      std::vector<int64_t> free_ids;
      for (int i = 0; i < kM; ++i) {
        const int64_t id = snap.next_step * kM + i;
        bool needed = false;
        for (int s = 0; s < kStages; ++s) needed = needed || held.count({s, id}) == 0;
        if (needed && leased.count(id) == 0) free_ids.push_back(id);
      }
      ASSERT_EQ(got->size(), std::min<size_t>(max, free_ids.size()));
      bool fresh_seen = false;
      for (const SwarmLease& l : *got) {
        ASSERT_TRUE(std::count(free_ids.begin(), free_ids.end(), l.id)) << "id " << l.id;
        std::vector<int> want;
        for (int s = 0; s < kStages; ++s) {
          if (held.count({s, l.id}) == 0) want.push_back(s);
        }
        ASSERT_EQ(l.stages, want) << "id " << l.id;
        ASSERT_EQ(l.replay, want.size() < static_cast<size_t>(kStages));
        ASSERT_FALSE(l.replay && fresh_seen) << "a replay after a fresh id";
        fresh_seen = fresh_seen || !l.replay;
        replays_leased += l.replay;
        leases[t].push_back({l.id, std::vector<int>(want.rbegin(), want.rend())});
      }
    } else if (roll < 750) {  // a peer accumulates a leased micro-batch at the next stage
      std::vector<std::string> busy;
      for (const auto& [t, ls] : leases) {
        if (!ls.empty()) busy.push_back(t);
      }
      if (busy.empty()) continue;
      const std::string t = pick(busy);
      TrainerLease& l = leases[t].front();
      const int stage = l.left.front();
      const std::vector<std::string> peers = Routable(snap, stage);
      if (!running) {
        if (!peers.empty()) {
          ASSERT_FALSE(st.Commit(peers[0], t, l.id).ok());
        }
        continue;
      }
      ASSERT_FALSE(peers.empty()) << "stage " << stage;
      const std::string peer = pick(peers);
      absl::Status c = st.Commit(peer, t, l.id);
      ASSERT_TRUE(c.ok()) << c;
      ASSERT_TRUE(held.emplace(std::make_pair(stage, l.id), peer).second)
          << "(" << stage << ", " << l.id << ") accumulated twice";
      ASSERT_TRUE(own[peer].insert(l.id).second);
      l.left.erase(l.left.begin());
      if (l.left.empty()) leases[t].erase(leases[t].begin());
    } else if (roll < 950) {  // a plan peer reports
      if (!running) continue;
      std::vector<int> reducing;
      for (const SwarmStageInfo& stage : snap.stages) {
        if (stage.phase == SwarmStagePhase::kReducing) reducing.push_back(stage.index);
      }
      if (reducing.empty()) continue;
      const int s = pick(reducing);
      const SwarmStageInfo& stage = snap.stages[s];
      const SwarmReduction& plan = *stage.reduction;
      std::vector<std::string> waiting;
      for (const std::string& peer : plan.peers) {
        if (!std::count(stage.reported.begin(), stage.reported.end(), peer)) {
          waiting.push_back(peer);
        }
      }
      ASSERT_FALSE(waiting.empty());
      const std::string peer = pick(waiting);
      const std::set<int64_t>& mine = own[peer];
      ASSERT_EQ(plan.ids.at(peer), std::vector<int64_t>(mine.begin(), mine.end())) << peer;
      // The reduction: the plan peers' own accumulations, in plan order. Each of the step's
      // ids must be in exactly one of them.
      double g = 0;
      std::map<int64_t, int> counted;
      for (const std::string& q : plan.peers) {
        for (int64_t id : own[q]) {
          g += G(s, id);
          ++counted[id];
        }
      }
      ASSERT_EQ(counted.size(), static_cast<size_t>(kM));
      for (const auto& [id, n] : counted) {
        ASSERT_EQ(id / kM, snap.next_step);
        ASSERT_EQ(n, 1) << "stage " << s << " id " << id;
      }
      // Corrupt one report of a plan of three or more: the honest ones stay the majority.
      bool corrupt = false;
      if (plan.peers.size() >= 3 && corrupted.count(plan.plan) == 0 && chance(0.2)) {
        corrupted[plan.plan] = peer;
        corrupt = true;
      }
      SwarmStageReport r{peer, snap.next_step, plan.plan,
                         std::vector<int64_t>(mine.begin(), mine.end()), g * g,
                         StateHash(s, snap.next_step) ^ (corrupt ? kCorrupt : 0)};
      auto out = st.StageReport(r);
      ASSERT_TRUE(out.ok()) << out.status();
      ASSERT_TRUE(out->syncs_refused.empty());
      const bool completes = waiting.size() == 1;
      auto bad = corrupted.find(plan.plan);
      if (completes && bad != corrupted.end()) {
        ASSERT_EQ(out->drifted.size(), 1u);
        ASSERT_EQ(out->drifted[0].peer, bad->second);
        ++drifts;
        forget_peer(bad->second, true);
      } else {
        ASSERT_TRUE(out->drifted.empty());
      }
      if (completes && bad == corrupted.end()) {
        ASSERT_EQ(out->stage_phase, SwarmStagePhase::kAgreed);
        agreed[s] = g;
      }
      if (out->apply) {
        const SwarmApply& a = *out->apply;
        ASSERT_EQ(a.step, snap.next_step);
        ASSERT_EQ(agreed.size(), static_cast<size_t>(kStages));
        for (int k = 0; k < kStages; ++k) {
          ASSERT_EQ(a.stage_sum_squares[k], agreed[k] * agreed[k]) << "stage " << k;
          const double closed = ClosedFormStageSum(k, a.step, kM);
          ASSERT_NEAR(a.stage_sum_squares[k], closed * closed, 1e-12 * closed * closed);
        }
        const double want = ClosedFormClipScale(a.step, kStages, kM, kClip);
        ASSERT_NEAR(a.clip_scale, want, 1e-12 * want);
        ASSERT_EQ(a.lr, LearningRate(a.step));
        clipped += a.clip_scale < 1;
        const SwarmSnapshot after = st.Snapshot();
        ASSERT_GT(after.roster_version, last_apply_version);
        last_apply_version = after.roster_version;
        ASSERT_FALSE(after.rollback.has_value());
        bool all_serving = true;
        for (const SwarmStageInfo& stage_after : after.stages) {
          bool holder = false, serves = false;
          for (const SwarmPeerInfo& p : stage_after.peers) {
            holder = holder || p.state != SwarmPeerState::kSyncing;
            serves = serves || p.state == SwarmPeerState::kServing;
          }
          ASSERT_TRUE(holder) << "stage " << stage_after.index << " has nobody after step "
                              << a.step;
          all_serving = all_serving && serves;
        }
        const bool trainer = std::any_of(after.trainers.begin(), after.trainers.end(),
                                         [](const SwarmTrainerInfo& t) { return t.alive; });
        ASSERT_EQ(after.open_step.has_value(), all_serving && trainer);
        if (all_serving && !trainer) {
          ASSERT_NE(after.waiting.find("waits for a trainer"), std::string::npos)
              << after.waiting;
        }
        if (after.open_step) {
          ASSERT_EQ(*after.open_step, a.step + 1);
        }
        ++applies;
      }
    } else if (roll < 975) {  // the caller carries out a pending rollback
      if (!snap.rollback) continue;
      auto back = st.RollBack();
      ASSERT_TRUE(back.ok()) << back.status();
      ASSERT_EQ(*back, std::max<int64_t>(0, snap.checkpoint_step));
      ASSERT_EQ(st.Snapshot().next_step, *back);
      ++rollbacks;
    } else if (roll < 985) {  // a checkpoint of the newest state
      if (snap.rollback || !chance(0.3)) continue;
      ASSERT_TRUE(st.CheckpointSaved(snap.next_step).ok());
    } else {  // a load report
      if (all.empty()) continue;
      ASSERT_TRUE(st.ReportLoad(pick(all)->id, uniform(1, 40) / 2.0, uniform(0, 5)).ok());
    }
  }
  const SwarmSnapshot end = st.Snapshot();
  std::cout << "events " << kEvents << ": applies " << applies << " (clipped " << clipped
            << "), deaths " << deaths << ", leaves " << leaves << ", drifts " << drifts
            << ", evictions " << end.counters.evictions << ", rollbacks " << rollbacks
            << ", replays " << end.counters.replays << ", joins " << end.counters.joins
            << ", fences " << end.counters.fences << ", moves " << moves_seen << " of "
            << moves_started << " started, steps that waited for a trainer " << trainer_waits
            << "\n";
  EXPECT_GE(applies, 100);
  EXPECT_GT(moves_seen, 0);
  EXPECT_LE(moves_seen, moves_started);
  EXPECT_EQ(end.counters.moves, moves_seen);
  EXPECT_GT(clipped, 0);
  EXPECT_LT(clipped, applies);
  EXPECT_GT(deaths, 0);
  EXPECT_GT(leaves, 0);
  EXPECT_GT(drifts, 0);
  EXPECT_GT(rollbacks, 0);
  EXPECT_GT(replays_leased, 0);
  EXPECT_GT(trainer_waits, 0);
  EXPECT_EQ(end.counters.replays, replays_leased);
  EXPECT_EQ(end.counters.rollbacks, rollbacks);
}

}  // namespace
}  // namespace shoal::scheduler
