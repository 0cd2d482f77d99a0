#include "scheduler/swarm_state.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "scheduler/swarm_policy.h"

namespace shoal::scheduler {

namespace {

// Removed trainers kept in the status (oldest forgotten first): enough to see recent deaths,
// bounded for a swarm that runs for weeks.
constexpr size_t kKeptDeadTrainers = 64;

// parallel::ClipScale's epsilon (torch.nn.utils.clip_grad_norm_'s).
constexpr double kClipEpsilon = 1e-6;

std::string Hex(uint64_t h) { return absl::StrCat("0x", absl::Hex(h)); }

std::string Quoted(const std::vector<std::string>& ids) {
  std::vector<std::string> q;
  q.reserve(ids.size());
  for (const std::string& id : ids) q.push_back(absl::StrCat("'", id, "'"));
  return absl::StrJoin(q, ", ");
}

// The first difference between two ascending id lists, for a refusal's message.
std::string IdsDifference(const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  auto repeated = std::adjacent_find(got.begin(), got.end());
  if (repeated != got.end()) return absl::StrCat("id ", *repeated, " is repeated");
  std::vector<int64_t> extra, missing;
  std::set_difference(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(extra));
  std::set_difference(want.begin(), want.end(), got.begin(), got.end(),
                      std::back_inserter(missing));
  std::vector<std::string> parts;
  if (!extra.empty()) parts.push_back(absl::StrCat("not in its plan: ", absl::StrJoin(extra, ", ")));
  if (!missing.empty()) {
    parts.push_back(absl::StrCat("missing from the report: ", absl::StrJoin(missing, ", ")));
  }
  return absl::StrJoin(parts, "; ");
}

SwarmLedgerCounters Sum(const SwarmLedgerCounters& a, const SwarmLedgerCounters& b) {
  SwarmLedgerCounters c;
  c.leases = a.leases + b.leases;
  c.replays = a.replays + b.replays;
  c.commits = a.commits + b.commits;
  c.accumulations = a.accumulations + b.accumulations;
  c.duplicates_refused = a.duplicates_refused + b.duplicates_refused;
  c.commits_refused = a.commits_refused + b.commits_refused;
  c.fences = a.fences + b.fences;
  c.accumulations_fenced = a.accumulations_fenced + b.accumulations_fenced;
  c.released = a.released + b.released;
  c.lost = b.lost;  // the current round's only
  return c;
}

}  // namespace

const char* SwarmPeerStateName(SwarmPeerState s) {
  switch (s) {
    case SwarmPeerState::kSyncing: return "SYNCING";
    case SwarmPeerState::kServing: return "SERVING";
    case SwarmPeerState::kDraining: return "DRAINING";
  }
  return "?";
}

const char* SwarmSyncSourceName(SwarmSyncSource s) {
  switch (s) {
    case SwarmSyncSource::kDonor: return "donor";
    case SwarmSyncSource::kWaitForDonor: return "waiting for a donor";
    case SwarmSyncSource::kCheckpoint: return "checkpoint";
    case SwarmSyncSource::kInit: return "init";
  }
  return "?";
}

const char* SwarmStagePhaseName(SwarmStagePhase p) {
  switch (p) {
    case SwarmStagePhase::kCollecting: return "collecting";
    case SwarmStagePhase::kReducing: return "reducing";
    case SwarmStagePhase::kAgreed: return "agreed";
  }
  return "?";
}

// Everything below runs under SwarmState::mu_.
struct SwarmState::Impl {
  struct Peer {
    std::string id;
    std::string address;
    int stage = 0;
    int64_t seq = 0;  // seniority: order of joining
    SwarmPeerState state = SwarmPeerState::kSyncing;
    double throughput = 0;
    bool throughput_reported = false;
    int64_t queue_length = 0;
    int64_t free_bytes = 0;       // the memory it joined with
    double link_bytes_per_s = 0;  // its measured link (0: unknown)
    int drifts = 0;
    int moving_to = -1;           // DRAINING for a move: the stage it goes to
    int64_t moved_at_period = -1;  // the rebalancer's period of its last move
    // Syncing: where from, and what it claimed.
    SwarmSyncSource source = SwarmSyncSource::kWaitForDonor;
    std::string donor;
    int64_t source_step = 0;
    std::map<std::string, int> donor_failures;
    bool synced = false;
    int64_t synced_step = -1;
    uint64_t synced_hash = 0;
    bool verified = false;
    uint64_t last_donated = 0;  // tick of the last time it was chosen as a donor
    // A live, unfenced member of the open round (this incarnation: a peer that rejoins under
    // the same id is a new record and starts outside the round).
    bool in_round = false;
  };

  enum class Membership { kLive, kFenced, kGone };
  struct Member {
    std::string id;
    Membership membership = Membership::kLive;
    int64_t held = 0;  // (stage, id) records the ledger holds for it
  };
  struct Report {
    std::vector<int64_t> ids;  // ascending
    double sum_squares = 0;
    uint64_t hash = 0;
  };
  struct StageRound {
    std::vector<Member> members;  // the round roster, by seniority
    int64_t held = 0;             // micro-batches held at this stage
    SwarmStagePhase phase = SwarmStagePhase::kCollecting;
    uint64_t plan = 0;
    std::vector<std::string> plan_peers;
    std::map<std::string, std::vector<int64_t>> plan_ids;
    std::map<std::string, Report> reports;
    double sum_squares = 0;  // agreed
    uint64_t hash = 0;       // agreed
  };

  SwarmJob job;
  SwarmStateOptions options;
  std::unique_ptr<SwarmLedger> ledger;
  SwarmLedgerCounters ledger_base;  // rounds dropped by rollbacks
  std::map<std::string, Peer> peers;
  std::map<std::string, bool> trainers;  // id -> alive
  std::deque<std::string> dead_trainers;  // removed ones, oldest first
  int64_t seq = 0;
  uint64_t version = 1;
  uint64_t plans = 0;
  uint64_t tick = 0;
  int64_t next_step = 0;
  int64_t checkpoint_step = -1;
  bool open = false;
  double round_lr = 0;
  std::vector<StageRound> round;
  // Per stage: the step whose state's hash the stage last agreed on, and the hash.
  std::vector<std::optional<std::pair<int64_t, uint64_t>>> stage_hash;
  std::optional<SwarmRollback> rollback;
  std::string waiting;
  std::map<int64_t, SwarmApply> decisions;
  SwarmCounters counters;
  std::unique_ptr<SwarmRebalancer> rebalancer;
  int64_t period = -1;  // the newest Rebalance check's

  void Bump() { ++version; }

  // --- Peers and donors ------------------------------------------------------------------------

  static bool Holds(const Peer& p) {
    return p.state == SwarmPeerState::kServing || p.state == SwarmPeerState::kDraining;
  }
  static bool Unsynced(const Peer& p) { return p.state == SwarmPeerState::kSyncing && !p.synced; }

  Peer* Find(const std::string& id) {
    auto it = peers.find(id);
    return it == peers.end() ? nullptr : &it->second;
  }

  // A stage's peers by seniority.
  std::vector<Peer*> StagePeers(int stage) {
    std::vector<Peer*> out;
    for (auto& [id, p] : peers) {
      if (p.stage == stage) out.push_back(&p);
    }
    std::sort(out.begin(), out.end(), [](const Peer* a, const Peer* b) { return a->seq < b->seq; });
    return out;
  }
  std::vector<Peer*> AllBySeniority() {
    std::vector<Peer*> out;
    for (auto& [id, p] : peers) out.push_back(&p);
    std::sort(out.begin(), out.end(), [](const Peer* a, const Peer* b) { return a->seq < b->seq; });
    return out;
  }

  // Donor -> joiners syncing from it now.
  std::map<std::string, int> Loads() const {
    std::map<std::string, int> out;
    for (const auto& [id, p] : peers) {
      if (Unsynced(p) && p.source == SwarmSyncSource::kDonor) ++out[p.donor];
    }
    return out;
  }

  int64_t FallbackStep() const { return checkpoint_step >= 0 ? checkpoint_step : 0; }
  SwarmSyncSource FallbackKind() const {
    return checkpoint_step >= 0 ? SwarmSyncSource::kCheckpoint : SwarmSyncSource::kInit;
  }
  // Where a stage nobody holds can get its newest state without a peer: during a rollback, its
  // target; else the newest checkpoint if it is the newest state, or init before step 0.
  bool FallbackAvailable() const {
    return rollback.has_value() || checkpoint_step == next_step ||
           (checkpoint_step < 0 && next_step == 0);
  }

  void AssignSource(Peer& j) {
    j.donor.clear();
    if (rollback.has_value()) {
      j.source = FallbackKind();
      j.source_step = FallbackStep();
      return;
    }
    std::vector<Peer*> serving, draining;
    for (Peer* c : StagePeers(j.stage)) {
      if (c == &j) continue;
      if (c->state == SwarmPeerState::kServing) serving.push_back(c);
      if (c->state == SwarmPeerState::kDraining) draining.push_back(c);
    }
    const std::vector<Peer*>& candidates = serving.empty() ? draining : serving;
    if (candidates.empty()) {
      if (FallbackAvailable()) {
        j.source = FallbackKind();
        j.source_step = FallbackStep();
      } else {
        j.source = SwarmSyncSource::kWaitForDonor;  // a rollback is pending or about to be
      }
      return;
    }
    const std::map<std::string, int> loads = Loads();
    Peer* best = nullptr;
    std::tuple<int, int, uint64_t, int64_t> best_key;
    for (Peer* c : candidates) {
      auto l = loads.find(c->id);
      const int load = l == loads.end() ? 0 : l->second;
      if (load >= options.max_joiners_per_donor) continue;
      auto f = j.donor_failures.find(c->id);
      const std::tuple<int, int, uint64_t, int64_t> key{
          f == j.donor_failures.end() ? 0 : f->second, load, c->last_donated, c->seq};
      if (best == nullptr || key < best_key) {
        best = c;
        best_key = key;
      }
    }
    if (best == nullptr) {
      j.source = SwarmSyncSource::kWaitForDonor;
      return;
    }
    j.source = SwarmSyncSource::kDonor;
    j.donor = best->id;
    j.source_step = next_step;
    best->last_donated = ++tick;
  }

  bool SourceValid(const Peer& j) {
    switch (j.source) {
      case SwarmSyncSource::kDonor: {
        if (rollback.has_value() || j.source_step != next_step) return false;
        const Peer* d = Find(j.donor);
        return d != nullptr && d->stage == j.stage && Holds(*d);
      }
      case SwarmSyncSource::kCheckpoint:
      case SwarmSyncSource::kInit:
        // Still the newest state's (a donor at the same state would be no better).
        return FallbackAvailable() && j.source == FallbackKind() &&
               j.source_step == FallbackStep();
      case SwarmSyncSource::kWaitForDonor:
        return false;
    }
    return false;
  }

  // Gives every unsynced joiner whose source no longer holds (donor gone, state moved on, a
  // donor freed up for a waiting one) a new one, by seniority.
  void Reassign() {
    for (Peer* p : AllBySeniority()) {
      if (Unsynced(*p) && !SourceValid(*p)) AssignSource(*p);
    }
  }

  SwarmJoin JoinOf(const Peer& p) {
    SwarmJoin out;
    out.stage = p.stage;
    out.source = p.source;
    out.step = p.source == SwarmSyncSource::kWaitForDonor ? next_step : p.source_step;
    if (p.source == SwarmSyncSource::kDonor) {
      out.donor = p.donor;
      if (const Peer* d = Find(p.donor)) out.donor_address = d->address;
    }
    return out;
  }

  // A synced joiner may enter the round that opens now: its state is the newest, or one step
  // behind and checked (it catches up with that step's decision).
  bool Promotable(const Peer& p) const {
    return p.state == SwarmPeerState::kSyncing && p.synced &&
           (p.synced_step == next_step || (p.synced_step == next_step - 1 && p.verified));
  }

  // A promotable joiner becomes SERVING.
  static void Promote(Peer& p) {
    p.state = SwarmPeerState::kServing;
    p.synced = false;
    p.donor.clear();
    p.donor_failures.clear();
  }

  // --- Rounds ----------------------------------------------------------------------------------

  Member* FindMember(int stage, const std::string& id) {
    for (Member& m : round[stage].members) {
      if (m.id == id && m.membership == Membership::kLive) return &m;
    }
    return nullptr;
  }

  // Fences a live member in the ledger: its records are needed again. Returns how many.
  absl::StatusOr<int64_t> Fence(int stage, const std::string& id) {
    Member* m = FindMember(stage, id);
    if (m == nullptr) {
      return absl::InternalError(
          absl::StrCat("swarm state: peer '", id, "' is not a live member of stage ", stage));
    }
    absl::StatusOr<int64_t> dropped = ledger->FencePeer(id);
    if (!dropped.ok()) {
      return absl::InternalError(absl::StrCat("swarm state: the ledger refused to fence peer '",
                                              id, "': ", dropped.status().message()));
    }
    if (*dropped != m->held) {
      return absl::InternalError(absl::StrCat("swarm state: peer '", id, "' held ", m->held,
                                              " micro-batches, the ledger dropped ", *dropped));
    }
    round[stage].held -= m->held;
    m->held = 0;
    m->membership = Membership::kFenced;
    if (Peer* p = Find(id)) p->in_round = false;
    return *dropped;
  }

  // A stage whose records or live members changed before it agreed: a new plan if every
  // micro-batch is held, else back to collecting. Reports of the old plan are void.
  absl::Status Replan(int stage) {
    StageRound& r = round[stage];
    if (r.phase == SwarmStagePhase::kAgreed) return absl::OkStatus();
    r.reports.clear();
    r.plan_peers.clear();
    r.plan_ids.clear();
    if (r.held < job.micro_batches) {
      r.phase = SwarmStagePhase::kCollecting;
      r.plan = 0;
      return absl::OkStatus();
    }
    r.phase = SwarmStagePhase::kReducing;
    r.plan = ++plans;
    for (const Member& m : r.members) {
      if (m.membership != Membership::kLive) continue;
      r.plan_peers.push_back(m.id);
      r.plan_ids[m.id];
    }
    const int64_t first = next_step * job.micro_batches;
    for (int i = 0; i < job.micro_batches; ++i) {
      std::optional<std::string> holder = ledger->Holder(stage, first + i);
      auto it = holder ? r.plan_ids.find(*holder) : r.plan_ids.end();
      if (it == r.plan_ids.end()) {
        return absl::InternalError(absl::StrCat("swarm state: stage ", stage, " counts ", r.held,
                                                " held micro-batches but id ", first + i,
                                                " has no live holder"));
      }
      it->second.push_back(first + i);
    }
    return absl::OkStatus();
  }

  // A draining peer whose leaving loses nothing: another peer serves its stage, nobody syncs
  // from it, and its round is agreed or it holds nothing of it.
  bool DrainDone(const Peer& p) {
    if (p.state != SwarmPeerState::kDraining) return false;
    bool serving = false;
    for (Peer* c : StagePeers(p.stage)) serving = serving || c->state == SwarmPeerState::kServing;
    const std::map<std::string, int> loads = Loads();
    if (!serving || loads.count(p.id) != 0) return false;
    const Member* m = open && p.in_round ? FindMember(p.stage, p.id) : nullptr;
    if (m == nullptr) return true;
    const StageRound& r = round[p.stage];
    return r.phase == SwarmStagePhase::kAgreed ||
           (r.phase == SwarmStagePhase::kCollecting && m->held == 0);
  }

  // A serving peer starts its move to stage `to` (checked by the caller).
  void StartMove(Peer& p, int to) {
    p.state = SwarmPeerState::kDraining;
    p.moving_to = to;
    p.moved_at_period = period;
    Bump();
    Settle();
  }

  // Moving peers whose old stage no longer needs them: out of its round, joiners of the new one.
  void CompleteMoves() {
    for (Peer* p : AllBySeniority()) {
      if (p->moving_to < 0 || !DrainDone(*p)) continue;
      if (p->in_round) {
        if (round[p->stage].phase == SwarmStagePhase::kAgreed) {
          // Its micro-batches are in the reduced gradient its stage's other peers hold.
          if (Member* m = FindMember(p->stage, p->id)) m->membership = Membership::kGone;
        } else if (!Fence(p->stage, p->id).ok() || !Replan(p->stage).ok()) {
          continue;  // the records disagree (a bug): it stays where it is
        }
        p->in_round = false;
      }
      p->stage = p->moving_to;
      p->moving_to = -1;
      // Its old stage's rate says nothing of the new one's (the peer clears its report too).
      p->throughput = 0;
      p->throughput_reported = false;
      p->state = SwarmPeerState::kSyncing;
      p->synced = false;
      p->verified = false;
      p->donor_failures.clear();
      p->seq = ++seq;
      AssignSource(*p);
      ++counters.moves;
      Bump();
    }
  }

  // Sets the pending rollback if a stage has lost every peer holding its newest state while
  // that state cannot be had otherwise (a round is open, or it is no checkpoint's nor init's).
  void CheckLost() {
    if (rollback.has_value()) return;
    for (int s = 0; s < job.stages; ++s) {
      bool held = false;
      for (Peer* p : StagePeers(s)) held = held || Holds(*p);
      if (held) continue;
      if (!open && FallbackAvailable()) continue;
      SwarmRollback rb;
      rb.stage = s;
      rb.from_step = next_step;
      rb.to_step = FallbackStep();
      rb.source = FallbackKind();
      rb.reason = absl::StrCat("stage ", s, " has no peer left holding its state at step ",
                               next_step, open ? " (the round in progress is lost)" : "");
      rollback = rb;
      Bump();
      return;
    }
  }

  // Opens next_step if it can, else says why in `waiting`.
  void TryOpen() {
    waiting.clear();
    if (open || rollback.has_value()) return;
    std::vector<std::string> lacking;
    std::vector<std::vector<std::string>> rosters(job.stages);
    for (int s = 0; s < job.stages; ++s) {
      bool serving = false;
      for (Peer* p : StagePeers(s)) {
        const bool promoted = Promotable(*p);
        serving = serving || promoted || p->state == SwarmPeerState::kServing;
        if (promoted || Holds(*p)) rosters[s].push_back(p->id);
      }
      if (!serving) lacking.push_back(absl::StrCat(s));
    }
    if (!lacking.empty()) {
      waiting = absl::StrCat("step ", next_step, " waits for a serving peer at stage",
                             lacking.size() > 1 ? "s " : " ", absl::StrJoin(lacking, ", "));
      return;
    }
    // A round's peers are fixed when it opens, so one opened before any trainer can feed it
    // would leave the peers that sync meanwhile (a job's peers start together) out of it for the
    // whole step. Meanwhile the joiners at the newest state serve (and donate) already.
    if (std::none_of(trainers.begin(), trainers.end(),
                     [](const auto& t) { return t.second; })) {
      bool promoted = false;
      for (auto& [id, p] : peers) {
        if (Promotable(p) && p.synced_step == next_step) {
          Promote(p);
          promoted = true;
        }
      }
      if (promoted) Bump();
      waiting = absl::StrCat("step ", next_step, " waits for a trainer");
      return;
    }
    const double lr = options.learning_rate(next_step);
    if (!std::isfinite(lr) || lr < 0) {
      waiting = absl::StrCat("step ", next_step, ": the learning-rate schedule gives ", lr,
                             " (must be finite and >= 0)");
      return;
    }
    if (absl::Status s = ledger->OpenStep(next_step, job.micro_batches, rosters); !s.ok()) {
      waiting = absl::StrCat("step ", next_step, " cannot open: ", s.message());
      return;
    }
    round.assign(job.stages, StageRound{});
    for (int s = 0; s < job.stages; ++s) {
      for (const std::string& id : rosters[s]) {
        Peer& p = peers.at(id);
        if (p.state == SwarmPeerState::kSyncing) Promote(p);
        p.in_round = true;
        round[s].members.push_back(Member{id});
      }
    }
    open = true;
    round_lr = lr;
    Bump();
  }

  // After every change: finished moves, lost stages, the next round, then every joiner's source.
  void Settle() {
    CompleteMoves();
    CheckLost();
    TryOpen();
    Reassign();  // after the round opens: its new serving peers are donors too
  }

  // A round peer whose report disagreed with its stage's: fenced, then syncing again or gone.
  absl::Status Drift(int stage, const std::string& id, const Report& mine, const Report& agreed,
                     size_t agreeing, SwarmReportOutcome* outcome) {
    Peer& p = peers.at(id);
    ++p.drifts;
    ++counters.drifts;
    absl::StatusOr<int64_t> dropped = Fence(stage, id);
    if (!dropped.ok()) return dropped.status();
    const bool evict = p.drifts >= options.max_drifts || p.state == SwarmPeerState::kDraining;
    SwarmDrift d;
    d.peer = id;
    d.stage = stage;
    d.drifts = p.drifts;
    d.evicted = evict;
    d.message = absl::StrCat(
        "peer '", id, "' of stage ", stage, " reported state ", next_step, " with hash ",
        Hex(mine.hash), " and sum of squares ", mine.sum_squares, "; ", agreeing,
        " other peer", agreeing == 1 ? "" : "s", " of the stage agree on ", Hex(agreed.hash),
        " and ", agreed.sum_squares, ": drift ", p.drifts, " of ", options.max_drifts,
        evict ? (p.state == SwarmPeerState::kDraining ? ", it was draining: removed"
                                                       : ", evicted")
              : ", fenced, syncing again");
    if (evict) {
      ++counters.evictions;
      peers.erase(id);
    } else {
      // Its donor is chosen once every dissenter is out of the stage's serving peers.
      p.state = SwarmPeerState::kSyncing;
      p.synced = false;
      p.verified = false;
      p.source = SwarmSyncSource::kWaitForDonor;
      p.donor.clear();
    }
    outcome->drifted.push_back(std::move(d));
    return absl::OkStatus();
  }

  // All of a stage's plan peers reported: agreement, or drift.
  absl::Status Agree(int stage, SwarmReportOutcome* outcome) {
    StageRound& r = round[stage];
    // Groups of equal reports, in plan order (the plan is by seniority).
    std::vector<std::pair<const Report*, std::vector<std::string>>> groups;
    for (const std::string& id : r.plan_peers) {
      const Report& rep = r.reports.at(id);
      auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& gr) {
        return gr.first->hash == rep.hash &&
               (job.own_norms || gr.first->sum_squares == rep.sum_squares);
      });
      if (g == groups.end()) {
        groups.push_back({&rep, {id}});
      } else {
        g->second.push_back(id);
      }
    }
    // The largest group wins; on a tie the first, which holds the most senior peer.
    size_t win = 0;
    for (size_t g = 1; g < groups.size(); ++g) {
      if (groups[g].second.size() > groups[win].second.size()) win = g;
    }
    const Report agreed = *groups[win].first;
    if (groups.size() == 1) {
      r.phase = SwarmStagePhase::kAgreed;
      r.sum_squares = agreed.sum_squares;
      r.hash = agreed.hash;
      stage_hash[stage] = std::make_pair(next_step, agreed.hash);
      // Joiners that synced this state before the stage knew its hash.
      for (Peer* p : StagePeers(stage)) {
        if (p->state != SwarmPeerState::kSyncing || !p->synced || p->verified ||
            p->synced_step != next_step) {
          continue;
        }
        if (p->synced_hash == agreed.hash) {
          p->verified = true;
          continue;
        }
        ++counters.syncs_refused;
        outcome->syncs_refused.push_back(absl::StrCat(
            "peer '", p->id, "' synced state ", next_step, " of stage ", stage, " with hash ",
            Hex(p->synced_hash), ", the stage's peers agree on ", Hex(agreed.hash),
            ": syncing again"));
        if (!p->donor.empty()) ++p->donor_failures[p->donor];
        p->synced = false;
        AssignSource(*p);
      }
      return absl::OkStatus();
    }
    // Copies: Drift changes the round's reports.
    std::vector<std::pair<std::string, Report>> dissent;
    for (size_t g = 0; g < groups.size(); ++g) {
      if (g == win) continue;
      for (const std::string& id : groups[g].second) dissent.push_back({id, *groups[g].first});
    }
    const size_t agreeing = groups[win].second.size();
    for (const auto& [id, mine] : dissent) {
      if (absl::Status s = Drift(stage, id, mine, agreed, agreeing, outcome); !s.ok()) return s;
    }
    return Replan(stage);
  }

  // Every stage agreed: close the ledger and decide the step.
  absl::StatusOr<SwarmApply> Decide() {
    absl::StatusOr<SwarmStepHoldings> closed = ledger->Close();
    if (!closed.ok()) {
      return absl::InternalError(absl::StrCat(
          "swarm state: every stage agreed on step ", next_step,
          " but the ledger does not close: ", closed.status().message()));
    }
    SwarmApply a;
    a.step = next_step;
    double total = 0;
    for (int s = 0; s < job.stages; ++s) {
      a.stage_sum_squares.push_back(round[s].sum_squares);
      a.stage_hashes.push_back(round[s].hash);
      total += round[s].sum_squares;
    }
    a.grad_norm = std::sqrt(total);
    // parallel::ClipScale (parallel/adamw.cc), written out: scheduler/ does not link parallel/.
    a.clip_scale = job.grad_clip > 0 && !job.own_norms
                       ? std::min(1.0, job.grad_clip / (a.grad_norm + kClipEpsilon))
                       : 1.0;
    a.lr = round_lr;
    decisions[a.step] = a;
    while (static_cast<int>(decisions.size()) > options.kept_decisions) {
      decisions.erase(decisions.begin());
    }
    ++counters.steps_applied;
    open = false;
    round.clear();
    for (auto& [id, p] : peers) p.in_round = false;
    ++next_step;
    // Claims that cannot enter the next round (none should be left: every claim of the state
    // just applied was checked when its stage agreed).
    for (auto& [id, p] : peers) {
      if (p.state == SwarmPeerState::kSyncing && p.synced && !Promotable(p)) {
        p.synced = false;
        AssignSource(p);
      }
    }
    Bump();
    return a;
  }

  std::string Missing() const {
    if (rollback.has_value()) return absl::StrCat("needs a rollback: ", rollback->reason);
    if (!open) return waiting.empty() ? absl::StrCat("step ", next_step, " is not open") : waiting;
    std::vector<std::string> parts;
    for (int s = 0; s < job.stages; ++s) {
      const StageRound& r = round[s];
      switch (r.phase) {
        case SwarmStagePhase::kCollecting:
          parts.push_back(absl::StrCat("stage ", s, " collecting: ", job.micro_batches - r.held,
                                       " of ", job.micro_batches, " micro-batches missing"));
          break;
        case SwarmStagePhase::kReducing: {
          std::vector<std::string> wait;
          for (const std::string& id : r.plan_peers) {
            if (r.reports.count(id) == 0) wait.push_back(id);
          }
          parts.push_back(absl::StrCat("stage ", s, " reducing plan ", r.plan,
                                       ": no report yet from ", Quoted(wait)));
          break;
        }
        case SwarmStagePhase::kAgreed:
          parts.push_back(absl::StrCat("stage ", s, " agreed"));
          break;
      }
    }
    return absl::StrCat("step ", next_step, ": ", absl::StrJoin(parts, "; "));
  }

  // Checks shared by the step's calls.
  absl::Status CheckRound(const char* what) const {
    if (rollback.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("swarm: ", what, ": the swarm needs a rollback (", rollback->reason, ")"));
    }
    if (!open) {
      return absl::FailedPreconditionError(absl::StrCat(
          "swarm: ", what, ": no step is open (", waiting.empty() ? "none yet" : waiting, ")"));
    }
    return absl::OkStatus();
  }
};

absl::StatusOr<std::unique_ptr<SwarmState>> SwarmState::Create(const SwarmJob& job,
                                                               SwarmStateOptions options) {
  if (job.stages < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm job: stages must be >= 1, got ", job.stages));
  }
  if (job.micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm job: micro_batches must be >= 1, got ", job.micro_batches));
  }
  if (job.stage_bytes.size() != static_cast<size_t>(job.stages)) {
    return absl::InvalidArgumentError(absl::StrCat("swarm job: stage_bytes has ",
                                                   job.stage_bytes.size(), " entries for ",
                                                   job.stages, " stages"));
  }
  for (int s = 0; s < job.stages; ++s) {
    if (job.stage_bytes[s] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("swarm job: stage ", s, " needs ",
                                                     job.stage_bytes[s], " bytes (must be >= 0)"));
    }
  }
  if (!std::isfinite(job.grad_clip)) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm job: grad_clip must be finite, got ", job.grad_clip));
  }
  if (job.checkpoint_step < -1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm job: checkpoint_step must be >= 0, or -1 for none, got ", job.checkpoint_step));
  }
  if (options.max_joiners_per_donor < 1 || options.max_drifts < 1 || options.kept_decisions < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm options: max_joiners_per_donor (", options.max_joiners_per_donor,
        "), max_drifts (", options.max_drifts, ") and kept_decisions (", options.kept_decisions,
        ") must be >= 1"));
  }
  if (!std::isfinite(options.default_throughput) || options.default_throughput < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm options: default_throughput must be finite and >= 0, got ",
        options.default_throughput));
  }
  if (!options.learning_rate) {
    return absl::InvalidArgumentError("swarm options: no learning_rate schedule");
  }
  if (absl::Status s = CheckSwarmRebalanceOptions(options.rebalance); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("swarm options: ", s.message()));
  }
  auto impl = std::make_unique<Impl>();
  impl->job = job;
  impl->options = std::move(options);
  impl->ledger = std::make_unique<SwarmLedger>();
  impl->checkpoint_step = job.checkpoint_step;
  impl->next_step = std::max<int64_t>(0, job.checkpoint_step);
  impl->stage_hash.resize(job.stages);
  impl->rebalancer = std::make_unique<SwarmRebalancer>(impl->options.rebalance);
  impl->TryOpen();
  return std::unique_ptr<SwarmState>(new SwarmState(std::move(impl)));
}

SwarmState::SwarmState(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SwarmState::~SwarmState() = default;

absl::StatusOr<SwarmJoin> SwarmState::AddPeer(const std::string& id, const std::string& address,
                                              int64_t free_bytes, double link_bytes_per_s) {
  if (id.empty()) return absl::InvalidArgumentError("swarm join: empty peer id");
  if (address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("swarm join of peer '", id, "': empty address"));
  }
  if (free_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("swarm join of peer '", id, "': free bytes ",
                                                   free_bytes, " (must be >= 0)"));
  }
  if (!(std::isfinite(link_bytes_per_s) && link_bytes_per_s >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm join of peer '", id, "': link ", link_bytes_per_s, " bytes/s (must be >= 0)"));
  }
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  if (st.peers.count(id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("swarm join: peer '", id, "' is already in the swarm"));
  }
  std::vector<SwarmStageLoad> loads(st.job.stages);
  for (int s = 0; s < st.job.stages; ++s) {
    loads[s].index = s;
    loads[s].bytes = st.job.stage_bytes[s];
    for (Impl::Peer* p : st.StagePeers(s)) {
      if (p->state == SwarmPeerState::kServing) {
        loads[s].serving_throughputs.push_back(p->throughput_reported
                                                   ? p->throughput
                                                   : st.options.default_throughput);
      } else if (p->state == SwarmPeerState::kSyncing) {
        ++loads[s].syncing_peers;
      }
    }
  }
  absl::StatusOr<SwarmStageChoice> choice = ChooseStage(loads, free_bytes);
  if (!choice.ok()) {
    return absl::Status(choice.status().code(),
                        absl::StrCat("swarm join of peer '", id, "': ", choice.status().message()));
  }
  Impl::Peer& p = st.peers[id];
  p.id = id;
  p.address = address;
  p.free_bytes = free_bytes;
  p.link_bytes_per_s = link_bytes_per_s;
  p.stage = choice->index;
  p.seq = ++st.seq;
  st.AssignSource(p);
  ++st.counters.joins;
  st.Bump();
  st.Settle();
  return st.JoinOf(p);
}

absl::StatusOr<SwarmJoin> SwarmState::DonorFailed(const std::string& joiner,
                                                  const std::string& donor) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(joiner);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrCat("swarm donor failure: unknown peer '", joiner, "'"));
  }
  if (!Impl::Unsynced(*p)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm donor failure: peer '", joiner, "' is ", SwarmPeerStateName(p->state),
        p->synced ? " (synced)" : "", ", not syncing"));
  }
  if (p->source != SwarmSyncSource::kDonor || p->donor != donor) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm donor failure: peer '", donor, "' is not peer '", joiner, "''s donor (",
        p->source == SwarmSyncSource::kDonor ? absl::StrCat("its donor is '", p->donor, "'")
                                              : absl::StrCat("it syncs from ",
                                                             SwarmSyncSourceName(p->source)),
        ")"));
  }
  ++p->donor_failures[donor];
  st.AssignSource(*p);
  st.Bump();
  st.Settle();
  return st.JoinOf(*p);
}

absl::Status SwarmState::PeerSynced(const std::string& id, int64_t step, uint64_t hash) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(id);
  if (p == nullptr) return absl::NotFoundError(absl::StrCat("swarm sync: unknown peer '", id, "'"));
  if (p->state != SwarmPeerState::kSyncing) {
    return absl::FailedPreconditionError(absl::StrCat("swarm sync: peer '", id, "' is ",
                                                      SwarmPeerStateName(p->state),
                                                      ", not syncing"));
  }
  if (p->synced) {
    if (p->synced_step == step && p->synced_hash == hash) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm sync: peer '", id, "' already synced state ", p->synced_step, " with hash ",
        Hex(p->synced_hash), "; it now claims state ", step, " with hash ", Hex(hash)));
  }
  if (st.rollback.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm sync of peer '", id, "': the swarm needs a rollback (", st.rollback->reason, ")"));
  }
  if (step != st.next_step) {
    return absl::OutOfRangeError(absl::StrCat("swarm sync: peer '", id, "' synced state ", step,
                                              ", the newest state is ", st.next_step,
                                              step < st.next_step ? ": sync again" : ""));
  }
  const auto& known = st.stage_hash[p->stage];
  const bool checked = known.has_value() && known->first == step;
  if (checked && known->second != hash) {
    return absl::DataLossError(absl::StrCat("swarm sync: peer '", id, "' synced state ", step,
                                            " of stage ", p->stage, " with hash ", Hex(hash),
                                            ", the stage's peers agree on ", Hex(known->second)));
  }
  p->synced = true;
  p->synced_step = step;
  p->synced_hash = hash;
  p->verified = checked;
  st.Bump();
  st.Settle();
  return absl::OkStatus();
}

absl::StatusOr<SwarmRemoval> SwarmState::RemovePeer(const std::string& id,
                                                    SwarmLeaveReason reason) {
  if (reason != SwarmLeaveReason::kLeft && reason != SwarmLeaveReason::kDead &&
      reason != SwarmLeaveReason::kEvicted) {
    return absl::InvalidArgumentError(absl::StrCat("swarm removal of peer '", id,
                                                   "': unknown reason ", static_cast<int>(reason)));
  }
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(id);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrCat("swarm removal: unknown peer '", id, "'"));
  }
  SwarmRemoval out;
  if (p->in_round) {
    const int stage = p->stage;
    if (st.round[stage].phase == SwarmStagePhase::kAgreed) {
      // Its micro-batches are in the reduced gradient its stage's other peers hold.
      Impl::Member* m = st.FindMember(stage, id);
      if (m == nullptr) {
        return absl::InternalError(absl::StrCat("swarm state: round peer '", id, "' of stage ",
                                                stage, " is not a live member"));
      }
      m->membership = Impl::Membership::kGone;
    } else {
      absl::StatusOr<int64_t> dropped = st.Fence(stage, id);
      if (!dropped.ok()) return dropped.status();
      out.dropped = *dropped;
      if (absl::Status s = st.Replan(stage); !s.ok()) return s;
    }
  }
  switch (reason) {
    case SwarmLeaveReason::kLeft: ++st.counters.leaves; break;
    case SwarmLeaveReason::kDead: ++st.counters.deaths; break;
    case SwarmLeaveReason::kEvicted: ++st.counters.evictions; break;
  }
  st.peers.erase(id);
  st.Bump();
  st.Settle();
  out.needs_rollback = st.rollback.has_value();
  return out;
}

absl::Status SwarmState::Drain(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(id);
  if (p == nullptr) return absl::NotFoundError(absl::StrCat("swarm drain: unknown peer '", id, "'"));
  if (p->state == SwarmPeerState::kDraining) return absl::OkStatus();
  if (p->state != SwarmPeerState::kServing) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm drain: peer '", id, "' is syncing and holds nothing: remove it instead"));
  }
  p->state = SwarmPeerState::kDraining;
  st.Bump();
  st.Settle();
  return absl::OkStatus();
}

absl::Status SwarmState::MovePeer(const std::string& id, int to) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(id);
  if (p == nullptr) return absl::NotFoundError(absl::StrCat("swarm move: unknown peer '", id, "'"));
  if (to < 0 || to >= st.job.stages || to == p->stage) {
    return absl::InvalidArgumentError(absl::StrCat("swarm move of peer '", id, "' (stage ",
                                                   p->stage, ") to stage ", to, " of ",
                                                   st.job.stages));
  }
  if (p->state != SwarmPeerState::kServing) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm move: peer '", id, "' is ", SwarmPeerStateName(p->state), ", not serving"));
  }
  if (st.rollback.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm move of peer '", id, "': the swarm needs a rollback (", st.rollback->reason, ")"));
  }
  int serving = 0;
  for (Impl::Peer* c : st.StagePeers(p->stage)) serving += c->state == SwarmPeerState::kServing;
  if (serving < 2) {
    return absl::FailedPreconditionError(absl::StrCat("swarm move: peer '", id,
                                                      "' is the only serving peer of stage ",
                                                      p->stage));
  }
  if (p->free_bytes < st.job.stage_bytes[to]) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "swarm move of peer '", id, "': stage ", to, " needs ", st.job.stage_bytes[to],
        " bytes, it has ", p->free_bytes));
  }
  st.StartMove(*p, to);
  return absl::OkStatus();
}

absl::StatusOr<std::optional<SwarmMove>> SwarmState::Rebalance(int64_t period) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  if (period <= st.period) {
    return absl::InvalidArgumentError(absl::StrCat("swarm rebalance: period ", period,
                                                   " after period ", st.period));
  }
  st.period = period;
  std::vector<SwarmPool> pools(st.job.stages);
  bool settled = !st.rollback.has_value() && st.waiting.empty();
  for (int s = 0; s < st.job.stages; ++s) {
    pools[s].index = s;
    pools[s].bytes = st.job.stage_bytes[s];
    for (const Impl::Peer* p : st.StagePeers(s)) {
      if (p->state != SwarmPeerState::kServing || !p->throughput_reported) {
        settled = false;
        continue;
      }
      SwarmPoolPeer peer;
      peer.id = p->id;
      peer.throughput = p->throughput;
      peer.free_bytes = p->free_bytes;
      peer.state_bytes_per_s = p->link_bytes_per_s;
      peer.moved_at_period = p->moved_at_period;
      pools[s].peers.push_back(std::move(peer));
    }
  }
  if (!settled) {
    // The pools are changing: the rebalancer's memory starts again once they settle.
    st.rebalancer = std::make_unique<SwarmRebalancer>(st.options.rebalance);
    return std::optional<SwarmMove>();
  }
  absl::StatusOr<std::optional<SwarmMove>> move = st.rebalancer->Check(pools, period);
  if (!move.ok() || !move->has_value()) return move;
  Impl::Peer* p = st.Find((*move)->peer);
  if (p == nullptr || p->stage != (*move)->from) {
    return absl::InternalError(absl::StrCat("swarm rebalance: the policy moves peer '",
                                            (*move)->peer, "', not a peer of stage ",
                                            (*move)->from));
  }
  st.StartMove(*p, (*move)->to);
  return move;
}

absl::Status SwarmState::ReportLoad(const std::string& id, double throughput,
                                    int64_t queue_length) {
  if (!std::isfinite(throughput) || throughput < 0 || queue_length < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm load report of peer '", id, "': throughput ", throughput,
        " must be finite and >= 0, queue length ", queue_length, " must be >= 0"));
  }
  absl::MutexLock lock(&mu_);
  Impl::Peer* p = impl_->Find(id);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrCat("swarm load report: unknown peer '", id, "'"));
  }
  p->throughput = throughput;
  p->throughput_reported = true;
  p->queue_length = queue_length;
  return absl::OkStatus();
}

absl::Status SwarmState::AddTrainer(const std::string& id) {
  if (id.empty()) return absl::InvalidArgumentError("swarm: empty trainer id");
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  auto it = st.trainers.find(id);
  if (it != st.trainers.end() && it->second) {
    return absl::AlreadyExistsError(absl::StrCat("swarm: trainer '", id, "' is already alive"));
  }
  st.trainers[id] = true;
  st.Bump();
  st.Settle();  // the round that waited for a trainer opens
  return absl::OkStatus();
}

absl::StatusOr<int64_t> SwarmState::RemoveTrainer(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  auto it = st.trainers.find(id);
  if (it == st.trainers.end() || !it->second) {
    return absl::NotFoundError(absl::StrCat("swarm: no live trainer '", id, "'"));
  }
  it->second = false;
  st.dead_trainers.push_back(id);
  while (st.dead_trainers.size() > kKeptDeadTrainers) {
    auto old = st.trainers.find(st.dead_trainers.front());
    if (old != st.trainers.end() && !old->second) st.trainers.erase(old);
    st.dead_trainers.pop_front();
  }
  const int64_t released = st.ledger->TrainerDied(id);
  st.Bump();
  return released;
}

absl::StatusOr<std::vector<SwarmLease>> SwarmState::Lease(const std::string& trainer,
                                                          int max_leases) {
  if (max_leases < 1) {
    return absl::InvalidArgumentError(absl::StrCat("swarm lease for trainer '", trainer,
                                                   "': max_leases must be >= 1, got ", max_leases));
  }
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  auto it = st.trainers.find(trainer);
  if (it == st.trainers.end()) {
    return absl::NotFoundError(absl::StrCat("swarm lease: unknown trainer '", trainer, "'"));
  }
  if (!it->second) {
    return absl::FailedPreconditionError(
        absl::StrCat("swarm lease: trainer '", trainer, "' was removed"));
  }
  if (absl::Status s = st.CheckRound("lease"); !s.ok()) return s;
  return st.ledger->Lease(trainer, max_leases);
}

absl::Status SwarmState::Release(const std::string& trainer, int64_t id) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  if (st.trainers.count(trainer) == 0) {
    return absl::NotFoundError(absl::StrCat("swarm release: unknown trainer '", trainer, "'"));
  }
  if (absl::Status s = st.CheckRound("release"); !s.ok()) return s;
  return st.ledger->Release(trainer, id);
}

absl::Status SwarmState::Commit(const std::string& peer, const std::string& trainer, int64_t id) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(peer);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrCat("swarm commit of micro-batch ", id,
                                            ": unknown peer '", peer, "'"));
  }
  auto t = st.trainers.find(trainer);
  if (t == st.trainers.end()) {
    return absl::NotFoundError(absl::StrCat("swarm commit of micro-batch ", id, " by peer '",
                                            peer, "': unknown trainer '", trainer, "'"));
  }
  if (absl::Status s = st.CheckRound("commit"); !s.ok()) return s;
  if (!p->in_round) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm commit of micro-batch ", id, ": peer '", peer, "' (", SwarmPeerStateName(p->state),
        ", stage ", p->stage, ") is not in step ", st.next_step, "'s round"));
  }
  const int stage = p->stage;
  if (absl::Status s = st.ledger->Commit(trainer, id, {{stage, peer}}); !s.ok()) return s;
  Impl::Member* m = st.FindMember(stage, peer);
  if (m == nullptr) {
    return absl::InternalError(
        absl::StrCat("swarm state: round peer '", peer, "' is not a live member"));
  }
  ++m->held;
  if (++st.round[stage].held == st.job.micro_batches) {
    if (absl::Status s = st.Replan(stage); !s.ok()) return s;
    st.Bump();
  }
  return absl::OkStatus();
}

absl::StatusOr<SwarmReportOutcome> SwarmState::StageReport(const SwarmStageReport& report) {
  if (!std::isfinite(report.sum_squares) || report.sum_squares < 0) {
    return absl::InvalidArgumentError(absl::StrCat("swarm report of peer '", report.peer,
                                                   "': sum of squares ", report.sum_squares,
                                                   " (must be finite and >= 0)"));
  }
  std::vector<int64_t> ids = report.ids;
  std::sort(ids.begin(), ids.end());
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  Impl::Peer* p = st.Find(report.peer);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrCat("swarm report: unknown peer '", report.peer, "'"));
  }
  if (absl::Status s = st.CheckRound("report"); !s.ok()) return s;
  if (report.step != st.next_step) {
    return absl::OutOfRangeError(absl::StrCat("swarm report of peer '", report.peer,
                                              "' for step ", report.step, ": step ",
                                              st.next_step, " is open"));
  }
  if (!p->in_round) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm report: peer '", report.peer, "' (", SwarmPeerStateName(p->state), ", stage ",
        p->stage, ") is not in step ", st.next_step, "'s round"));
  }
  const int stage = p->stage;
  Impl::StageRound& r = st.round[stage];
  SwarmReportOutcome outcome;
  if (r.phase == SwarmStagePhase::kCollecting || report.plan != r.plan) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm report of peer '", report.peer, "': plan ", report.plan, " is not stage ", stage,
        "'s ",
        r.phase == SwarmStagePhase::kCollecting
            ? absl::StrCat("(it is collecting: ", st.job.micro_batches - r.held,
                           " micro-batches missing)")
            : absl::StrCat("current plan ", r.plan)));
  }
  auto want = r.plan_ids.find(report.peer);
  if (want == r.plan_ids.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "swarm report: peer '", report.peer, "' is not in stage ", stage, "'s plan ", r.plan));
  }
  if (ids != want->second) {
    return absl::InvalidArgumentError(absl::StrCat("swarm report of peer '", report.peer,
                                                   "', plan ", r.plan, ": ",
                                                   IdsDifference(ids, want->second)));
  }
  auto prior = r.reports.find(report.peer);
  if (prior != r.reports.end()) {
    if (prior->second.hash == report.param_hash &&
        prior->second.sum_squares == report.sum_squares) {
      outcome.stage_phase = r.phase;
      return outcome;
    }
    return absl::AlreadyExistsError(absl::StrCat(
        "swarm report of peer '", report.peer, "', plan ", r.plan, ": it reported hash ",
        Hex(prior->second.hash), " and sum of squares ", prior->second.sum_squares,
        " already, now ", Hex(report.param_hash), " and ", report.sum_squares));
  }
  if (r.phase != SwarmStagePhase::kReducing) {
    return absl::InternalError(absl::StrCat("swarm state: stage ", stage, " agreed on plan ",
                                            r.plan, " without peer '", report.peer, "''s report"));
  }
  r.reports[report.peer] = Impl::Report{ids, report.sum_squares, report.param_hash};
  if (r.reports.size() == r.plan_peers.size()) {
    if (absl::Status s = st.Agree(stage, &outcome); !s.ok()) return s;
    bool all = true;
    for (const Impl::StageRound& sr : st.round) all = all && sr.phase == SwarmStagePhase::kAgreed;
    outcome.stage_phase = st.round[stage].phase;
    if (all) {
      absl::StatusOr<SwarmApply> apply = st.Decide();
      if (!apply.ok()) return apply.status();
      outcome.apply = *std::move(apply);
      outcome.stage_phase = SwarmStagePhase::kAgreed;
    }
    st.Bump();
    st.Settle();
  } else {
    outcome.stage_phase = r.phase;
  }
  return outcome;
}

absl::StatusOr<SwarmApply> SwarmState::Decision(int64_t step) const {
  absl::MutexLock lock(&mu_);
  const Impl& st = *impl_;
  auto it = st.decisions.find(step);
  if (it != st.decisions.end()) return it->second;
  if (step == st.next_step) {
    return absl::UnavailableError(
        absl::StrCat("swarm decision of step ", step, " not made yet: ", st.Missing()));
  }
  return absl::OutOfRangeError(absl::StrCat(
      "swarm decision of step ", step, ": ",
      step > st.next_step ? absl::StrCat("the swarm is at step ", st.next_step)
                          : "not kept (never decided here, rolled back, or too old)"));
}

absl::Status SwarmState::CheckpointSaved(int64_t step) {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  if (step < 0 || step > st.next_step) {
    return absl::OutOfRangeError(absl::StrCat("swarm checkpoint of state ", step,
                                              ": the newest state is ", st.next_step));
  }
  if (step < st.checkpoint_step) {
    return absl::FailedPreconditionError(absl::StrCat("swarm checkpoint of state ", step,
                                                      ": the newest checkpoint is state ",
                                                      st.checkpoint_step));
  }
  if (step == st.checkpoint_step) return absl::OkStatus();
  st.checkpoint_step = step;
  st.Bump();
  st.Settle();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> SwarmState::RollBack() {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  if (!st.rollback.has_value()) {
    return absl::FailedPreconditionError("swarm rollback: none is pending");
  }
  const int64_t target = st.FallbackStep();
  st.ledger_base = Sum(st.ledger_base, st.ledger->counters());
  st.ledger_base.lost = 0;
  st.ledger = std::make_unique<SwarmLedger>();
  st.open = false;
  st.round.clear();
  for (auto& [id, p] : st.peers) p.in_round = false;
  st.decisions.erase(st.decisions.lower_bound(target), st.decisions.end());
  if (target < st.next_step) {
    // Nobody holds the target state: everyone loads it, draining peers go.
    for (Impl::Peer* p : st.AllBySeniority()) {
      if (p->state == SwarmPeerState::kDraining && p->moving_to < 0) {
        ++st.counters.leaves;
        st.peers.erase(p->id);
        continue;
      }
      if (p->moving_to >= 0) {
        // A move under way: it loads the target state of the stage it was going to.
        p->stage = p->moving_to;
        p->moving_to = -1;
        ++st.counters.moves;
      }
      p->state = SwarmPeerState::kSyncing;
      p->synced = false;
      p->verified = false;
      p->donor.clear();
      p->donor_failures.clear();
      p->source = SwarmSyncSource::kWaitForDonor;
    }
    for (auto& h : st.stage_hash) h.reset();
  } else {
    // The round in progress restarts from the state every serving peer still holds.
    for (auto& h : st.stage_hash) {
      if (h.has_value() && h->first != target) h.reset();
    }
  }
  st.next_step = target;
  st.rollback.reset();
  ++st.counters.rollbacks;
  st.Bump();
  st.Settle();
  return target;
}

SwarmSnapshot SwarmState::Snapshot() const {
  absl::MutexLock lock(&mu_);
  Impl& st = *impl_;
  SwarmSnapshot out;
  out.roster_version = st.version;
  if (st.open) {
    out.open_step = st.next_step;
    out.open_lr = st.round_lr;
  }
  out.next_step = st.next_step;
  out.checkpoint_step = st.checkpoint_step;
  out.waiting = st.waiting;
  out.rollback = st.rollback;
  out.counters = st.counters;
  out.ledger = Sum(st.ledger_base, st.ledger->counters());
  out.counters.fences = out.ledger.fences;
  out.counters.replays = out.ledger.replays;
  for (const auto& [id, alive] : st.trainers) out.trainers.push_back({id, alive});
  for (int s = 0; s < st.job.stages; ++s) {
    SwarmStageInfo info;
    info.index = s;
    info.bytes = st.job.stage_bytes[s];
    const std::vector<Impl::Peer*> stage_peers = st.StagePeers(s);
    const Impl::StageRound* r = st.open ? &st.round[s] : nullptr;
    const std::map<std::string, int> loads = st.Loads();
    for (const Impl::Peer* p : stage_peers) {
      SwarmPeerInfo pi;
      pi.id = p->id;
      pi.address = p->address;
      pi.stage = s;
      pi.state = p->state;
      pi.throughput = p->throughput_reported ? p->throughput : st.options.default_throughput;
      pi.throughput_reported = p->throughput_reported;
      pi.queue_length = p->queue_length;
      pi.in_round = p->in_round;
      pi.drifts = p->drifts;
      auto load = loads.find(p->id);
      pi.joiners = load == loads.end() ? 0 : load->second;
      const Impl::Member* m = p->in_round ? st.FindMember(s, p->id) : nullptr;
      pi.accumulated = m != nullptr ? m->held : 0;
      if (p->state == SwarmPeerState::kSyncing) {
        pi.source = p->source;
        pi.donor = p->donor;
        pi.synced = p->synced;
        pi.synced_step = p->synced ? p->synced_step : -1;
        pi.verified = p->synced && p->verified;
      }
      if (p->state == SwarmPeerState::kServing) info.capacity += pi.throughput;
      pi.can_leave = st.DrainDone(*p);
      pi.moving_to = p->moving_to;
      info.peers.push_back(std::move(pi));
    }
    if (r != nullptr) {
      info.phase = r->phase;
      info.missing = st.job.micro_batches - r->held;
      if (r->phase != SwarmStagePhase::kCollecting) {
        SwarmReduction red;
        red.step = st.next_step;
        red.plan = r->plan;
        red.peers = r->plan_peers;
        red.ids = r->plan_ids;
        info.reduction = std::move(red);
        for (const std::string& id : r->plan_peers) {
          if (r->reports.count(id) != 0) info.reported.push_back(id);
        }
      }
    }
    out.stages.push_back(std::move(info));
  }
  return out;
}

uint64_t SwarmState::roster_version() const {
  absl::MutexLock lock(&mu_);
  return impl_->version;
}

int64_t SwarmState::next_step() const {
  absl::MutexLock lock(&mu_);
  return impl_->next_step;
}

int64_t SwarmState::rollbacks() const {
  absl::MutexLock lock(&mu_);
  return impl_->counters.rollbacks;
}

}  // namespace shoal::scheduler
