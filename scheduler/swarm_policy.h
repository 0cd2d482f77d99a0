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
//   3. Otherwise the stage of lowest capacity, ties to the lower index. A stage's capacity is the
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
