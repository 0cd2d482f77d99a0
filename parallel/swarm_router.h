// How a swarm trainer picks, for each hop of a micro-batch, which peer of a stage runs it.
//
// Every stage of a swarm is served by several peers of unequal speed. A trainer keeps one
// StageRouter per stage and asks it for a peer at every hop. The router spreads the work so that
// each peer receives work in proportion to its measured throughput (ALGORITHMS.md §2.4): an
// interleaved weighted round-robin over virtual finish times. Choosing a peer takes the smallest
// virtual time and moves the peer on to that time plus the task's expected
// duration (task size / the peer's measured throughput). A fast peer's virtual time moves slowly,
// so it comes back to the top more often; ties are broken by a seeded random draw, so one seed
// gives one sequence of choices.
//
// A caller may also hold work on a peer (Choose's `hold`, given back by Release): the work it has
// sent there and not yet seen finished, a micro-batch's forward with the backward that must follow
// on the same peer. Held work comes first: Choose takes the peer whose held work would take least
// time at its measured rate (join the shortest queue, in seconds), and the virtual times above
// break ties, among them the case where nothing is held. So a trainer with several micro-batches
// in flight gives each new one to the peer that will be free first, and peers of equal speed get
// equal shares of every step, not only of the run (in `shoal bench swarm` the weighted round-robin
// alone gave one of two equal stage-0 peers 8.8 of a step's 16 micro-batches on average, and
// up to 11).
//
// A peer's throughput is a ThroughputEma over the tasks the trainer timed on it. Both pieces are
// pure: times are passed in as seconds (any clock, a fake one in tests), nothing here sleeps,
// reads a clock or talks to the network.
//
// Membership comes from the coordinator's roster (SetRoster): a newcomer enters the heap at the
// current minimum, so it is tried within the next |stage| choices; a departed peer's heap entry
// goes stale and is skipped when it surfaces. A peer that failed a call is banned (Ban) until the
// roster version changes or the stage has made `ban_choices` more choices, whichever comes first
// (a peer that failed once but lives, and that the coordinator therefore keeps, is tried again);
// a peer banned again before a call to it succeeded is banned twice as long, up to
// kMaxBanDoublings doublings. If every peer of the roster is banned, the fault is more likely the
// trainer's own (its network, say) than every peer's, so Choose then ignores the bans rather than
// stall, and counts it.
//
// Thread safety: ThroughputEma is a plain value (not thread-safe); StageRouter is thread-safe (a
// trainer may have several micro-batches in flight). No call blocks.
#ifndef SHOAL_PARALLEL_SWARM_ROUTER_H_
#define SHOAL_PARALLEL_SWARM_ROUTER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace shoal::parallel {

// A peer's throughput as SWARM's PerformanceEMA measures it: an exponential moving average of
// seconds per sample with smoothing `alpha`, bias-corrected for the few first measurements
// (ema / (1 - (1 - alpha)^n) after n updates), throughput = 1 / max(seconds per sample, 1e-20).
// So the first measurement is taken as it is, and a constant rate is reported as that rate.
//
// Each task comes with the seconds its caller measured for it. A trainer with several calls in
// flight to one peer measures each call's time less what it waited there behind the others (the
// peer's reply says how long), so overlapping calls need no accounting here. (Timing calls as
// intervals and counting the time two of them overlap once takes a call whose reply was read late
// as taking next to no time: in `shoal bench swarm` that gave one of two equal peers 60 % of the
// calls.)
class ThroughputEma {
 public:
  // REQUIRES: 0 < alpha <= 1.
  explicit ThroughputEma(double alpha = 0.1);

  // Folds in a task of `samples` (> 0) measured as `seconds` (finite, >= 0). kInvalidArgument
  // naming the bad value; the average is then unchanged.
  absl::Status Update(double samples, double seconds);

  // Samples per second; 0 before the first update.
  double Throughput() const;
  // Bias-corrected seconds per sample; 0 before the first update.
  double SecondsPerSample() const;
  int64_t updates() const { return updates_; }
  bool measured() const { return updates_ > 0; }

 private:
  void Fold(double seconds_per_sample);

  double alpha_;
  // The bias-corrected average kept as a weighted mean: weighted_sum_ = sum_k b^(n-k) x_k and
  // weight_ = sum_k b^(n-k) with b = 1 - alpha, x_k the k-th seconds per sample. Their ratio is
  // exactly SWARM's ema / (1 - b^n) (both are multiplied by alpha there), and after one update it
  // is x_1 itself, with no rounding.
  double weighted_sum_ = 0;
  double weight_ = 0;
  int64_t updates_ = 0;
};

struct StageRouterOptions {
  std::string stage = "stage";  // how messages name the stage ("stage 2")
  uint64_t seed = 0;            // the tie-break draws
  double alpha = 0.1;           // the throughput EMA's smoothing
  // Seconds per unit of task size assumed for a peer not yet measured (SWARM's initial
  // throughput, which multiplies: 1 s per sample).
  double initial_seconds_per_sample = 1.0;
  // How many of the stage's choices a ban lasts at first (a roster change lifts it sooner);
  // 0: until the roster changes.
  uint64_t ban_choices = 64;
};

// A ban lasts at most ban_choices << kMaxBanDoublings choices.
inline constexpr int kMaxBanDoublings = 4;

struct StageRouterCounters {
  uint64_t choices = 0;                // successful Choose and ChooseSame calls
  uint64_t same_peer_choices = 0;      // of them, ChooseSame calls that kept their peer
  uint64_t all_banned_choices = 0;     // of them, made ignoring bans (every peer was banned)
  uint64_t stale_entries_skipped = 0;  // heap entries of departed, banned or re-pushed peers
  uint64_t bans = 0;                   // Ban calls that banned a peer
  uint64_t bans_expired = 0;           // bans lifted by ban_choices (not by a roster change)
  uint64_t reports = 0;                // Report calls folded into a peer's EMA
  uint64_t roster_changes = 0;         // SetRoster calls that installed a new roster version
  uint64_t peers_added = 0;
  uint64_t peers_dropped = 0;
};

// A hop's work in forwards of one sample (SWARM's weights): the router's task sizes, and the
// work a peer counts into the throughput it reports.
inline constexpr double kSwarmForwardWork = 1.0;
inline constexpr double kSwarmBackwardWork = 2.5;
inline constexpr double kSwarmForwardBackwardWork = kSwarmForwardWork + kSwarmBackwardWork;

// One trainer's router for one stage. See the top of the file.
class StageRouter {
 public:
  // kInvalidArgument when alpha is not in (0, 1] or initial_seconds_per_sample is not finite and
  // > 0.
  static absl::StatusOr<std::unique_ptr<StageRouter>> Create(const StageRouterOptions& options);

  // Installs the stage's roster: peers not known yet are added (entering the heap at its current
  // minimum, unmeasured), peers absent from `peer_ids` are dropped with their measurements. A
  // version above the current one clears every ban; the same version with the same peers changes
  // nothing. kInvalidArgument for an empty or repeated peer id; kFailedPrecondition for a version
  // below the current one, or the current version with other peers (a roster is named by its
  // version). On error nothing changes.
  absl::Status SetRoster(uint64_t roster_version, const std::vector<std::string>& peer_ids);

  // The peer to run a task of `task_size` (samples; SWARM weighs a backward as 2.5 forwards) on:
  // of the peers not banned, the one whose held work takes least time at its rate (an unmeasured
  // peer's rate taken as the mean of the measured ones'), ties going to the earliest virtual time.
  // Advances its virtual time by the task's expected duration and holds `hold` more samples of
  // work on it until Release. kInvalidArgument when task_size is not finite and > 0 or hold is not
  // finite and >= 0; kUnavailable naming the stage when the roster is empty (or was never set).
  absl::StatusOr<std::string> Choose(double task_size, double hold = 0);

  // `peer` again, when it is still in the roster and not banned (a backward goes to the peer
  // that ran the micro-batch's forward and holds its activations); its virtual time advances as
  // Choose's would, and its held work stays as it is. Otherwise Choose(task_size).
  absl::StatusOr<std::string> ChooseSame(const std::string& peer, double task_size);

  // A task of `task_size` took `seconds` of `peer`'s time (ThroughputEma::Update): folds it into
  // the peer's throughput. The peer's first report moves it back to the heap minimum (its earlier
  // choices were charged at initial_seconds_per_sample, which would otherwise keep it unchosen
  // until the measured peers caught up). kInvalidArgument for bad numbers; kNotFound when the peer
  // is not in the roster (it left meanwhile: nothing to do).
  absl::Status Report(const std::string& peer, double task_size, double seconds);

  // Gives back `work` samples held on `peer` (Choose's hold): its call ended, or the caller gave
  // up on it. Held work never goes below 0. kInvalidArgument when work is not finite and >= 0;
  // kNotFound when the peer is not in the roster (it left, and its held work with it).
  absl::Status Release(const std::string& peer, double work);
  // The work held on `peer` (0 for a peer not in the roster).
  double held(const std::string& peer) const;

  // Stops choosing `peer` until the roster version changes or the stage has made the ban's
  // length of choices (a call to it failed with something other than a deadline: a slow peer is
  // not banned, it just accrues virtual time). The length is options.ban_choices, doubled for each
  // earlier ban that no successful call (a Report made while it was not banned) has followed, at
  // most kMaxBanDoublings times. An expired ban puts the peer back at the heap minimum, as a
  // newcomer. Banning a banned peer again is not an error and changes nothing. Its measurements
  // are kept (reports still reach them), so it comes back with them. kNotFound when the peer is
  // not in the roster.
  absl::Status Ban(const std::string& peer);

  // The peer's measured throughput (task size per second); nullopt when it is not in the roster
  // or has no measurement yet.
  std::optional<double> Throughput(const std::string& peer) const;
  bool banned(const std::string& peer) const;
  // The roster's peers, in id order; the installed version (nullopt before the first SetRoster).
  std::vector<std::string> peers() const;
  std::optional<uint64_t> roster_version() const;
  StageRouterCounters counters() const;

 private:
  explicit StageRouter(const StageRouterOptions& options);

  struct Peer {
    explicit Peer(double alpha) : ema(alpha) {}
    ThroughputEma ema;
    bool banned = false;
    uint64_t ban_ends = 0;    // while banned: the choice count at which the ban expires (0: never)
    int ban_doublings = -1;   // the last ban's doublings; -1 when a call succeeded since
    double virtual_time = 0;  // where its next entry is (or would be) in the heap
    uint64_t tie = 0;         // its entry's random tie-break
    uint64_t entry = 0;       // id of its live heap entry; 0 when it has none
    double held = 0;          // samples of work held on it (Choose's hold, less Release)
  };
  struct Entry {
    double virtual_time;
    uint64_t tie;  // random tie-break
    uint64_t id;   // unique, so an entry of a dropped peer never comes back to life
    std::string peer;
  };
  struct Later {
    bool operator()(const Entry& a, const Entry& b) const;
  };

  // kInvalidArgument naming the stage unless task_size is finite and > 0.
  absl::Status CheckTaskSize(double task_size) const;
  // kInvalidArgument naming the stage and `what` unless work is finite and >= 0.
  absl::Status CheckWork(double work, const char* what) const;
  bool Live(const Entry& e) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Lifts the bans that expired by now (counters_.choices), the peers entering at the heap
  // minimum.
  void LiftExpiredBans() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pops stale entries off the top; rebuilds the heap when stale entries dominate it.
  void DropStaleTop() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Push(const std::string& peer, double virtual_time) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts a choice of `peer` for a task of `task_size`: moves its virtual time (and heap entry)
  // on by the task's expected duration.
  void Charge(const std::string& peer, double task_size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The smallest virtual time of a live entry, or of the last choice when there is none.
  double HeapMinimum() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double ExpectedSeconds(const Peer& p, double task_size) const;
  // Seconds per sample for an unmeasured peer's held work: the mean of the measured peers'
  // (options.initial_seconds_per_sample when none is measured).
  double UnmeasuredSecondsPerSample() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const StageRouterOptions options_;
  mutable absl::Mutex mu_;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  std::optional<uint64_t> version_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<Entry> heap_ ABSL_GUARDED_BY(mu_);  // a std::push_heap/pop_heap heap, Later
  uint64_t next_entry_ ABSL_GUARDED_BY(mu_) = 1;
  double last_virtual_time_ ABSL_GUARDED_BY(mu_) = 0;
  // The earliest ban_ends of a banned peer (UINT64_MAX when no ban expires), so choices skip the
  // scan for expired bans until one is due.
  uint64_t next_ban_end_ ABSL_GUARDED_BY(mu_) = UINT64_MAX;
  StageRouterCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_SWARM_ROUTER_H_
