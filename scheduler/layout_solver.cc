#include "scheduler/layout_solver.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <queue>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/gpt_arithmetic.h"

namespace shoal::scheduler {
namespace {

// Every constant below is listed, with where it comes from, in docs/cost-model.md.
constexpr double kActivationBytes = 4;         // activations are fp32 in shoal's trainer
constexpr double kDefaultNetGbps = 1.0;        // a profile that did not measure its network
constexpr double kDefaultH2dGbps = 12.0;       // PCIe 3 x16, as measured by bandwidthTest
constexpr double kDefaultHostCopyGbps = 10.0;  // memcpy within RAM on a small host
constexpr double kGpuIntraHostGbps = 150.0;    // all-reduce bus bandwidth inside a GPU host
constexpr double kDiskGbps = 2.0;              // one NVMe drive, sequential
constexpr double kP2pLatencyS = 1e-4;          // one activation send between two hosts
// Devices sorted by speed are cut into speed classes where the next one is slower than this
// fraction of the previous; the solver tries using each prefix of classes.
constexpr double kSpeedClassDrop = 0.8;
constexpr int kMaxPrefixes = 8;
// The search over pp (and over micro-batch sizes) stops after this many feasible values in a row
// that did not beat the best so far: throughput rises while memory or all-reduce volume is the
// bottleneck and falls once the pipeline bubble dominates.
constexpr int kPatience = 2;
// Predictions within this relative difference are ties, decided by the paper's preferences.
constexpr double kTieRelative = 1e-9;

enum TierIndex { kGpu = 0, kHost = 1, kDisk = 2, kTiers = 3 };
enum StateIndex { kParams = 0, kGrads = 1, kOptimizer = 2, kActivations = 3, kStates = 4 };
constexpr const char* kStateNames[kStates] = {"params", "grads", "optimizer", "activations"};

// One usable device, in the solver's units.
struct Device {
  const SolverDevice* source = nullptr;
  double rate = 0;  // FLOP/s a training step reaches on it
  bool cuda = false;
  int64_t budget[kTiers] = {0, 0, 0};
  int64_t usable[kTiers] = {0, 0, 0};  // budget x headroom (disk 0 unless allowed)
  double net_gbps = kDefaultNetGbps;
  double h2d_gbps = kDefaultH2dGbps;
  double intra_gbps = kGpuIntraHostGbps;  // all-reduce bandwidth among devices of its host
};

// A tensor-parallel group: tp devices of one host (and one kind), in tp-rank order.
struct Group {
  std::vector<int> members;  // indices into the sorted devices
  double rate = 0;           // the slowest member's rate: the group runs at its pace
  bool cuda = false;
  int64_t usable[kTiers] = {0, 0, 0};  // per-tier minimum over the members
  double net_gbps = 0;
  double h2d_gbps = 0;
  double intra_gbps = 0;
};

// The model's shape and costs as doubles (products overflow int32).
struct Model {
  double C = 0, H = 0, T = 0, V = 0;
  int L = 0;
  GptShape shape;
  ModelCosts costs;
  double bytes[3] = {0, 0, 0};  // per parameter: params, grads, optimizer
  double total_params = 0;
};

// Activation bytes per token of one block kept for backward with tensor parallelism t: what
// shoal's model holds (common/gpt_arithmetic.h).
double ActivationBytesPerTokenBlock(const Model& m, int tp) {
  return GptBlockActivationBytesPerToken(m.shape, tp);
}

// Parameters held by stage `s` of `pp` besides its blocks: embeddings on the first stage; the
// final LayerNorm (and, when pp > 1, a copy of the tied wte for the head) on the last.
double FixedParams(const Model& m, int s, int pp) {
  double p = 0;
  if (s == 0) p += m.costs.embedding_params;
  if (s == pp - 1) p += m.costs.final_params + (pp > 1 ? m.V * m.C : 0);
  return p;
}

// Bytes of every state on one device of a tp group holding `n` blocks at stage s of pp.
struct StageBytes {
  int64_t bytes[kStates] = {0, 0, 0, 0};
};

StageBytes BytesFor(const Model& m, int n, int s, int pp, int tp, int mbs) {
  StageBytes out;
  const double params = (n * m.costs.block_params + FixedParams(m, s, pp)) / tp;
  for (int i = 0; i < 3; ++i) out.bytes[i] = static_cast<int64_t>(std::ceil(params * m.bytes[i]));
  // 1F1B: stage s has at most pp - s micro-batches between their forward and backward.
  const double in_flight = pp - s;
  double act = in_flight * mbs * m.T * n * ActivationBytesPerTokenBlock(m, tp);
  // The last stage also holds one micro-batch's logits and their gradient (fp32, vocab-parallel).
  if (s == pp - 1) act += mbs * m.T * GptHeadActivationBytesPerToken(m.shape, tp);
  out.bytes[kActivations] = static_cast<int64_t>(std::ceil(act));
  return out;
}

// Where each state goes on a device with `usable` bytes per tier: activations on the compute
// tier (GPU for CUDA, RAM for a CPU host), then params, grads and optimizer states fill the
// compute tier in that order and spill to the next tiers, so optimizer states spill first.
struct Placed {
  int64_t bytes[kStates][kTiers] = {};
  int64_t peak[kTiers] = {0, 0, 0};
  bool spilled = false;
};

bool Place(const StageBytes& sb, bool cuda, const int64_t usable[kTiers], Placed* out) {
  *out = Placed();
  int64_t free[kTiers] = {cuda ? usable[kGpu] : 0, usable[kHost], usable[kDisk]};
  const int compute = cuda ? kGpu : kHost;
  if (sb.bytes[kActivations] > free[compute]) return false;
  out->bytes[kActivations][compute] = sb.bytes[kActivations];
  free[compute] -= sb.bytes[kActivations];
  for (int state = kParams; state <= kOptimizer; ++state) {
    int64_t left = sb.bytes[state];
    for (int tier = compute; tier < kTiers && left > 0; ++tier) {
      const int64_t take = std::min(left, free[tier]);
      out->bytes[state][tier] += take;
      free[tier] -= take;
      left -= take;
      if (tier != compute && take > 0) out->spilled = true;
    }
    if (left > 0) return false;
  }
  for (int state = 0; state < kStates; ++state) {
    for (int tier = 0; tier < kTiers; ++tier) out->peak[tier] += out->bytes[state][tier];
  }
  return true;
}

// Seconds per step to move spilled states across the slower links (each byte down and up once).
double OffloadSeconds(const Placed& p, bool cuda, double h2d_gbps) {
  double s = 0;
  if (cuda) {
    int64_t host = 0;
    for (int state = kParams; state <= kOptimizer; ++state) host += p.bytes[state][kHost];
    s += 2.0 * host / (h2d_gbps * 1e9);
  }
  int64_t disk = 0;
  for (int state = kParams; state <= kOptimizer; ++state) disk += p.bytes[state][kDisk];
  s += 2.0 * disk / (kDiskGbps * 1e9);
  return s;
}

// Largest number of blocks stage s of the group can hold (0..L); `spill` allows slower tiers.
int LayerCap(const Model& m, const Group& g, int s, int pp, int tp, int mbs, bool spill) {
  auto fits = [&](int n) {
    Placed p;
    if (!Place(BytesFor(m, n, s, pp, tp, mbs), g.cuda, g.usable, &p)) return false;
    return spill || !p.spilled;
  };
  // Linear estimate first, then corrected by the exact (rounded) check.
  const int compute = g.cuda ? kGpu : kHost;
  const double per_block_state = m.costs.block_params / tp * m.costs.state_bytes_per_param;
  const double per_block_act = (pp - s) * mbs * m.T * ActivationBytesPerTokenBlock(m, tp);
  const StageBytes fixed = BytesFor(m, 0, s, pp, tp, mbs);
  const double fixed_state =
      static_cast<double>(fixed.bytes[kParams]) + fixed.bytes[kGrads] + fixed.bytes[kOptimizer];
  const double fixed_act = static_cast<double>(fixed.bytes[kActivations]);
  const double compute_bytes = static_cast<double>(g.usable[compute]);
  double total = 0;
  for (int t = compute; t < kTiers; ++t) total += static_cast<double>(g.usable[t]);
  double est;
  if (spill) {
    est = std::min((compute_bytes - fixed_act) / per_block_act,
                   (total - fixed_state - fixed_act) / (per_block_state + per_block_act));
  } else {
    est = (compute_bytes - fixed_state - fixed_act) / (per_block_state + per_block_act);
  }
  int n = static_cast<int>(std::clamp(std::floor(est), -1.0, static_cast<double>(m.L)));
  while (n >= 0 && !fits(n)) --n;
  while (n >= 0 && n < m.L && fits(n + 1)) ++n;
  return std::max(n, 0);
}

// The min-max allocation behind SplitLayers, without argument checks. Stage i with n blocks takes
// a[i]·n + e[i]. Returns false when the caps cannot hold n_layer blocks.
bool SplitInto(int n_layer, const std::vector<double>& a, const std::vector<double>& e,
               const std::vector<int>& cap, std::vector<int>* out) {
  const int k = static_cast<int>(a.size());
  out->assign(k, 1);
  int64_t cap_sum = 0;
  for (int i = 0; i < k; ++i) {
    if (cap[i] < 1) return false;
    // A device too slow to time (a denormal rate makes its times infinite) holds no stage; the
    // bisection below needs finite costs to end.
    if (!std::isfinite(a[i]) || !std::isfinite(e[i]) || a[i] <= 0 || e[i] < 0) return false;
    cap_sum += cap[i];
  }
  if (cap_sum < n_layer || n_layer < k) return false;
  // Blocks stage i holds when every stage may take up to time T (at least 1, at most its cap).
  auto count_at = [&](double t, int i) {
    const double n = std::floor((t - e[i]) / a[i]);
    return static_cast<int>(std::clamp(n, 1.0, static_cast<double>(cap[i])));
  };
  // Bisection for the largest T whose allocation stays <= n_layer blocks. The greedy below then
  // adds the remaining blocks one at a time where they finish earliest; together this is the
  // greedy from one block each (optimal for a min-max of increasing costs), minus the steps
  // bisection skipped.
  double lo = 0, hi = 0;
  for (int i = 0; i < k; ++i) hi = std::max(hi, e[i] + a[i] * cap[i]);
  for (int iter = 0; iter < 64; ++iter) {
    const double mid = 0.5 * (lo + hi);
    int64_t total = 0;
    for (int i = 0; i < k; ++i) total += count_at(mid, i);
    if (total <= n_layer) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  int64_t total = 0;
  for (int i = 0; i < k; ++i) {
    (*out)[i] = count_at(lo, i);
    total += (*out)[i];
  }
  // Finish time of stage i if it took one more block; ties go to the lower stage index.
  using Entry = std::pair<double, int>;
  auto later = [](const Entry& x, const Entry& y) {
    return x.first > y.first || (x.first == y.first && x.second > y.second);
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(later)> next(later);
  for (int i = 0; i < k; ++i) {
    if ((*out)[i] < cap[i]) next.push({a[i] * ((*out)[i] + 1) + e[i], i});
  }
  while (total < n_layer) {
    const int i = next.top().second;
    next.pop();
    ++(*out)[i];
    ++total;
    if ((*out)[i] < cap[i]) next.push({a[i] * ((*out)[i] + 1) + e[i], i});
  }
  return true;
}

// Micro-batches per replica: minimise the slowest replica's time base[r] + m[r]·slope[r] with
// every m[r] >= 1 and their sum = total.
std::vector<int> DistributeMicroBatches(const std::vector<double>& base,
                                        const std::vector<double>& slope, int total) {
  const int dp = static_cast<int>(base.size());
  std::vector<int> m(dp, 1);
  if (dp == 1) {
    m[0] = total;
    return m;
  }
  // Non-finite or zero times (extreme device rates) would stall the bisection: bound them.
  for (int r = 0; r < dp; ++r) {
    if (!std::isfinite(base[r]) || !std::isfinite(slope[r]) || slope[r] <= 0) {
      std::vector<double> b(base), sl(slope);
      for (int q = 0; q < dp; ++q) {
        b[q] = std::isfinite(b[q]) ? std::clamp(b[q], 0.0, 1e200) : 1e200;
        sl[q] = std::isfinite(sl[q]) ? std::clamp(sl[q], 1e-200, 1e200) : 1e200;
      }
      return DistributeMicroBatches(b, sl, total);
    }
  }
  auto count_at = [&](double t, int r) {
    const double n = std::floor((t - base[r]) / slope[r]);
    return static_cast<int64_t>(std::clamp(n, 1.0, static_cast<double>(total)));
  };
  double lo = 0, hi = std::numeric_limits<double>::infinity();
  for (int r = 0; r < dp; ++r) hi = std::min(hi, base[r] + slope[r] * total);
  for (int iter = 0; iter < 100; ++iter) {
    const double mid = 0.5 * (lo + hi);
    int64_t sum = 0;
    for (int r = 0; r < dp; ++r) sum += count_at(mid, r);
    if (sum >= total) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  int64_t sum = 0;
  for (int r = 0; r < dp; ++r) {
    m[r] = static_cast<int>(count_at(hi, r));
    sum += m[r];
  }
  // Rounding can leave the sum a little off: add where a micro-batch finishes first, take back
  // where the replica finishes last.
  using Entry = std::pair<double, int>;
  if (sum < total) {
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> first;
    for (int r = 0; r < dp; ++r) first.push({base[r] + slope[r] * (m[r] + 1), r});
    while (sum < total) {
      const int r = first.top().second;
      first.pop();
      ++m[r];
      ++sum;
      first.push({base[r] + slope[r] * (m[r] + 1), r});
    }
  }
  std::priority_queue<Entry> last;
  for (int r = 0; r < dp; ++r) {
    if (m[r] > 1) last.push({base[r] + slope[r] * m[r], r});
  }
  while (sum > total) {
    const int r = last.top().second;
    last.pop();
    --m[r];
    --sum;
    if (m[r] > 1) last.push({base[r] + slope[r] * m[r], r});
  }
  return m;
}

// One replica (pipeline) of a candidate.
struct Replica {
  std::vector<int> groups;          // by stage
  std::vector<int> layers;          // blocks per stage
  std::vector<double> per_micro_s;  // stage time per micro-batch
  std::vector<double> offload_s;    // per step, per stage
  int micro_batches = 0;
  double time_s = 0;  // pipeline + offload
};

struct Candidate {
  bool ok = false;  // false: some replica cannot hold the model (or nothing was evaluated)
  int tp = 0, pp = 0, dp = 0, mbs = 0;
  int used_devices = 0;
  std::vector<Replica> replicas;
  double allreduce_s = 0;
  double step_s = 0;
  double tokens_per_s = 0;
};

// Ranking of candidates: throughput, then the planner rules (micro-batch 1 first, the least
// model parallelism, pp before tp), then fewer devices.
bool Better(const Candidate& a, const Candidate& b) {
  if (!b.ok) return a.ok;
  if (!a.ok) return false;
  if (a.tokens_per_s > b.tokens_per_s * (1 + kTieRelative)) return true;
  if (b.tokens_per_s > a.tokens_per_s * (1 + kTieRelative)) return false;
  if (a.mbs != b.mbs) return a.mbs < b.mbs;
  if (a.tp * a.pp != b.tp * b.pp) return a.tp * a.pp < b.tp * b.pp;
  if (a.pp != b.pp) return a.pp > b.pp;
  return a.used_devices < b.used_devices;
}

class Solver {
 public:
  Solver(const Model& model, const v1::JobSpec& job, std::vector<Device> devices)
      : m_(model), job_(job), devices_(std::move(devices)) {}

  // tp groups of every host, fastest first; devices left over on a host go to `leftover`.
  std::vector<Group> FormGroups(int tp, std::vector<int>* leftover) const {
    std::map<std::pair<std::string, bool>, std::vector<int>> by_host;
    for (int i = 0; i < static_cast<int>(devices_.size()); ++i) {
      const Device& d = devices_[i];
      by_host[{d.source->profile.host(), d.cuda}].push_back(i);  // sorted order is kept
    }
    std::vector<Group> groups;
    for (const auto& [key, members] : by_host) {
      const int full = static_cast<int>(members.size()) / tp * tp;
      for (int start = 0; start < full; start += tp) {
        Group g;
        g.cuda = key.second;
        g.rate = std::numeric_limits<double>::infinity();
        g.net_gbps = g.h2d_gbps = g.intra_gbps = std::numeric_limits<double>::infinity();
        for (int t = 0; t < kTiers; ++t) g.usable[t] = std::numeric_limits<int64_t>::max();
        for (int j = start; j < start + tp; ++j) {
          const Device& d = devices_[members[j]];
          g.members.push_back(members[j]);
          g.rate = std::min(g.rate, d.rate);
          g.net_gbps = std::min(g.net_gbps, d.net_gbps);
          g.h2d_gbps = std::min(g.h2d_gbps, d.h2d_gbps);
          g.intra_gbps = std::min(g.intra_gbps, d.intra_gbps);
          for (int t = 0; t < kTiers; ++t) g.usable[t] = std::min(g.usable[t], d.usable[t]);
        }
        groups.push_back(std::move(g));
      }
      for (int j = full; j < static_cast<int>(members.size()); ++j) leftover->push_back(members[j]);
    }
    std::sort(groups.begin(), groups.end(), [&](const Group& a, const Group& b) {
      if (a.rate != b.rate) return a.rate > b.rate;
      return devices_[a.members[0]].source->id < devices_[b.members[0]].source->id;
    });
    return groups;
  }

  // How many of the fastest groups to try using: the ends of the largest speed drops, and all.
  static std::vector<int> Prefixes(const std::vector<Group>& groups) {
    std::vector<std::pair<double, int>> drops;  // (ratio, end of the faster class)
    for (int i = 1; i < static_cast<int>(groups.size()); ++i) {
      const double ratio = groups[i].rate / groups[i - 1].rate;
      if (ratio < kSpeedClassDrop) drops.push_back({ratio, i});
    }
    std::sort(drops.begin(), drops.end());
    if (drops.size() > kMaxPrefixes - 1) drops.resize(kMaxPrefixes - 1);
    std::vector<int> out = {static_cast<int>(groups.size())};
    for (const auto& d : drops) out.push_back(d.second);
    std::sort(out.begin(), out.end());
    return out;
  }

  // dp replicas of pp groups from the first dp·pp groups, balanced by summed speed (greedy:
  // fastest group first onto the replica with the least speed that still has room). Stages of a
  // replica run fastest first.
  static std::vector<std::vector<int>> FormReplicas(const std::vector<Group>& groups, int dp,
                                                    int pp) {
    std::vector<std::vector<int>> replicas(dp);
    if (pp == 1) {
      for (int r = 0; r < dp; ++r) replicas[r].push_back(r);
      return replicas;
    }
    using Entry = std::pair<double, int>;  // (summed rate, replica): least first, then index
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> open;
    for (int r = 0; r < dp; ++r) open.push({0.0, r});
    for (int gi = 0; gi < dp * pp; ++gi) {
      auto [sum, r] = open.top();
      open.pop();
      replicas[r].push_back(gi);
      if (static_cast<int>(replicas[r].size()) < pp) open.push({sum + groups[gi].rate, r});
    }
    return replicas;
  }

  // Predicted step of one (tp, pp, dp, mbs) on the given replicas.
  Candidate Evaluate(const std::vector<Group>& groups,
                     const std::vector<std::vector<int>>& replica_groups, int tp, int pp, int mbs) {
    Candidate c;
    c.tp = tp;
    c.pp = pp;
    c.dp = static_cast<int>(replica_groups.size());
    c.mbs = mbs;
    c.used_devices = c.dp * pp * tp;
    const double tokens = mbs * m_.T;
    const double act_msg = tokens * m_.C * kActivationBytes;  // one stage boundary, one way
    double net_min = std::numeric_limits<double>::infinity();
    double grad_bytes_max = 0;
    std::vector<double> base, slope;
    std::vector<double> a(pp), e(pp);
    std::vector<int> cap(pp);
    c.replicas.resize(c.dp);
    for (int r = 0; r < c.dp; ++r) {
      Replica& rep = c.replicas[r];
      rep.groups = replica_groups[r];
      for (int s = 0; s < pp; ++s) {
        const Group& g = groups[rep.groups[s]];
        net_min = std::min(net_min, g.net_gbps);
        // Megatron tensor parallelism: 2 all-reduces of the (tokens, C) activations forward and
        // 2 backward per block, ring inside the host.
        const double tp_comm =
            tp > 1 ? 4.0 * 2.0 * (tp - 1) / tp * act_msg / (g.intra_gbps * 1e9) : 0.0;
        a[s] = tokens * m_.costs.block_flops_per_token / (tp * g.rate) + tp_comm;
        e[s] = 0;
        if (s == pp - 1) e[s] += tokens * m_.costs.head_flops_per_token / (tp * g.rate);
        if (s < pp - 1) {
          // Activations forward and their gradients backward over the slower host's network.
          const double bw = std::min(g.net_gbps, groups[rep.groups[s + 1]].net_gbps);
          e[s] += 2.0 * (act_msg / (bw * 1e9) + kP2pLatencyS);
        }
      }
      bool placed = false;
      for (bool spill : {false, true}) {
        for (int s = 0; s < pp; ++s) {
          cap[s] = LayerCap(m_, groups[rep.groups[s]], s, pp, tp, mbs, spill);
        }
        if (SplitInto(m_.L, a, e, cap, &rep.layers)) {
          placed = true;
          break;
        }
      }
      if (!placed) return c;
      rep.per_micro_s.resize(pp);
      rep.offload_s.resize(pp);
      double sum = 0, slowest = 0, offload = 0;
      for (int s = 0; s < pp; ++s) {
        const Group& g = groups[rep.groups[s]];
        rep.per_micro_s[s] = a[s] * rep.layers[s] + e[s];
        sum += rep.per_micro_s[s];
        slowest = std::max(slowest, rep.per_micro_s[s]);
        const StageBytes sb = BytesFor(m_, rep.layers[s], s, pp, tp, mbs);
        Placed p;
        Place(sb, g.cuda, g.usable, &p);  // fits: the caps were checked with these bytes
        rep.offload_s[s] = OffloadSeconds(p, g.cuda, g.h2d_gbps);
        offload = std::max(offload, rep.offload_s[s]);
        grad_bytes_max = std::max(grad_bytes_max, static_cast<double>(sb.bytes[kGrads]));
      }
      // 1F1B: (m - 1)·slowest + sum, plus the spilled states' traffic once per step.
      base.push_back(sum - slowest + offload);
      slope.push_back(slowest);
    }
    const int total_micro = job_.global_batch() / mbs;
    const std::vector<int> micro = DistributeMicroBatches(base, slope, total_micro);
    double slowest_replica = 0;
    for (int r = 0; r < c.dp; ++r) {
      Replica& rep = c.replicas[r];
      rep.micro_batches = micro[r];
      rep.time_s = base[r] + slope[r] * micro[r];
      slowest_replica = std::max(slowest_replica, rep.time_s);
    }
    // Data-parallel ring all-reduce of every device's gradients over the slowest link, after the
    // last backward (not overlapped); with pp > 1 also the tied wte between first and last stage.
    if (c.dp > 1) c.allreduce_s = 2.0 * (c.dp - 1) / c.dp * grad_bytes_max / (net_min * 1e9);
    if (pp > 1) c.allreduce_s += m_.V * m_.C / tp * m_.bytes[kGrads] / (net_min * 1e9);
    c.step_s = slowest_replica + c.allreduce_s;
    c.tokens_per_s = job_.global_batch() * m_.T / c.step_s;
    c.ok = std::isfinite(c.tokens_per_s) && c.tokens_per_s > 0;
    return c;
  }

  // Enumerates (tp, prefix, pp, mbs) and keeps the best candidate and the groups it uses.
  void Search() {
    const int heads = static_cast<int>(m_.H);
    const int batch = job_.global_batch();
    const int max_mbs =
        job_.max_micro_batch() > 0 ? std::min(job_.max_micro_batch(), batch) : batch;
    // Divisors of the batch up to the cap, smallest first: sum(micro-batches) x mbs = batch.
    std::vector<int> mbs_values;
    for (int b = 1; static_cast<int64_t>(b) * b <= batch; ++b) {
      if (batch % b != 0) continue;
      if (b <= max_mbs) mbs_values.push_back(b);
      if (batch / b != b && batch / b <= max_mbs) mbs_values.push_back(batch / b);
    }
    std::sort(mbs_values.begin(), mbs_values.end());
    std::map<std::pair<std::string, bool>, int> per_host;
    for (const Device& d : devices_) ++per_host[{d.source->profile.host(), d.cuda}];
    int largest_host = 0;
    for (const auto& [key, n] : per_host) largest_host = std::max(largest_host, n);
    // A fixed world: only layouts that use every device (all groups, none left over, dp·pp of
    // them exactly) are weighed, and the early stops that skip worse candidates stay off.
    const bool all = job_.place_all();
    for (int tp = 1; tp <= heads && tp <= largest_host; ++tp) {
      if (heads % tp != 0 || (job_.max_tp() > 0 && tp > job_.max_tp())) continue;
      std::vector<int> leftover;
      std::vector<Group> groups = FormGroups(tp, &leftover);
      if (groups.empty() || (all && !leftover.empty())) continue;
      const std::vector<int> prefixes =
          all ? std::vector<int>{static_cast<int>(groups.size())} : Prefixes(groups);
      for (int prefix : prefixes) {
        int max_pp = std::min(m_.L, prefix);
        if (job_.max_pp() > 0) max_pp = std::min(max_pp, job_.max_pp());
        Candidate best_pp;
        int pp_misses = 0;
        for (int pp = 1; pp <= max_pp && (all || pp_misses < kPatience); ++pp) {
          if (all && prefix % pp != 0) continue;
          Candidate best_mbs;
          int mbs_misses = 0;
          for (int mbs : mbs_values) {
            const int dp = std::min(prefix / pp, batch / mbs);
            if (dp < 1 || (all && dp * pp != prefix)) break;
            const std::vector<std::vector<int>> replicas = FormReplicas(groups, dp, pp);
            Candidate c = Evaluate(groups, replicas, tp, pp, mbs);
            if (!c.ok) break;  // a larger micro-batch needs more memory still
            if (Better(c, best_mbs)) {
              best_mbs = std::move(c);
              mbs_misses = 0;
            } else if (++mbs_misses >= kPatience && !all) {
              break;
            }
          }
          if (!best_mbs.ok) continue;  // too little memory at this pp: try deeper pipelines
          if (Better(best_mbs, best_pp)) {
            best_pp = std::move(best_mbs);
            pp_misses = 0;
          } else {
            ++pp_misses;
          }
        }
        if (Better(best_pp, best_)) {
          best_ = std::move(best_pp);
          best_groups_ = groups;
          best_leftover_ = leftover;
        }
      }
    }
  }

  const Candidate& best() const { return best_; }
  const std::vector<Group>& best_groups() const { return best_groups_; }
  // Devices of the best tp that formed no group (fewer than tp left on their host).
  const std::vector<int>& best_leftover() const { return best_leftover_; }
  const std::vector<Device>& devices() const { return devices_; }

 private:
  const Model& m_;
  const v1::JobSpec& job_;
  std::vector<Device> devices_;
  Candidate best_;
  std::vector<Group> best_groups_;
  std::vector<int> best_leftover_;
};

absl::Status BadJob(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

absl::Status CheckJob(const v1::JobSpec& job) {
  const v1::ModelSpec& m = job.model();
  const struct {
    int64_t v;
    const char* name;
  } positive[] = {
      {m.n_layer(), "job.model.n_layer"},       {m.n_head(), "job.model.n_head"},
      {m.n_embd(), "job.model.n_embd"},         {m.block_size(), "job.model.block_size"},
      {m.vocab_size(), "job.model.vocab_size"}, {job.global_batch(), "job.global_batch"}};
  for (const auto& p : positive) {
    if (p.v < 1) return BadJob(p.name, absl::StrCat("must be >= 1, got ", p.v));
  }
  if (m.n_embd() % m.n_head() != 0) {
    return BadJob("job.model.n_embd", absl::StrCat("must be a multiple of job.model.n_head (",
                                                   m.n_head(), "), got ", m.n_embd()));
  }
  const struct {
    double v;
    const char* name;
  } bytes[] = {{m.param_bytes(), "job.model.param_bytes"},
               {m.grad_bytes(), "job.model.grad_bytes"},
               {m.optimizer_bytes(), "job.model.optimizer_bytes"}};
  for (const auto& b : bytes) {
    if (!std::isfinite(b.v) || b.v < 0 || b.v > 64) {
      return BadJob(b.name, absl::StrCat("must be in [0, 64], got ", b.v));
    }
  }
  if (m.param_bytes() <= 0) {
    return BadJob("job.model.param_bytes", absl::StrCat("must be > 0, got ", m.param_bytes()));
  }
  const struct {
    int64_t v;
    const char* name;
  } limits[] = {{job.max_tp(), "job.max_tp"},
                {job.max_pp(), "job.max_pp"},
                {job.max_micro_batch(), "job.max_micro_batch"}};
  for (const auto& l : limits) {
    if (l.v < 0) return BadJob(l.name, absl::StrCat("must be >= 0 (0: no limit), got ", l.v));
  }
  return absl::OkStatus();
}

absl::Status CheckOptions(const SolverOptions& o) {
  if (!(o.compute_efficiency > 0 && o.compute_efficiency <= 1)) {
    return BadJob("options.compute_efficiency",
                  absl::StrCat("must be in (0, 1], got ", o.compute_efficiency));
  }
  if (!(o.memory_headroom > 0 && o.memory_headroom <= 1)) {
    return BadJob("options.memory_headroom",
                  absl::StrCat("must be in (0, 1], got ", o.memory_headroom));
  }
  if (!(o.balance_tolerance >= 0) || !std::isfinite(o.balance_tolerance)) {
    return BadJob("options.balance_tolerance",
                  absl::StrCat("must be >= 0, got ", o.balance_tolerance));
  }
  return absl::OkStatus();
}

int64_t Usable(int64_t bytes, double headroom) {
  return static_cast<int64_t>(
      std::floor(static_cast<double>(std::max<int64_t>(bytes, 0)) * headroom));
}

double PositiveOr(double v, double fallback) { return std::isfinite(v) && v > 0 ? v : fallback; }

// Why nothing fits, with the shortfall in bytes when the devices together are too small.
absl::Status NothingFits(const Model& m, const std::vector<Device>& devices,
                         const SolverOptions& options) {
  const double need_d = std::ceil(m.total_params * m.costs.state_bytes_per_param);
  int64_t hold = 0;
  int64_t largest = 0;
  for (const Device& d : devices) {
    const int64_t h = (d.cuda ? d.usable[kGpu] : 0) + d.usable[kHost] + d.usable[kDisk];
    hold += h;
    largest = std::max(largest, h);
  }
  if (need_d > static_cast<double>(hold)) {
    const int64_t need = static_cast<int64_t>(need_d);
    return absl::ResourceExhaustedError(
        absl::StrCat("the model needs ", need, " bytes of state; all ", devices.size(),
                     " devices together hold at most ", hold, " (short by ", need - hold, " bytes)",
                     options.allow_disk ? "" : " without the disk tier"));
  }
  const double block_bytes = m.costs.block_params * m.costs.state_bytes_per_param;
  return absl::ResourceExhaustedError(absl::StrCat(
      "the model needs ", static_cast<int64_t>(need_d),
      " bytes of state and the devices together hold ", hold,
      ", but no arrangement into tensor-parallel groups and pipelines fits: the largest device "
      "holds at most ",
      largest, " bytes, one block's state is ", static_cast<int64_t>(std::ceil(block_bytes)),
      " bytes and its activations for one sequence ",
      static_cast<int64_t>(std::ceil(m.T * m.costs.block_activation_bytes_per_token)),
      " bytes; the embeddings alone need ",
      static_cast<int64_t>(std::ceil(m.costs.embedding_params * m.costs.state_bytes_per_param)),
      " bytes"));
}

std::string FormatTokens(double v) {
  if (v >= 1e6) return absl::StrFormat("%.2fM", v / 1e6);
  if (v >= 1e3) return absl::StrFormat("%.1fk", v / 1e3);
  return absl::StrFormat("%.1f", v);
}

void FillTiers(const int64_t v[kTiers], v1::MemoryTiers* out) {
  out->set_gpu_bytes(v[kGpu]);
  out->set_host_bytes(v[kHost]);
  out->set_disk_bytes(v[kDisk]);
}

}  // namespace

GptShape ShapeOf(const v1::ModelSpec& model) {
  GptShape s;
  s.n_layer = model.n_layer();
  s.n_head = model.n_head();
  s.n_embd = model.n_embd();
  s.block_size = model.block_size();
  s.vocab_size = model.vocab_size();
  return s;
}

ModelCosts ComputeModelCosts(const v1::ModelSpec& model) {
  // Every figure from the one place that states the model's arithmetic.
  const GptShape s = ShapeOf(model);
  ModelCosts c;
  c.block_params = static_cast<double>(GptBlockParameters(s));
  c.embedding_params = static_cast<double>(GptEmbeddingParameters(s));
  c.final_params = static_cast<double>(GptFinalParameters(s));
  c.block_flops_per_token = GptBlockFlopsPerToken(s);
  c.head_flops_per_token = GptHeadFlopsPerToken(s);
  c.block_activation_bytes_per_token = GptBlockActivationBytesPerToken(s);
  c.state_bytes_per_param = model.param_bytes() + model.grad_bytes() + model.optimizer_bytes();
  return c;
}

absl::StatusOr<std::vector<int>> SplitLayers(int n_layer,
                                             const std::vector<double>& seconds_per_layer,
                                             const std::vector<double>& extra_seconds,
                                             const std::vector<int>& max_layers) {
  const size_t k = seconds_per_layer.size();
  if (k == 0) return absl::InvalidArgumentError("SplitLayers: no stages");
  if (extra_seconds.size() != k || max_layers.size() != k) {
    return absl::InvalidArgumentError(
        absl::StrCat("SplitLayers: seconds_per_layer has ", k, " stages but extra_seconds has ",
                     extra_seconds.size(), " and max_layers ", max_layers.size()));
  }
  if (n_layer < static_cast<int>(k)) {
    return absl::InvalidArgumentError(absl::StrCat("SplitLayers: n_layer (", n_layer,
                                                   ") must be >= the number of stages (", k, ")"));
  }
  for (size_t i = 0; i < k; ++i) {
    if (!std::isfinite(seconds_per_layer[i]) || seconds_per_layer[i] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("SplitLayers: seconds_per_layer[", i,
                                                     "] must be finite and > 0, got ",
                                                     seconds_per_layer[i]));
    }
    if (!std::isfinite(extra_seconds[i]) || extra_seconds[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SplitLayers: extra_seconds[", i, "] must be finite and >= 0, got ", extra_seconds[i]));
    }
  }
  std::vector<int> out;
  if (!SplitInto(n_layer, seconds_per_layer, extra_seconds, max_layers, &out)) {
    int64_t cap_sum = 0;
    for (int c : max_layers) cap_sum += std::max(c, 0);
    return absl::ResourceExhaustedError(absl::StrCat("SplitLayers: the stages hold at most ",
                                                     cap_sum, " of ", n_layer,
                                                     " blocks (every stage needs at least one)"));
  }
  return out;
}

double PipelineStepSeconds(const std::vector<double>& stage_seconds_per_micro, int micro_batches) {
  if (stage_seconds_per_micro.empty() || micro_batches <= 0) return 0;
  double sum = 0, slowest = 0;
  for (double s : stage_seconds_per_micro) {
    sum += s;
    slowest = std::max(slowest, s);
  }
  return (micro_batches - 1) * slowest + sum;
}

absl::StatusOr<v1::Layout> SolveLayout(const std::vector<SolverDevice>& devices,
                                       const v1::JobSpec& job, const SolverOptions& options) {
  if (devices.empty()) return absl::InvalidArgumentError("devices: the device list is empty");
  absl::Status s = CheckJob(job);
  if (!s.ok()) return s;
  if (!(s = CheckOptions(options)).ok()) return s;

  Model m;
  m.C = job.model().n_embd();
  m.H = job.model().n_head();
  m.T = job.model().block_size();
  m.V = job.model().vocab_size();
  m.L = job.model().n_layer();
  m.shape = ShapeOf(job.model());
  m.costs = ComputeModelCosts(job.model());
  m.bytes[0] = job.model().param_bytes();
  m.bytes[1] = job.model().grad_bytes();
  m.bytes[2] = job.model().optimizer_bytes();
  m.total_params = static_cast<double>(GptParameters(m.shape));

  // Sorted by speed, then id: every later step walks this order, so the input order of
  // `devices` cannot change the result.
  std::vector<Device> usable;
  std::vector<std::string> unusable;
  for (const SolverDevice& sd : devices) {
    const v1::DeviceProfile& p = sd.profile;
    Device d;
    d.source = &sd;
    d.cuda = p.kind() == v1::DEVICE_KIND_CUDA;
    double gflops = std::isfinite(p.fp32_gflops()) ? p.fp32_gflops() : 0;
    if (d.cuda && std::isfinite(p.bf16_gflops())) gflops = std::max(gflops, p.bf16_gflops());
    d.rate = gflops * 1e9 * options.compute_efficiency;
    d.budget[kGpu] = p.memory().gpu_bytes();
    d.budget[kHost] = p.memory().host_bytes();
    d.budget[kDisk] = p.memory().disk_bytes();
    d.usable[kGpu] = d.cuda ? Usable(d.budget[kGpu], options.memory_headroom) : 0;
    d.usable[kHost] = Usable(d.budget[kHost], options.memory_headroom);
    d.usable[kDisk] = options.allow_disk ? Usable(d.budget[kDisk], options.memory_headroom) : 0;
    d.net_gbps = PositiveOr(p.net_gbps(), kDefaultNetGbps);
    d.h2d_gbps = PositiveOr(p.h2d_gbps(), kDefaultH2dGbps);
    d.intra_gbps =
        d.cuda ? kGpuIntraHostGbps : PositiveOr(p.host_copy_gbps(), kDefaultHostCopyGbps);
    const bool known_kind = p.kind() == v1::DEVICE_KIND_CPU || d.cuda;
    if (!known_kind || !(d.rate > 0)) {
      unusable.push_back(sd.id);
      continue;
    }
    usable.push_back(d);
  }
  std::sort(usable.begin(), usable.end(), [](const Device& a, const Device& b) {
    if (a.rate != b.rate) return a.rate > b.rate;
    return a.source->id < b.source->id;
  });
  for (size_t i = 1; i < usable.size(); ++i) {
    if (usable[i].source->id == usable[i - 1].source->id) {
      return absl::InvalidArgumentError(
          absl::StrCat("devices: the id \"", usable[i].source->id, "\" appears twice"));
    }
  }
  if (usable.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("devices: none of the ", devices.size(),
                     " devices is usable (each needs a known kind and a positive GEMM rate)"));
  }

  if (job.place_all() && !unusable.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "devices: the job must place all ", devices.size(), " workers (job.place_all), but ",
        unusable.size(), " are unusable (each needs a known kind and a positive GEMM rate): ",
        absl::StrJoin(unusable, ", ")));
  }
  std::vector<Device> all_usable = usable;
  Solver solver(m, job, std::move(usable));
  solver.Search();
  const Candidate& best = solver.best();
  if (!best.ok && job.place_all()) {
    // Say whether the devices could train the job at all, leaving some out.
    v1::JobSpec some = job;
    some.set_place_all(false);
    absl::StatusOr<v1::Layout> without = SolveLayout(devices, some, options);
    if (!without.ok()) return without.status();
    return absl::ResourceExhaustedError(absl::StrCat(
        "no layout uses all ", devices.size(), " workers as the job asks (job.place_all: tp x pp ",
        "x dp must equal the workers, each replica must hold its share of the model and get at "
        "least one micro-batch of the global batch of ", job.global_batch(),
        "); leaving some out, the solver would choose ", without->summary()));
  }
  if (!best.ok) return NothingFits(m, all_usable, options);

  // The layout of the winner.
  const std::vector<Group>& groups = solver.best_groups();
  const std::vector<Device>& devs = solver.devices();
  v1::Layout layout;
  layout.set_tp(best.tp);
  layout.set_pp(best.pp);
  layout.set_dp(best.dp);
  layout.set_micro_batch_size(best.mbs);
  std::vector<bool> placed(devs.size(), false);
  int spilled = 0;
  const double tokens = best.mbs * m.T;
  for (int r = 0; r < best.dp; ++r) {
    const Replica& rep = best.replicas[r];
    v1::Pipeline* pipe = layout.add_pipelines();
    pipe->set_replica(r);
    pipe->set_micro_batches(rep.micro_batches);
    pipe->set_predicted_time_s(rep.time_s);
    int first = 0;
    for (int st = 0; st < best.pp; ++st) {
      const Group& g = groups[rep.groups[st]];
      v1::Stage* stage = pipe->add_stages();
      stage->set_index(st);
      stage->set_first_layer(first);
      stage->set_end_layer(first + rep.layers[st]);
      stage->set_has_embedding(st == 0);
      stage->set_has_head(st == best.pp - 1);
      stage->set_predicted_time_s(rep.micro_batches * rep.per_micro_s[st]);
      first += rep.layers[st];
      const StageBytes sb = BytesFor(m, rep.layers[st], st, best.pp, best.tp, best.mbs);
      for (int k = 0; k < best.tp; ++k) {
        const Device& d = devs[g.members[k]];
        placed[g.members[k]] = true;
        stage->add_workers(d.source->id);
        v1::Placement* pl = layout.add_placements();
        pl->set_worker_id(d.source->id);
        pl->set_replica(r);
        pl->set_stage(st);
        pl->set_tp_rank(k);
        Placed p;
        Place(sb, d.cuda, d.usable, &p);  // each member holds at least the group's minimum
        if (p.spilled) ++spilled;
        v1::MemoryPlan* plan = pl->mutable_memory();
        for (int state = 0; state < kStates; ++state) {
          v1::StatePlacement* sp = plan->add_states();
          sp->set_state(kStateNames[state]);
          FillTiers(p.bytes[state], sp->mutable_bytes());
        }
        FillTiers(p.peak, plan->mutable_peak());
        FillTiers(d.budget, plan->mutable_budget());
        double flops = tokens * rep.layers[st] * m.costs.block_flops_per_token;
        if (st == best.pp - 1) flops += tokens * m.costs.head_flops_per_token;
        pl->set_predicted_compute_s(rep.micro_batches * flops / (best.tp * d.rate));
      }
    }
  }
  std::vector<std::string> unused = unusable;
  for (size_t i = 0; i < devs.size(); ++i) {
    if (!placed[i]) unused.push_back(devs[i].source->id);
  }
  std::sort(unused.begin(), unused.end());
  for (const std::string& id : unused) layout.add_unused_workers(id);
  const int leftover = static_cast<int>(solver.best_leftover().size());
  const int not_worth = static_cast<int>(unused.size() - unusable.size()) - leftover;
  std::vector<std::string> why;
  if (leftover > 0) why.push_back(absl::StrCat(leftover, " short of a tp group on their host"));
  if (not_worth > 0) {
    why.push_back(absl::StrCat(not_worth,
                               " would not raise throughput (slower, slow links, "
                               "or no pipeline or batch share left)"));
  }
  if (!unusable.empty()) why.push_back(absl::StrCat(unusable.size(), " unusable"));
  layout.set_predicted_step_s(best.step_s);
  layout.set_predicted_tokens_per_s(best.tokens_per_s);
  layout.set_summary(absl::StrFormat(
      "tp=%d pp=%d dp=%d mbs=%d on %d of %d devices: %s tokens/s, step %.4g s (all-reduce %.3g s)"
      "%s%s",
      best.tp, best.pp, best.dp, best.mbs, best.used_devices, static_cast<int>(devices.size()),
      FormatTokens(best.tokens_per_s), best.step_s, best.allreduce_s,
      unused.empty() ? ""
                     : absl::StrFormat("; %d unused: %s", static_cast<int>(unused.size()),
                                       absl::StrJoin(why, ", ")),
      spilled > 0 ? absl::StrFormat("; %d devices spill states to slower tiers", spilled) : ""));
  return layout;
}

}  // namespace shoal::scheduler
