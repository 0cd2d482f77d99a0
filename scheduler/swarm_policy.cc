#include "scheduler/swarm_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace shoal::scheduler {

namespace {

// The largest byte count SwarmStageBytes reports: far above any machine, far enough below
// INT64_MAX that the estimate in double below cannot be off by enough to overflow.
constexpr double kMaxBytes = 4.0e18;

absl::Status CheckShape(const GptShape& s) {
  if (s.n_layer < 1 || s.n_head < 1 || s.n_embd < 1 || s.block_size < 1 || s.vocab_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm stage bytes: every model size must be >= 1, got n_layer ", s.n_layer,
                     ", n_head ", s.n_head, ", n_embd ", s.n_embd, ", block_size ", s.block_size,
                     ", vocab_size ", s.vocab_size));
  }
  // Counted in double first, so that gpt_arithmetic's int64 products are known not to overflow.
  const double c = static_cast<double>(s.n_embd);
  const double all = static_cast<double>(s.n_layer) * (12 * c * c + 13 * c) +
                     2 * static_cast<double>(s.vocab_size + s.block_size) * c + 2 * c;
  if (all * kSwarmStateBytesPerParameter > kMaxBytes) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage bytes: the model (n_layer ",
                                                   s.n_layer, ", n_embd ", s.n_embd, ", vocab ",
                                                   s.vocab_size, ") is too large to count"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SwarmStageChoice> ChooseStage(const std::vector<SwarmStageLoad>& stages,
                                             int64_t joiner_free_bytes) {
  if (stages.empty()) return absl::InvalidArgumentError("choose stage: no stages");
  if (joiner_free_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "choose stage: the joiner's free bytes must be >= 0, got ", joiner_free_bytes));
  }
  std::set<int> seen;
  double swarm_sum = 0;
  int64_t swarm_serving = 0;
  for (const SwarmStageLoad& st : stages) {
    if (st.index < 0 || !seen.insert(st.index).second) {
      return absl::InvalidArgumentError(absl::StrCat("choose stage: stage index ", st.index,
                                                     st.index < 0 ? " is negative" : " repeats"));
    }
    if (st.bytes < 0 || st.syncing_peers < 0) {
      return absl::InvalidArgumentError(absl::StrCat("choose stage: stage ", st.index, ": bytes ",
                                                     st.bytes, " and syncing peers ",
                                                     st.syncing_peers, " must be >= 0"));
    }
    for (double t : st.serving_throughputs) {
      if (!std::isfinite(t) || t < 0) {
        return absl::InvalidArgumentError(absl::StrCat("choose stage: stage ", st.index,
                                                       ": a serving peer's throughput is ", t,
                                                       " (must be finite and >= 0)"));
      }
      swarm_sum += t;
    }
    swarm_serving += static_cast<int64_t>(st.serving_throughputs.size());
  }
  // What a syncing peer of a stage nobody serves yet is expected to bring.
  const double swarm_mean = swarm_serving > 0 ? swarm_sum / swarm_serving : 1.0;

  const SwarmStageLoad* smallest = nullptr;
  std::vector<SwarmStageChoice> fitting;
  std::vector<bool> single;  // per fitting stage: held by one peer, serving or syncing
  double lowest = std::numeric_limits<double>::infinity();
  for (const SwarmStageLoad& st : stages) {
    if (smallest == nullptr || st.bytes < smallest->bytes ||
        (st.bytes == smallest->bytes && st.index < smallest->index)) {
      smallest = &st;
    }
    if (st.bytes > joiner_free_bytes) continue;
    SwarmStageChoice c;
    c.index = st.index;
    c.empty = st.serving_throughputs.empty() && st.syncing_peers == 0;
    double sum = 0;
    for (double t : st.serving_throughputs) sum += t;
    const double expected_syncing =
        st.serving_throughputs.empty() ? swarm_mean : sum / st.serving_throughputs.size();
    c.capacity = sum + st.syncing_peers * expected_syncing;
    if (!c.empty) lowest = std::min(lowest, c.capacity);
    fitting.push_back(c);
    single.push_back(st.serving_throughputs.size() + st.syncing_peers == 1);
  }
  // Rank: empty stages first (rule 2), then single-peer stages near the lowest capacity (rule
  // 3), then the rest; within a rank the lowest capacity, then the lowest index.
  auto rank = [&](size_t i) {
    if (fitting[i].empty) return 0;
    return single[i] && fitting[i].capacity * kJoinBalanceQuality <= lowest ? 1 : 2;
  };
  bool have = false;
  SwarmStageChoice best;
  int best_rank = 0;
  for (size_t i = 0; i < fitting.size(); ++i) {
    const SwarmStageChoice& c = fitting[i];
    const int r = rank(i);
    const bool better = !have || (r != best_rank                   ? r < best_rank
                                  : c.capacity != best.capacity ? c.capacity < best.capacity
                                                                : c.index < best.index);
    if (better) {
      best = c;
      best_rank = r;
      have = true;
    }
  }
  if (!have) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "choose stage: the joiner has ", joiner_free_bytes, " bytes free, and the smallest stage (",
        smallest->index, ") needs ", smallest->bytes, " bytes"));
  }
  return best;
}

absl::StatusOr<int64_t> SwarmStageParameters(const GptShape& shape, int first_block,
                                             int end_block) {
  if (absl::Status s = CheckShape(shape); !s.ok()) return s;
  if (first_block < 0 || end_block <= first_block || end_block > shape.n_layer) {
    return absl::InvalidArgumentError(
        absl::StrCat("swarm stage bytes: blocks [", first_block, ", ", end_block,
                     ") are not a non-empty range of the model's ", shape.n_layer, " blocks"));
  }
  const bool first = first_block == 0, last = end_block == shape.n_layer;
  int64_t params = (end_block - first_block) * GptBlockParameters(shape);
  if (first) params += GptEmbeddingParameters(shape);
  if (last) {
    params += GptFinalParameters(shape);
    // The head's weight is wte: a stage holding the embeddings has it already.
    if (!first) params += shape.vocab_size * shape.n_embd;
  }
  return params;
}

absl::StatusOr<int64_t> SwarmStageBytes(const GptShape& shape, int first_block, int end_block,
                                        int64_t activation_bytes) {
  absl::StatusOr<int64_t> params = SwarmStageParameters(shape, first_block, end_block);
  if (!params.ok()) return params.status();
  if (activation_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm stage bytes: the activation budget must be >= 0 bytes, got ", activation_bytes));
  }
  const int64_t state = *params * kSwarmStateBytesPerParameter;  // <= kMaxBytes (CheckShape)
  if (activation_bytes > std::numeric_limits<int64_t>::max() - state) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage bytes: ", state,
                                                   " state bytes plus an activation budget of ",
                                                   activation_bytes, " overflow int64"));
  }
  return state + activation_bytes;
}

absl::StatusOr<int64_t> SwarmStageBytesInSplit(const GptShape& shape,
                                               const std::vector<int>& blocks_per_stage, int stage,
                                               int64_t activation_bytes) {
  if (stage < 0 || stage >= static_cast<int>(blocks_per_stage.size())) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage bytes: stage ", stage,
                                                   " is not one of the split's ",
                                                   blocks_per_stage.size(), " stages"));
  }
  int64_t total = 0, first = 0;
  for (size_t s = 0; s < blocks_per_stage.size(); ++s) {
    if (blocks_per_stage[s] < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "swarm stage bytes: stage ", s, " of the split has ", blocks_per_stage[s], " blocks"));
    }
    if (static_cast<int>(s) < stage) first += blocks_per_stage[s];
    total += blocks_per_stage[s];
  }
  if (total != shape.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("swarm stage bytes: the split covers ", total,
                                                   " blocks, the model has ", shape.n_layer));
  }
  return SwarmStageBytes(shape, static_cast<int>(first),
                         static_cast<int>(first + blocks_per_stage[stage]), activation_bytes);
}

absl::Status CheckSwarmRebalanceOptions(const SwarmRebalanceOptions& options) {
  if (!(options.balance_quality > 0 && options.balance_quality <= 1) ||
      !(options.period_s > 0 && std::isfinite(options.period_s)) || options.wins_needed < 1 ||
      options.stay_periods < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swarm rebalancer: balance_quality in (0, 1], period_s > 0, wins_needed >= 1, "
        "stay_periods >= 0; got ", options.balance_quality, ", ", options.period_s, ", ",
        options.wins_needed, ", ", options.stay_periods));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<SwarmMove>> BestSwarmMove(const std::vector<SwarmPool>& pools,
                                                       int64_t period,
                                                       const SwarmRebalanceOptions& options) {
  SHOAL_RETURN_IF_ERROR(CheckSwarmRebalanceOptions(options));
  std::vector<double> capacity;
  std::set<int> indices;
  for (const SwarmPool& p : pools) {
    if (!indices.insert(p.index).second || p.bytes < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "swarm rebalancer: stage ", p.index, " is repeated or has negative bytes"));
    }
    double c = 0;
    for (const SwarmPoolPeer& peer : p.peers) {
      if (!(std::isfinite(peer.throughput) && peer.throughput >= 0) ||
          !(std::isfinite(peer.state_bytes_per_s) && peer.state_bytes_per_s >= 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "swarm rebalancer: peer '", peer.id, "' of stage ", p.index, ": throughput ",
            peer.throughput, ", link ", peer.state_bytes_per_s, " bytes/s"));
      }
      c += peer.throughput;
    }
    capacity.push_back(c);
  }
  if (pools.size() < 2) return std::optional<SwarmMove>();
  // The weakest stage; a tie means no single move raises the bottleneck.
  size_t weakest = 0;
  for (size_t s = 1; s < pools.size(); ++s) {
    if (capacity[s] < capacity[weakest]) weakest = s;
  }
  for (size_t s = 0; s < pools.size(); ++s) {
    if (s != weakest && capacity[s] == capacity[weakest]) return std::optional<SwarmMove>();
  }
  const double before = capacity[weakest];
  std::optional<SwarmMove> best;
  for (size_t s = 0; s < pools.size(); ++s) {
    if (s == weakest || pools[s].peers.size() < 2) continue;  // a stage keeps a peer
    for (const SwarmPoolPeer& peer : pools[s].peers) {
      if (peer.free_bytes < pools[weakest].bytes) continue;
      if (peer.moved_at_period >= 0 && period - peer.moved_at_period < options.stay_periods) {
        continue;
      }
      // After the move: the peer's old stage and its new one change, the rest stay.
      double after = capacity[weakest] + peer.throughput;
      for (size_t o = 0; o < pools.size(); ++o) {
        if (o == weakest) continue;
        after = std::min(after, o == s ? capacity[o] - peer.throughput : capacity[o]);
      }
      if (!(after * options.balance_quality >= before) || after <= before) continue;
      const double transfer_s =
          peer.state_bytes_per_s > 0
              ? static_cast<double>(pools[weakest].bytes) / peer.state_bytes_per_s
              : 0;
      // Pays back within a period. While the peer syncs its old stage (above the bottleneck, or
      // the move would not gain) loses nothing that counts, but a donor of the weakest stage
      // uploads the state instead of computing: the bottleneck loses about one of its peers for
      // the transfer, against the gain over the rest of the period.
      const double donor = capacity[weakest] / static_cast<double>(
                                                   std::max<size_t>(1, pools[weakest].peers.size()));
      if (transfer_s >= options.period_s ||
          donor * transfer_s > (after - before) * (options.period_s - transfer_s)) {
        continue;
      }
      if (!best.has_value() || after > best->bottleneck_after ||
          (after == best->bottleneck_after && transfer_s < best->transfer_s)) {
        best = SwarmMove{peer.id, pools[s].index, pools[weakest].index, before, after, transfer_s,
                         peer.throughput, capacity};
      }
    }
  }
  return best;
}

absl::StatusOr<std::optional<SwarmMove>> SwarmRebalancer::Check(const std::vector<SwarmPool>& pools,
                                                               int64_t period) {
  SHOAL_ASSIGN_OR_RETURN(std::optional<SwarmMove> best, BestSwarmMove(pools, period, options_));
  // The same stages (the peer may differ: among equal peers noise picks one or another).
  const bool same = best.has_value() && candidate_.has_value() && best->from == candidate_->from &&
                    best->to == candidate_->to;
  wins_ = best.has_value() ? (same ? wins_ + 1 : 1) : 0;
  candidate_ = best;
  if (!best.has_value() || wins_ < options_.wins_needed) return std::optional<SwarmMove>();
  candidate_.reset();
  wins_ = 0;
  return best;
}

}  // namespace shoal::scheduler
