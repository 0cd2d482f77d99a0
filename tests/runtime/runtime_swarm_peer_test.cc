// Swarm peers over real gRPC on 127.0.0.1: three stages of two peer servers each, a trainer that
// picks peers with the stage router (parallel/swarm_router.h) and calls them with the stage
// client (comm/swarm_client.h), the step's exactly-once ledger (scheduler/swarm_ledger.h) that
// every peer commits its accumulations to, and the round at the step boundary over PeerGroups
// (comm/peer_group.h): a stage's two peers sum their gradients, the first and last stages sum the
// tied wte. The swarm's steps must be the single process's with grad_accum = M (the reference in
// swarm_reference.h), also when a peer is shut down mid-step: the trainer bans it, the ledger
// fences it, its micro-batches come back as replays needing only its stage, and the step still
// counts every micro-batch exactly once.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/peer_group.h"
#include "comm/swarm_client.h"
#include "parallel/demo.h"
#include "parallel/layout.h"
#include "parallel/swarm_router.h"
#include "runtime/swarm_peer.h"
#include "runtime/swarm_stage.h"
#include "runtime/swarm_sync.h"
#include "scheduler/swarm_ledger.h"
#include "tests/runtime/swarm_reference.h"

namespace shoal::runtime {
namespace {

using namespace swarm_test;  // NOLINT: the shared model, data and reference

constexpr char kToken[] = "swarm-test-token";
constexpr char kTrainer[] = "trainer-0";

struct Peer {
  int stage = 0;
  std::unique_ptr<SwarmStage> model;
  std::shared_ptr<comm::ExchangeMailbox> mailbox;
  std::unique_ptr<SwarmPeerServer> server;
  std::string address;
  bool alive = true;    // serving: its server is up
  bool fenced = false;  // the ledger knows it is gone
};

class SwarmOverGrpc {
 public:
  explicit SwarmOverGrpc(int peers_per_stage) {
    auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
    EXPECT_TRUE(blocks.ok());
    for (int s = 0; s < kStages; ++s) {
      const auto [first, end] = parallel::StageRange(*blocks, s);
      for (int p = 0; p < peers_per_stage; ++p) {
        auto peer = std::make_unique<Peer>();
        peer->stage = s;
        auto st = SwarmStage::Create(Model(), kSeed, s, kStages, first, end, Adam());
        EXPECT_TRUE(st.ok()) << st.status();
        peer->model = std::move(*st);
        peer->mailbox = std::make_shared<comm::ExchangeMailbox>();
        SwarmPeerOptions o;
        o.token = kToken;
        o.first_layer = first;
        o.end_layer = end;
        o.state_chunk_bytes = 4096;  // many chunks even for the tiny model
        Peer* raw = peer.get();
        o.commit = [this, raw](const v1::CallInfo& call, double) {
          return ledger_.Commit(call.trainer_id(), call.step() * kMicro + call.micro_batch(),
                                {{raw->stage, raw->address}});
        };
        auto server = SwarmPeerServer::Start(peer->model.get(), peer->mailbox, o);
        EXPECT_TRUE(server.ok()) << server.status();
        peer->server = std::move(*server);
        peer->address = peer->server->address();
        peers_.push_back(std::move(peer));
      }
    }
    comm::StageClientOptions co;
    co.token = kToken;
    co.forward_timeout = co.backward_timeout = absl::Seconds(60);
    auto client = comm::StageClient::Create(co);
    EXPECT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    for (int s = 0; s < kStages; ++s) {
      parallel::StageRouterOptions ro;
      ro.stage = s;
      ro.seed = 17 + s;
      auto router = parallel::StageRouter::Create(ro);
      EXPECT_TRUE(router.ok()) << router.status();
      routers_.push_back(std::move(*router));
    }
    ++roster_version_;
    UpdateRouters();
  }

  Peer& PeerAt(int stage, int index) {
    int seen = 0;
    for (auto& p : peers_) {
      if (p->stage == stage && seen++ == index) return *p;
    }
    ADD_FAILURE() << "no peer " << index << " of stage " << stage;
    return *peers_.front();
  }

  // Shuts a peer down as a crash would, without a goodbye: the trainer finds out by its calls.
  void Kill(Peer& p) {
    p.server->Shutdown();
    p.alive = false;
  }

  std::vector<std::string> Roster(int stage) const {
    std::vector<std::string> out;
    for (const auto& p : peers_) {
      if (p->stage == stage && p->alive) out.push_back(p->address);
    }
    return out;
  }

  // One step: open the ledger, drive every leased micro-batch, re-lease until the ledger closes,
  // the round, the update. `on_call(n)` runs before the trainer's n-th stage call (to kill a
  // peer mid-step). Returns the step's mean loss over the micro-batches counted at the last
  // stage.
  double Step(int64_t step, const std::function<void(int)>& on_call = nullptr) {
    // After a failed round the peers hold different steps and every later call would wait for a
    // step that never comes: the test ends with the failure it has.
    if (broken_) return std::nan("");
    std::vector<std::vector<std::string>> rosters;
    for (int s = 0; s < kStages; ++s) rosters.push_back(Roster(s));
    EXPECT_TRUE(ledger_.OpenStep(step, kMicro, rosters).ok());
    std::map<int64_t, double> loss;  // per micro-batch, from the accumulation the ledger kept
    int calls = 0;
    for (int round = 0; round < 20; ++round) {
      FenceTheDead();
      if (ledger_.Missing() == 0) break;
      auto leases = ledger_.Lease(kTrainer, kMicro);
      EXPECT_TRUE(leases.ok()) << leases.status();
      if (!leases.ok()) break;
      for (const scheduler::SwarmLease& lease : *leases) {
        const int i = static_cast<int>(lease.id - step * kMicro);
        absl::Status driven = Drive(step, i, lease.stages, on_call, &calls, &loss);
        if (!driven.ok()) EXPECT_TRUE(ledger_.Release(kTrainer, lease.id).ok());
      }
    }
    FenceTheDead();
    auto holdings = ledger_.Close();
    EXPECT_TRUE(holdings.ok()) << holdings.status();
    RunRound(step);
    double sum = 0;
    for (const auto& [i, l] : loss) sum += l;
    EXPECT_EQ(loss.size(), static_cast<size_t>(kMicro));
    return sum / kMicro;
  }

  scheduler::SwarmLedger& ledger() { return ledger_; }
  int64_t fenced() const { return fenced_; }

 private:
  // Picks a live peer of `stage` (`same` when it can serve, as the trainer sends a backward to
  // its forward's peer) and runs `call` on it, telling `*chosen_out`; a peer that cannot be
  // reached is banned and fenced, and the call goes to another one. Forward and the last stage's
  // call are stateless retries; a backward is retried elsewhere only after its first peer was
  // fenced, which is what happens here.
  template <typename Call>
  absl::StatusOr<comm::StageReply> OnSomePeer(int stage, Call call, int* calls,
                                              const std::function<void(int)>& on_call,
                                              const std::string& same = "",
                                              std::string* chosen_out = nullptr) {
    for (int attempt = 0; attempt < 4; ++attempt) {
      auto chosen = same.empty() ? routers_[stage]->Choose(1.0)
                                 : routers_[stage]->ChooseSame(same, 1.0);
      if (!chosen.ok()) return chosen.status();
      if (chosen_out != nullptr) *chosen_out = *chosen;
      if (on_call) on_call((*calls)++);
      absl::StatusOr<comm::StageReply> reply = call(*chosen);
      if (reply.ok()) {
        // Every call reported as taking the same time: the peers are equal, so the router
        // alternates between them and each one holds part of every step. (Measured times on a
        // loaded machine would let one peer take all the work; the router's own tests cover
        // weighting by measured throughput.)
        EXPECT_TRUE(routers_[stage]->Report(*chosen, 1.0, 0.01).ok());
        return reply;
      }
      if (!absl::IsUnavailable(reply.status())) return reply.status();
      EXPECT_TRUE(routers_[stage]->Ban(*chosen).ok());
      for (auto& p : peers_) {
        if (p->address == *chosen) p->alive = false;
      }
      FenceTheDead();
    }
    return absl::UnavailableError("no peer of the stage answered");
  }

  absl::Status Drive(int64_t step, int i, const std::vector<int>& stages,
                     const std::function<void(int)>& on_call, int* calls,
                     std::map<int64_t, double>* loss) {
    const Batch b = MicroBatchOf(step, i);
    auto needed = [&](int s) { return std::find(stages.begin(), stages.end(), s) != stages.end(); };
    std::vector<at::Tensor> inputs(kStages);
    std::vector<std::string> forward_peer(kStages);
    inputs[0] = b.tokens;
    for (int s = 0; s + 1 < kStages; ++s) {
      auto out = OnSomePeer(s, [&](const std::string& a) {
        return client_->Forward(a, {s, step, i, kTrainer}, inputs[s]);
      }, calls, on_call, "", &forward_peer[s]);
      if (!out.ok()) return out.status();
      inputs[s + 1] = out->tensor;
    }
    const int last = kStages - 1;
    auto tail = OnSomePeer(last, [&](const std::string& a) {
      return client_->ForwardBackward(a, {last, step, i, kTrainer}, inputs[last], b.targets,
                                      1.0 / kMicro, needed(last));
    }, calls, on_call);
    if (!tail.ok()) return tail.status();
    if (needed(last)) (*loss)[i] = tail->loss;
    else if (!loss->count(i)) (*loss)[i] = tail->loss;
    at::Tensor g = tail->tensor;
    for (int s = last - 1; s >= stages.front(); --s) {
      auto back = OnSomePeer(s, [&](const std::string& a) {
        return client_->Backward(a, {s, step, i, kTrainer}, inputs[s], g, needed(s));
      }, calls, on_call, forward_peer[s]);
      if (!back.ok()) return back.status();
      g = back->tensor;
    }
    return absl::OkStatus();
  }

  // The round: every live peer reduces over its stage's group and, on the first and the last
  // stage, over the tied group; all at once, as the peers' own threads would. Then one clip scale
  // from the stages' sums of squares, and the update everywhere.
  void RunRound(int64_t step) {
    std::vector<Peer*> live;
    for (auto& p : peers_) {
      if (p->alive) live.push_back(p.get());
    }
    std::vector<std::string> tied_roster = Roster(0);
    for (const std::string& a : Roster(kStages - 1)) tied_roster.push_back(a);
    std::vector<std::thread> threads;
    std::vector<absl::Status> results(live.size());
    for (size_t k = 0; k < live.size(); ++k) {
      threads.emplace_back([&, k] {
        Peer& p = *live[k];
        const std::vector<std::string> roster = Roster(p.stage);
        comm::PeerGroupOptions so;
        so.roster = roster;
        so.rank = static_cast<int>(std::find(roster.begin(), roster.end(), p.address) - roster.begin());
        so.group = absl::StrCat("stage", p.stage, ".step", step);
        so.token = kToken;
        auto stage_group = comm::PeerGroup::Create(so, p.mailbox);
        if (!stage_group.ok()) {
          results[k] = stage_group.status();
          return;
        }
        std::unique_ptr<comm::PeerGroup> tied;
        if (p.stage == 0 || p.stage == kStages - 1) {
          comm::PeerGroupOptions to = so;
          to.roster = tied_roster;
          to.rank = static_cast<int>(std::find(tied_roster.begin(), tied_roster.end(), p.address) -
                                     tied_roster.begin());
          to.group = absl::StrCat("tied.step", step);
          auto g = comm::PeerGroup::Create(to, p.mailbox);
          if (!g.ok()) {
            results[k] = g.status();
            return;
          }
          tied = std::move(*g);
        }
        results[k] = p.server->WithStage([&](SwarmStage& st) {
          return ReduceRound(st, stage_group->get(), tied.get());
        });
      });
    }
    for (auto& t : threads) t.join();
    // Every peer's result, not only the first failure: a peer that fails in its stage group
    // leaves its tied group unused, and the others' tied reductions then fail naming it.
    for (size_t k = 0; k < live.size(); ++k) {
      if (results[k].ok()) continue;
      ADD_FAILURE() << "stage " << live[k]->stage << " peer " << live[k]->address << ": "
                    << results[k];
      broken_ = true;
    }
    if (broken_) return;
    double sq = 0;
    for (int s = 0; s < kStages; ++s) {
      bool first = true;
      for (Peer* p : live) {
        if (p->stage != s) continue;
        if (first) sq += p->model->SumSquares();
        first = false;
      }
    }
    const double clip = parallel::ClipScale(std::sqrt(sq), kClip);
    for (Peer* p : live) {
      const absl::Status applied = p->server->WithStage([&](SwarmStage& st) {
        st.Apply(kLr, clip);
        return absl::OkStatus();
      });
      if (!applied.ok()) {
        ADD_FAILURE() << p->address << ": " << applied;
        broken_ = true;
      }
    }
  }

  // What the coordinator does when a peer's lease runs out or a trainer reports it unreachable:
  // fence it in the ledger (its accumulations become replays) and take it off the roster.
  void FenceTheDead() {
    bool changed = false;
    for (auto& p : peers_) {
      if (p->alive || p->fenced) continue;
      auto dropped = ledger_.FencePeer(p->address);
      EXPECT_TRUE(dropped.ok()) << dropped.status();
      p->fenced = true;
      ++fenced_;
      changed = true;
    }
    if (changed) {
      ++roster_version_;
      UpdateRouters();
    }
  }

  void UpdateRouters() {
    for (int s = 0; s < kStages; ++s) {
      EXPECT_TRUE(routers_[s]->SetRoster(roster_version_, Roster(s)).ok());
    }
  }

  std::vector<std::unique_ptr<Peer>> peers_;
  std::unique_ptr<comm::StageClient> client_;
  std::vector<std::unique_ptr<parallel::StageRouter>> routers_;
  uint64_t roster_version_ = 0;
  scheduler::SwarmLedger ledger_;
  int64_t fenced_ = 0;
  bool broken_ = false;  // a round failed on some peer
};

void ExpectSameParameters(SwarmOverGrpc& swarm, Reference& ref, int steps) {
  std::map<std::string, at::Tensor> want;
  for (const auto& [name, t] : ref.model->NamedParameters()) want[name] = t;
  for (int s = 0; s < kStages; ++s) {
    for (const auto& [name, t] : swarm.PeerAt(s, 0).model->NamedParameters()) {
      ASSERT_TRUE(want.count(name)) << name;
      // In units of lr per step (see the stage test): AdamW magnifies summation-order bits.
      EXPECT_LT(MaxAbsDiff(t, want[name]), 0.01 * kLr * steps) << "stage " << s << " " << name;
    }
  }
}

TEST(SwarmPeerTest, StepsOverGrpcEqualOneProcessWithGradAccum) {
  SwarmOverGrpc swarm(/*peers_per_stage=*/2);
  Reference ref;
  for (int64_t step = 0; step < 3; ++step) {
    const double loss = swarm.Step(step);
    const double want = ref.Accumulate(step);
    ref.Update();
    EXPECT_NEAR(loss, want, 1e-5 * std::max(1.0, std::abs(want))) << "step " << step;
    for (int s = 0; s < kStages; ++s) {
      EXPECT_EQ(swarm.PeerAt(s, 0).model->ParamHash(), swarm.PeerAt(s, 1).model->ParamHash())
          << "stage " << s << " after step " << step;
    }
  }
  ExpectSameParameters(swarm, ref, 3);
  const scheduler::SwarmLedgerCounters c = swarm.ledger().counters();
  EXPECT_EQ(c.duplicates_refused, 0);
  EXPECT_EQ(c.lost, 0);
  EXPECT_EQ(c.replays, 0);
}

TEST(SwarmPeerTest, APeerKilledMidStepIsFencedAndItsMicroBatchesReplayed) {
  SwarmOverGrpc swarm(/*peers_per_stage=*/2);
  Reference ref;
  // Step 0 runs on every peer; in step 1, stage 1's second peer dies at the first of the
  // trainer's calls from the 10th on at which it holds an accumulation (the trainer waits for
  // each reply, so nothing computes while this looks).
  double loss = swarm.Step(0);
  double want = ref.Accumulate(0);
  ref.Update();
  EXPECT_NEAR(loss, want, 1e-5 * std::max(1.0, std::abs(want)));
  Peer& victim = swarm.PeerAt(1, 1);
  loss = swarm.Step(1, [&](int n) {
    if (n >= 10 && victim.alive && victim.model->kept_micro_batches() >= 1) swarm.Kill(victim);
  });
  want = ref.Accumulate(1);
  ref.Update();
  EXPECT_NEAR(loss, want, 1e-5 * std::max(1.0, std::abs(want)));
  EXPECT_FALSE(victim.alive);
  EXPECT_EQ(swarm.fenced(), 1);
  const scheduler::SwarmLedgerCounters c = swarm.ledger().counters();
  EXPECT_EQ(c.fences, 1);
  EXPECT_EQ(c.duplicates_refused, 0);
  EXPECT_EQ(c.lost, 0);
  // Whatever the dead peer held at stage 1 was replayed.
  EXPECT_GE(c.accumulations_fenced, 1);
  EXPECT_EQ(c.replays, c.accumulations_fenced);
  std::printf("swarm peer killed mid-step: fenced %lld accumulation(s), %lld replay(s), "
              "%lld duplicate(s), %lld lost; step 1 loss %.9f, one process %.9f\n",
              static_cast<long long>(c.accumulations_fenced), static_cast<long long>(c.replays),
              static_cast<long long>(c.duplicates_refused), static_cast<long long>(c.lost), loss,
              want);
  ExpectSameParameters(swarm, ref, 2);
}

TEST(SwarmPeerTest, RefusesCallsWithoutTheTokenOrForAnotherStage) {
  SwarmOverGrpc swarm(/*peers_per_stage=*/1);
  const Batch b = MicroBatchOf(0, 0);
  comm::StageClientOptions co;
  co.token = "wrong";
  auto stranger = comm::StageClient::Create(co);
  ASSERT_TRUE(stranger.ok());
  auto refused = (*stranger)->Forward(swarm.PeerAt(0, 0).address, {0, 0, 0, kTrainer}, b.tokens);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated) << refused.status();
  co.token = kToken;
  auto client = comm::StageClient::Create(co);
  ASSERT_TRUE(client.ok());
  auto wrong_stage = (*client)->Forward(swarm.PeerAt(0, 0).address, {1, 0, 0, kTrainer}, b.tokens);
  EXPECT_EQ(wrong_stage.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong_stage.status().message().find("stage 1"), std::string::npos)
      << wrong_stage.status();
  auto bad_ids = (*client)->Forward(swarm.PeerAt(0, 0).address, {0, 0, 0, kTrainer},
                                    at::full({kB, kT}, 999, at::kLong));
  EXPECT_EQ(bad_ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_ids.status().message().find("vocabulary"), std::string::npos) << bad_ids.status();
  auto no_trainer = (*client)->Forward(swarm.PeerAt(0, 0).address, {0, 0, 0, ""}, b.tokens);
  EXPECT_EQ(no_trainer.status().code(), absl::StatusCode::kInvalidArgument);
}

// A joiner of stage 1, built from another seed so that only a copy makes it the donor's.
std::unique_ptr<SwarmStage> StageOneJoiner() {
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
  EXPECT_TRUE(blocks.ok());
  const auto [first, end] = parallel::StageRange(*blocks, 1);
  auto joiner = SwarmStage::Create(Model(), /*seed=*/999, 1, kStages, first, end, Adam());
  EXPECT_TRUE(joiner.ok()) << joiner.status();
  return joiner.ok() ? std::move(*joiner) : nullptr;
}

TEST(SwarmPeerTest, AJoinerCopiesADonorsStageStateOverGrpc) {
  SwarmOverGrpc swarm(/*peers_per_stage=*/1);
  swarm.Step(0);
  Peer& donor = swarm.PeerAt(1, 0);
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
  ASSERT_TRUE(blocks.ok());
  const auto [first, end] = parallel::StageRange(*blocks, 1);
  std::unique_ptr<SwarmStage> joiner = StageOneJoiner();
  ASSERT_NE(joiner, nullptr);
  FetchOptions fo;
  fo.token = kToken;
  auto snap = FetchStageState(donor.address, 1, -1, fo);
  ASSERT_TRUE(snap.ok()) << snap.status();
  EXPECT_EQ(snap->manifest.step(), 1);
  EXPECT_EQ(snap->manifest.first_layer(), first);
  EXPECT_EQ(snap->manifest.end_layer(), end);
  EXPECT_GT(snap->manifest.total_bytes(), 3 * 4096);  // it came in several chunks

  // A manifest that does not match its bytes is refused and changes nothing.
  StageSnapshot bad = *snap;
  bad.manifest.mutable_entries(1)->set_bytes(bad.manifest.entries(1).bytes() - 4);
  const uint32_t before = joiner->ParamHash();
  auto refused = LoadSnapshot(*joiner, bad);
  EXPECT_EQ(refused.code(), absl::StatusCode::kDataLoss) << refused;
  EXPECT_EQ(joiner->ParamHash(), before);

  ASSERT_TRUE(LoadSnapshot(*joiner, *snap).ok());
  EXPECT_EQ(joiner->ParamHash(), donor.model->ParamHash());
  EXPECT_EQ(joiner->optimizer_steps(), 1);
  const auto want = donor.model->OptimizerState();
  const auto got = joiner->OptimizerState();
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(want[i].first, got[i].first);
    EXPECT_TRUE(at::equal(want[i].second, got[i].second)) << want[i].first;
  }

  // Refusals, each named.
  auto other_stage = FetchStageState(donor.address, 2, -1, fo);
  EXPECT_EQ(other_stage.status().code(), absl::StatusCode::kFailedPrecondition);
  auto old_step = FetchStageState(donor.address, 1, 0, fo);
  EXPECT_EQ(old_step.status().code(), absl::StatusCode::kNotFound) << old_step.status();
  FetchOptions stranger = fo;
  stranger.token = "wrong";
  auto unauthenticated = FetchStageState(donor.address, 1, -1, stranger);
  EXPECT_EQ(unauthenticated.status().code(), absl::StatusCode::kUnauthenticated);
}

// The catch-up log: a joiner whose snapshot the swarm has moved past takes the missed steps from
// a donor's log over gRPC and ends bit-equal to it (parameters and AdamW moments); the log
// answers nothing past its newest step, OUT_OF_RANGE before its oldest; an update for another
// layout or out of turn is refused.
TEST(SwarmPeerTest, AJoinerTakesTheStepsItMissedFromADonorsLogBitForBit) {
  SwarmOverGrpc swarm(/*peers_per_stage=*/1);
  swarm.Step(0);
  Peer& donor = swarm.PeerAt(1, 0);
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
  ASSERT_TRUE(blocks.ok());
  std::unique_ptr<SwarmStage> joiner = StageOneJoiner();
  ASSERT_NE(joiner, nullptr);
  FetchOptions fo;
  fo.token = kToken;
  auto snap = FetchStageState(donor.address, 1, -1, fo);
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_TRUE(LoadSnapshot(*joiner, *snap).ok());
  ASSERT_EQ(joiner->optimizer_steps(), 1);
  swarm.Step(1);
  swarm.Step(2);
  ASSERT_EQ(donor.model->optimizer_steps(), 3);
  ASSERT_NE(joiner->ParamHash(), donor.model->ParamHash());

  auto got = FetchUpdates(donor.address, 1, 2, 0, fo);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 2u);
  EXPECT_EQ((*got)[0].header.step(), 2);
  EXPECT_EQ((*got)[1].header.step(), 3);
  // Out of turn: step 3 before step 2.
  auto third = DecodeUpdate(*joiner, (*got)[1]);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(joiner->ApplyUpdate(*third).code(), absl::StatusCode::kFailedPrecondition);
  // Another stage's layout.
  const auto [first2, end2] = parallel::StageRange(*blocks, 2);
  auto stage2 = SwarmStage::Create(Model(), kSeed, 2, kStages, first2, end2, Adam());
  ASSERT_TRUE(stage2.ok());
  EXPECT_EQ(DecodeUpdate(**stage2, (*got)[0]).status().code(), absl::StatusCode::kDataLoss);
  for (const EncodedUpdate& e : *got) {
    auto u = DecodeUpdate(*joiner, e);
    ASSERT_TRUE(u.ok()) << u.status();
    ASSERT_TRUE(joiner->ApplyUpdate(*u).ok());
  }
  EXPECT_EQ(joiner->optimizer_steps(), 3);
  EXPECT_EQ(joiner->ParamHash(), donor.model->ParamHash());
  const auto want = donor.model->OptimizerState();
  const auto have = joiner->OptimizerState();
  ASSERT_EQ(want.size(), have.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(at::equal(want[i].second, have[i].second)) << want[i].first;
  }
  // The joiner's own log now serves the same steps.
  auto again = joiner->UpdatesFrom(2, 3);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->size(), 2u);

  auto none = FetchUpdates(donor.address, 1, 4, 0, fo);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  // Four steps are kept: after three more, step 2 is gone.
  for (int64_t k = 3; k < 6; ++k) swarm.Step(k);
  auto gone = FetchUpdates(donor.address, 1, 2, 0, fo);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kOutOfRange) << gone.status();
  auto kept = FetchUpdates(donor.address, 1, 3, 4, fo);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->size(), 2u);
  FetchOptions stranger = fo;
  stranger.token = "wrong";
  EXPECT_EQ(FetchUpdates(donor.address, 1, 3, 0, stranger).status().code(),
            absl::StatusCode::kUnauthenticated);
}

// DeMo's log: every peer's payloads with the step's lr. A stage replaying them from the same
// state moves its parameters bit for bit as the peer did (its own residual stays zero).
TEST(SwarmPeerTest, ADemoStagesLogReplaysBitForBit) {
  parallel::DemoOptions demo;
  demo.codec.chunk = 8;
  demo.codec.topk = 4;
  demo.codec.wire_dtype = at::kFloat;
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
  ASSERT_TRUE(blocks.ok());
  auto make = [&]() {
    SwarmStageOptions o;
    o.demo = demo;
    return SwarmStage::Create(Model(), kSeed, 0, kStages, parallel::StageRange(*blocks, 0).first,
                              parallel::StageRange(*blocks, 0).second, Adam(), o);
  };
  auto peer = make();
  auto made = make();
  ASSERT_TRUE(peer.ok() && made.ok());
  std::unique_ptr<SwarmStage> joiner = std::move(*made);
  for (int64_t step = 0; step < 2; ++step) {
    const Batch b = MicroBatchOf(step, 0);
    auto y = (*peer)->Forward({step, 0}, b.tokens);
    ASSERT_TRUE(y.ok()) << y.status();
    auto g = (*peer)->Backward({step, 0}, b.tokens, at::ones_like(*y), 0.5f, true);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE((*peer)->Settle({step, 0}, true).ok());
    auto out = (*peer)->DemoCompress(kLr, 1, 2, kClip);
    ASSERT_TRUE(out.ok()) << out.status();
    // The tied group's other payload: a last-stage peer's, here a copy of this one's.
    ASSERT_TRUE((*peer)->DemoApply({out->own}, {out->tied, out->tied}, kLr).ok());
  }
  auto log = (*peer)->UpdatesFrom(1, 0);
  ASSERT_TRUE(log.ok()) << log.status();
  ASSERT_EQ(log->size(), 2u);
  for (const StepUpdate& u : *log) {
    auto back = DecodeUpdate(*joiner, EncodeUpdate(u));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->tied_payloads.size(), 2u);
    ASSERT_TRUE(joiner->ApplyUpdate(*back).ok());
  }
  EXPECT_EQ(joiner->ParamHash(), (*peer)->ParamHash());
  EXPECT_EQ(joiner->optimizer_steps(), 2);
  // An AdamW stage refuses DeMo's updates, by kind.
  auto adam = SwarmStage::Create(Model(), kSeed, 0, kStages, parallel::StageRange(*blocks, 0).first,
                                 parallel::StageRange(*blocks, 0).second, Adam());
  ASSERT_TRUE(adam.ok());
  EXPECT_EQ(DecodeUpdate(**adam, EncodeUpdate((*log)[0])).status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace shoal::runtime
