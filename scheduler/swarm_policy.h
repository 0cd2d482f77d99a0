// Where a peer joining a swarm should serve, and what serving a stage costs it in memory.
//
// A swarm's training throughput is that of its weakest stage (ALGORITHMS.md §2.8: Petals measures
// a block's throughput as the sum of its servers', the swarm's as the minimum over blocks). So a
// joiner goes where it raises that minimum: ChooseStage sends it to the weakest stage whose state
// fits in its memory. SwarmStageBytes says what a stage's state is: the parameters of its blocks
// (plus the embeddings on the first stage, the final LayerNorm and the tied head on the last),
// their gradients and AdamW's two moments, plus the activations it keeps while serving.
//
// Pure functions of their arguments: no clock, no I/O, no proto. Thread-safe.
#ifndef SHOAL_SCHEDULER_SWARM_POLICY_H_
#define SHOAL_SCHEDULER_SWARM_POLICY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gpt_arithmetic.h"

namespace shoal::scheduler {

// --- Where a joiner goes ------------------------------------------------------------------------

// One stage as the coordinator sees it when a peer joins.
struct SwarmStageLoad {
  int index = 0;                            // the stage's index (unique among the stages)
  int64_t bytes = 0;                        // what a peer needs to serve it (SwarmStageBytes)
  std::vector<double> serving_throughputs;  // each serving peer's measured throughput (samples/s)
  int syncing_peers = 0;                    // peers still downloading its state, not serving yet
};

struct SwarmStageChoice {
  int index = 0;        // the chosen stage's index
  bool empty = false;   // it had no peer at all, serving or syncing
  double capacity = 0;  // its throughput counting syncing peers as pending (see ChooseStage)
};

// The stage a joiner with `joiner_free_bytes` of memory should serve:
//   1. Stages whose `bytes` exceed the joiner's memory are out.
//   2. An empty stage (no serving and no syncing peer) comes first: the swarm cannot train until
//      every stage has someone. The lowest index among them.
//   3. Then a stage held by a single peer (serving or syncing) whose capacity is within
//      1 / kJoinBalanceQuality of the lowest capacity (rule 4's) among the stages left, the
//      lowest such, ties to the lower index. A stage on one peer is one failure from a rollback
//      (every stage's step redone from the newest checkpoint), and a joiner sent there instead
//      of to the weakest stage costs the bottleneck less than the rebalancer would move a peer
//      to win back.
//   4. Otherwise the stage of lowest capacity, ties to the lower index. A stage's capacity is the
//      sum of its serving peers' throughputs plus, for each syncing peer, the throughput it is
//      expected to bring: the mean of the stage's serving peers, or where the stage has none, the
//      mean of every serving peer of the swarm (1 if nobody serves yet). Counting syncing peers as
//      pending capacity keeps a burst of joiners from piling onto the one stage that was empty
//      when the first of them arrived: once a joiner syncs there, that stage is no longer empty,
//      and the next joiner goes to whichever stage is then the weakest.
// kInvalidArgument for no stages, a repeated or negative index, negative bytes or syncing count, a
// throughput that is not finite and >= 0, or negative free bytes; kResourceExhausted, naming the
// joiner's free bytes and the smallest stage's need, when no stage fits.
absl::StatusOr<SwarmStageChoice> ChooseStage(const std::vector<SwarmStageLoad>& stages,
                                             int64_t joiner_free_bytes);

// ChooseStage's rule 3: the rebalancer's default balance quality (Petals' 0.75).
inline constexpr double kJoinBalanceQuality = 0.75;

// --- When a peer moves (the rebalancer) --------------------------------------------------------

// A serving peer as the rebalancer sees it.
struct SwarmPoolPeer {
  std::string id;
  double throughput = 0;          // measured samples/s (the router's EMA)
  int64_t free_bytes = 0;         // memory it can give a stage
  double state_bytes_per_s = 0;   // how fast it can pull a stage's state (its link); 0: unknown
  int64_t moved_at_period = -1;   // the check at which it last moved; -1: never
};

struct SwarmPool {
  int index = 0;                  // the stage's index (unique)
  int64_t bytes = 0;              // what a peer needs to serve it (SwarmStageBytes)
  std::vector<SwarmPoolPeer> peers;
};

struct SwarmRebalanceOptions {
  // Move only if the bottleneck's capacity rises by at least 1 / balance_quality (Petals: 0.75).
  double balance_quality = 0.75;
  // Seconds between checks (--rebalance-s); a move must pay back its transfer within one.
  double period_s = 60;
  int wins_needed = 2;            // consecutive checks the same move must win
  int stay_periods = 3;           // a moved peer stays where it went this many checks
};

struct SwarmMove {
  std::string peer;
  int from = 0, to = 0;           // stage indices
  double bottleneck_before = 0;   // the smallest stage capacity now
  double bottleneck_after = 0;    // and once the peer serves its new stage
  double transfer_s = 0;          // its state download (stage bytes / its link)
  double peer_throughput = 0;     // the peer's measured samples/s in its old stage
  std::vector<double> capacities; // every stage's capacity now, in the pools' order
};

// kInvalidArgument naming the rule out of range (BestSwarmMove checks it first).
absl::Status CheckSwarmRebalanceOptions(const SwarmRebalanceOptions& options);

// The move that raises the swarm's bottleneck (its smallest stage capacity, the sum of its peers'
// throughputs) the most: one peer from another stage into the weakest one, where it fits and
// its own stage keeps a peer; and where it passes the rules: the bottleneck gains at least
// 1 / balance_quality, the transfer pays back within a period (while the peer syncs, a donor of
// the weakest stage uploads instead of computing: about one peer's share of that stage for the
// transfer, against the gain over the rest of the period), and the peer did not move in the last
// stay_periods checks. nullopt when none does (ties for the weakest stage included: one move cannot
// raise them all). kInvalidArgument for a bad pool (a repeated index, a throughput not finite
// and >= 0, negative bytes) or options.
absl::StatusOr<std::optional<SwarmMove>> BestSwarmMove(const std::vector<SwarmPool>& pools,
                                                       int64_t period,
                                                       const SwarmRebalanceOptions& options);

// The rebalancer's memory across checks: a move is made only once a move between the same two
// stages has been the best in wins_needed consecutive checks (the peer is the last check's best),
// so one noisy measurement moves nothing.
// Not thread-safe.
class SwarmRebalancer {
 public:
  explicit SwarmRebalancer(SwarmRebalanceOptions options) : options_(options) {}
  // One check, at `period` (increasing): the move to make now, or nullopt.
  absl::StatusOr<std::optional<SwarmMove>> Check(const std::vector<SwarmPool>& pools,
                                                 int64_t period);

 private:
  SwarmRebalanceOptions options_;
  std::optional<SwarmMove> candidate_;
  int wins_ = 0;
};

// --- What a stage costs --------------------------------------------------------------------------

// Bytes per parameter a swarm peer keeps: the fp32 parameter, its gradient and AdamW's two fp32
// moments (4 + 4 + 8).
inline constexpr int64_t kSwarmStateBytesPerParameter = 16;

// Parameters a peer serving blocks [first_block, end_block) of the model holds: those blocks',
// the token and position embeddings when first_block == 0 (the first stage), the final LayerNorm
// and the head when end_block == n_layer (the last stage). The head is tied to the token
// embedding, so a last stage that does not also hold the embeddings keeps its own copy of wte
// (vocab x n_embd); a single stage holding both counts it once. Figures from
// common/gpt_arithmetic.h. kInvalidArgument for a shape with a size < 1, a range that is not
// 0 <= first_block < end_block <= n_layer, or a model too large to count in int64 bytes.
absl::StatusOr<int64_t> SwarmStageParameters(const GptShape& shape, int first_block, int end_block);

// Bytes a peer needs to serve blocks [first_block, end_block): kSwarmStateBytesPerParameter per
// parameter of SwarmStageParameters, plus `activation_bytes` (>= 0), the budget for the
// activations it holds while serving (in flight micro-batches' inputs and recomputed blocks).
// kInvalidArgument as SwarmStageParameters, or for negative activation bytes, or when the total
// overflows int64.
absl::StatusOr<int64_t> SwarmStageBytes(const GptShape& shape, int first_block, int end_block,
                                        int64_t activation_bytes);

// SwarmStageBytes for stage `stage` of a split of the model's blocks into stages
// (blocks_per_stage[s] blocks for stage s, in order, as UniformSplit or the layout's
// BlocksPerStage give): stage s serves the blocks after those of the stages before it.
// kInvalidArgument also when the split has an entry < 1 or does not sum to n_layer, or `stage` is
// outside it. (Not an overload of SwarmStageBytes: a split {4} would silently read as block 4.)
absl::StatusOr<int64_t> SwarmStageBytesInSplit(const GptShape& shape,
                                               const std::vector<int>& blocks_per_stage, int stage,
                                               int64_t activation_bytes);

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_POLICY_H_
