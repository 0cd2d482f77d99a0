#include "parallel/swarm_router.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace shoal::parallel {

namespace {

// PerformanceEMA's floor on seconds per sample: a task measured at zero seconds gives a huge but
// finite throughput.
constexpr double kMinSecondsPerSample = 1e-20;

bool FinitePositive(double x) { return std::isfinite(x) && x > 0; }

}  // namespace

// --- ThroughputEma -------------------------------------------------------------------------------

ThroughputEma::ThroughputEma(double alpha) : alpha_(alpha) { assert(alpha > 0 && alpha <= 1); }

absl::Status ThroughputEma::Update(double samples, double seconds) {
  if (!FinitePositive(samples)) {
    return absl::InvalidArgumentError(
        absl::StrCat("throughput update: samples must be finite and > 0, got ", samples));
  }
  if (!std::isfinite(seconds) || seconds < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "throughput update: seconds must be finite and >= 0, got ", seconds));
  }
  Fold(seconds / samples);
  return absl::OkStatus();
}

void ThroughputEma::Fold(double seconds_per_sample) {
  const double b = 1.0 - alpha_;
  weighted_sum_ = seconds_per_sample + b * weighted_sum_;
  weight_ = 1.0 + b * weight_;
  ++updates_;
}

double ThroughputEma::SecondsPerSample() const {
  return updates_ > 0 ? weighted_sum_ / weight_ : 0.0;
}

double ThroughputEma::Throughput() const {
  if (updates_ == 0) return 0.0;
  return 1.0 / std::max(SecondsPerSample(), kMinSecondsPerSample);
}

// --- StageRouter ---------------------------------------------------------------------------------

bool StageRouter::Later::operator()(const Entry& a, const Entry& b) const {
  // std::push_heap keeps the largest on top under this "less than": make that the earliest.
  if (a.virtual_time != b.virtual_time) return a.virtual_time > b.virtual_time;
  if (a.tie != b.tie) return a.tie > b.tie;
  return a.id > b.id;
}

absl::StatusOr<std::unique_ptr<StageRouter>> StageRouter::Create(
    const StageRouterOptions& options) {
  if (!(options.alpha > 0 && options.alpha <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.stage, " router: alpha must be in (0, 1], got ", options.alpha));
  }
  if (!FinitePositive(options.initial_seconds_per_sample)) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.stage, " router: initial_seconds_per_sample must be finite and > 0, got ",
        options.initial_seconds_per_sample));
  }
  if (options.ban_choices > (uint64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.stage, " router: ban_choices must be at most 2^40, got ", options.ban_choices));
  }
  return std::unique_ptr<StageRouter>(new StageRouter(options));
}

StageRouter::StageRouter(const StageRouterOptions& options)
    : options_(options), rng_(options.seed) {}

bool StageRouter::Live(const Entry& e) const {
  auto it = peers_.find(e.peer);
  return it != peers_.end() && !it->second.banned && it->second.entry == e.id;
}

void StageRouter::LiftExpiredBans() {
  if (counters_.choices < next_ban_end_) return;
  next_ban_end_ = UINT64_MAX;
  // Read once, so the peers whose bans expire together enter together (as SetRoster's do).
  std::optional<double> enter_at;
  for (auto& [id, p] : peers_) {
    if (!p.banned || p.ban_ends == 0) continue;
    if (p.ban_ends > counters_.choices) {
      next_ban_end_ = std::min(next_ban_end_, p.ban_ends);
      continue;
    }
    if (!enter_at.has_value()) enter_at = HeapMinimum();
    p.banned = false;
    Push(id, *enter_at);
    ++counters_.bans_expired;
  }
}

void StageRouter::DropStaleTop() {
  // Every choice pops one entry and pushes one, so stale entries only come from roster changes
  // and bans; rebuilding once they outnumber the live ones keeps the heap O(|roster|).
  if (heap_.size() > 2 * peers_.size() + 16) {
    std::vector<Entry> live;
    live.reserve(peers_.size());
    for (Entry& e : heap_) {
      if (Live(e)) live.push_back(std::move(e));
    }
    counters_.stale_entries_skipped += heap_.size() - live.size();
    heap_ = std::move(live);
    std::make_heap(heap_.begin(), heap_.end(), Later());
  }
  while (!heap_.empty() && !Live(heap_.front())) {
    std::pop_heap(heap_.begin(), heap_.end(), Later());
    heap_.pop_back();
    ++counters_.stale_entries_skipped;
  }
}

void StageRouter::Push(const std::string& peer, double virtual_time) {
  Peer& p = peers_.at(peer);
  p.virtual_time = virtual_time;
  p.entry = next_entry_++;
  p.tie = rng_();
  heap_.push_back(Entry{virtual_time, p.tie, p.entry, peer});
  std::push_heap(heap_.begin(), heap_.end(), Later());
}

double StageRouter::HeapMinimum() {
  DropStaleTop();
  return heap_.empty() ? last_virtual_time_ : heap_.front().virtual_time;
}

double StageRouter::ExpectedSeconds(const Peer& p, double task_size) const {
  if (!p.ema.measured()) return task_size * options_.initial_seconds_per_sample;
  return task_size / p.ema.Throughput();
}

double StageRouter::UnmeasuredSecondsPerSample() const {
  double sum = 0;
  int measured = 0;
  for (const auto& [id, q] : peers_) {
    if (!q.ema.measured()) continue;
    sum += q.ema.SecondsPerSample();
    ++measured;
  }
  return measured > 0 ? sum / measured : options_.initial_seconds_per_sample;
}

absl::Status StageRouter::SetRoster(uint64_t roster_version,
                                    const std::vector<std::string>& peer_ids) {
  std::set<std::string> wanted;
  for (const std::string& id : peer_ids) {
    if (id.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(options_.stage, " roster version ", roster_version, ": empty peer id"));
    }
    if (!wanted.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          options_.stage, " roster version ", roster_version, ": peer '", id, "' listed twice"));
    }
  }
  absl::MutexLock lock(&mu_);
  if (version_.has_value()) {
    if (roster_version < *version_) {
      return absl::FailedPreconditionError(
          absl::StrCat(options_.stage, ": roster version ", roster_version,
                       " is older than the installed version ", *version_));
    }
    if (roster_version == *version_) {
      bool same = wanted.size() == peers_.size();
      for (auto it = peers_.begin(); same && it != peers_.end(); ++it) {
        same = wanted.count(it->first) > 0;
      }
      if (same) return absl::OkStatus();
      return absl::FailedPreconditionError(absl::StrCat(options_.stage, ": roster version ",
                                                        roster_version,
                                                        " is installed already with other peers"));
    }
  }
  version_ = roster_version;
  ++counters_.roster_changes;

  for (auto it = peers_.begin(); it != peers_.end();) {
    if (wanted.count(it->first) == 0) {
      it = peers_.erase(it);  // its heap entry goes stale
      ++counters_.peers_dropped;
    } else {
      ++it;
    }
  }
  // Newcomers and the peers whose ban this version lifts enter at the current minimum, so each
  // is tried within the next |stage| choices. The minimum is read once: they all enter together,
  // in the order of their random tie-breaks.
  const double enter_at = HeapMinimum();
  for (const std::string& id : wanted) {
    auto it = peers_.find(id);
    if (it == peers_.end()) {
      peers_.emplace(std::piecewise_construct, std::forward_as_tuple(id),
                     std::forward_as_tuple(options_.alpha));
      ++counters_.peers_added;
      Push(id, enter_at);
    } else if (it->second.banned) {
      it->second.banned = false;
      Push(id, enter_at);
    }
  }
  next_ban_end_ = UINT64_MAX;  // no peer is banned now
  return absl::OkStatus();
}

absl::Status StageRouter::CheckWork(double work, const char* what) const {
  if (std::isfinite(work) && work >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(options_.stage, ": ", what, " must be finite and >= 0, got ", work));
}

absl::Status StageRouter::CheckTaskSize(double task_size) const {
  if (FinitePositive(task_size)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(options_.stage, ": task size must be finite and > 0, got ", task_size));
}

absl::StatusOr<std::string> StageRouter::Choose(double task_size, double hold) {
  SHOAL_RETURN_IF_ERROR(CheckTaskSize(task_size));
  SHOAL_RETURN_IF_ERROR(CheckWork(hold, "hold"));
  absl::MutexLock lock(&mu_);
  if (peers_.empty()) {
    return absl::UnavailableError(absl::StrCat(
        options_.stage, ": no peer to choose from",
        version_.has_value() ? absl::StrCat(" (roster version ", *version_, " is empty)")
                             : std::string(" (no roster yet)")));
  }
  LiftExpiredBans();
  DropStaleTop();  // each choice leaves a stale entry behind; this keeps the heap small
  // The least held time, then the earliest virtual time, then the random tie-break (the heap's
  // order). If every peer is banned, the fault is more likely the caller's own: choose among them
  // as if there were no bans, without lifting them (they still hold once the roster changes).
  bool all_banned = true;
  for (const auto& [id, p] : peers_) all_banned = all_banned && p.banned;
  const double unmeasured_spp = UnmeasuredSecondsPerSample();
  const std::string* chosen = nullptr;
  double best_held_s = 0, best_time = 0;
  uint64_t best_tie = 0;
  for (const auto& [id, p] : peers_) {
    if (p.banned && !all_banned) continue;
    const double held_s =
        p.held * (p.ema.measured() ? p.ema.SecondsPerSample() : unmeasured_spp);
    if (chosen != nullptr &&
        std::tie(held_s, p.virtual_time, p.tie) >= std::tie(best_held_s, best_time, best_tie)) {
      continue;
    }
    chosen = &id;
    best_held_s = held_s;
    best_time = p.virtual_time;
    best_tie = p.tie;
  }
  if (all_banned) ++counters_.all_banned_choices;
  const std::string peer = *chosen;
  Charge(peer, task_size);
  peers_.at(peer).held += hold;
  return peer;
}

absl::Status StageRouter::Release(const std::string& peer, double work) {
  SHOAL_RETURN_IF_ERROR(CheckWork(work, "released work"));
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  if (it == peers_.end()) {
    return absl::NotFoundError(absl::StrCat(options_.stage, ": cannot release work of peer '",
                                            peer, "', which is not in the roster"));
  }
  // What rounding leaves of work held and released in other orders is nothing: 0, so peers with
  // nothing held tie and the virtual times decide between them.
  const double left = it->second.held - work;
  it->second.held = left > 1e-9 * (it->second.held + work) ? left : 0.0;
  return absl::OkStatus();
}

double StageRouter::held(const std::string& peer) const {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  return it == peers_.end() ? 0 : it->second.held;
}

absl::StatusOr<std::string> StageRouter::ChooseSame(const std::string& peer, double task_size) {
  SHOAL_RETURN_IF_ERROR(CheckTaskSize(task_size));
  {
    absl::MutexLock lock(&mu_);
    LiftExpiredBans();
    auto it = peers_.find(peer);
    if (it != peers_.end() && !it->second.banned) {
      Charge(peer, task_size);
      ++counters_.same_peer_choices;
      return peer;
    }
  }
  return Choose(task_size);
}

void StageRouter::Charge(const std::string& peer, double task_size) {
  Peer& p = peers_.at(peer);
  const double now = p.virtual_time;
  last_virtual_time_ = now;
  // The next finish time must move past `now` even when the expected duration is below its
  // rounding (a peer measured at an enormous throughput), or a tie could keep the peer on top.
  const double next = std::max(now + ExpectedSeconds(p, task_size),
                               std::nextafter(now, std::numeric_limits<double>::infinity()));
  if (p.banned) {
    p.virtual_time = next;
  } else {
    Push(peer, next);
  }
  ++counters_.choices;
}

absl::Status StageRouter::Report(const std::string& peer, double task_size, double seconds) {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  if (it == peers_.end()) {
    return absl::NotFoundError(
        absl::StrCat(options_.stage, ": report for peer '", peer, "', which is not in the roster"));
  }
  absl::Status s = it->second.ema.Update(task_size, seconds);
  if (!s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(options_.stage, " peer '", peer, "': ", s.message()));
  }
  // The first measurement replaces the initial guess the peer's choices were charged at (1 s a
  // sample, far above a real peer's time): it re-enters at the heap minimum, as a newcomer does,
  // rather than wait until the measured peers' virtual times reach that guess.
  Peer& p = it->second;
  if (!p.banned) p.ban_doublings = -1;  // a call made since its last ban succeeded
  if (p.ema.updates() == 1 && !p.banned) {
    const double at = HeapMinimum();
    if (at < p.virtual_time) Push(peer, at);
  }
  ++counters_.reports;
  return absl::OkStatus();
}

absl::Status StageRouter::Ban(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  if (it == peers_.end()) {
    return absl::NotFoundError(
        absl::StrCat(options_.stage, ": cannot ban peer '", peer, "', which is not in the roster"));
  }
  Peer& p = it->second;
  if (!p.banned) {
    p.banned = true;
    p.entry = 0;  // its heap entry goes stale
    p.ban_doublings = std::min(p.ban_doublings + 1, kMaxBanDoublings);
    if (options_.ban_choices > 0) {
      p.ban_ends = counters_.choices + (options_.ban_choices << p.ban_doublings);
      next_ban_end_ = std::min(next_ban_end_, p.ban_ends);
    } else {
      p.ban_ends = 0;
    }
    ++counters_.bans;
  }
  return absl::OkStatus();
}

std::optional<double> StageRouter::Throughput(const std::string& peer) const {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  if (it == peers_.end() || !it->second.ema.measured()) return std::nullopt;
  return it->second.ema.Throughput();
}

bool StageRouter::banned(const std::string& peer) const {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(peer);
  return it != peers_.end() && it->second.banned;
}

std::vector<std::string> StageRouter::peers() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  out.reserve(peers_.size());
  for (const auto& [id, p] : peers_) out.push_back(id);
  return out;
}

std::optional<uint64_t> StageRouter::roster_version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

StageRouterCounters StageRouter::counters() const {
  absl::MutexLock lock(&mu_);
  return counters_;
}

}  // namespace shoal::parallel
