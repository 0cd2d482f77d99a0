// A job's layout as one validated value: the (tp, pp, dp) mesh, where each rank sits in it, the
// blocks of each rank's pipeline stage, and each replica's share of the batch. Built once, from
// the config (parallel.tp / pp / stages, train.batch_size / grad_accum) or from the coordinator's
// assignment (launch/ converts the proto), checked here and nowhere else, then passed down: the
// mesh's process groups, the stage the step engine builds and the batch plan the sampler and the
// loss scale follow all come from it.
//
// Rank numbering, unless a layout places the ranks (tensor-parallel ranks adjacent, so they share
// a host when a launcher places consecutive ranks together, as torchrun and mpirun do):
//   rank = tp + tp_size * (dp + dp_size * pp)
#ifndef SHOAL_PARALLEL_LAYOUT_H_
#define SHOAL_PARALLEL_LAYOUT_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend.h"

namespace shoal::parallel {

struct MeshShape {
  int tp = 1;
  int pp = 1;
  int dp = 1;
  int size() const { return tp * pp * dp; }
};

struct MeshCoord {
  int tp = 0;
  int pp = 0;
  int dp = 0;
};

// The shape for `world` ranks with the given tp and pp: dp = world / (tp * pp).
// kInvalidArgument naming the numbers when tp or pp < 1 or tp * pp does not divide world.
absl::StatusOr<MeshShape> ShapeForWorld(int world, int tp, int pp);

MeshCoord CoordOf(const MeshShape& shape, int rank);
int RankOf(const MeshShape& shape, const MeshCoord& coord);

// "(tp 2, pp 2, dp 1)".
std::string ToString(const MeshShape& shape);

// `coord` inside `shape`, and `shape` (every degree >= 1) of exactly `world` ranks.
// kInvalidArgument showing the numbers.
absl::Status CheckPlace(const MeshShape& shape, const MeshCoord& coord, int world);

// How the step's micro-batches are shared among the replicas, as this replica sees it.
struct BatchPlan {
  int micro_batch_size = 1;    // sequences per micro-batch
  int micro_batches = 1;       // this replica's micro-batches per step
  int replica = 0;             // this replica, of `replicas`
  int replicas = 1;
  // M: the step's micro-batches over all replicas (replicas x micro_batches for even shares).
  int step_micro_batches = 1;
  // Under a coordinator's layout (replicas of uneven speed get uneven shares) the step's M
  // micro-batches are numbered globally and this replica takes [first_micro_batch,
  // first_micro_batch + micro_batches); -1 with even shares from the config, numbered per
  // replica. Either way a step is the mean over the same M micro-batches.
  int first_micro_batch = -1;
  std::vector<int> shares;     // every replica's micro-batches, when numbered globally

  // Even shares: every replica runs `micro_batches`.
  static BatchPlan Even(int micro_batch_size, int micro_batches, int replica, int replicas);
  bool numbered_globally() const { return first_micro_batch >= 0; }
  // What each micro-batch's loss is scaled by so that the replicas' mean gradient is the mean
  // over all M micro-batches: replicas / M.
  float loss_scale() const {
    return static_cast<float>(replicas) / static_cast<float>(step_micro_batches);
  }
};

// Where one rank sits in a job's layout.
struct Layout {
  MeshShape shape;
  MeshCoord coord;
  int first_block = 0;         // blocks [first_block, end_block) of its pipeline stage (its
  int end_block = 0;           // first chunk's under an interleaved schedule)
  int micro_batch_size = 0;    // its replica's share of the batch
  int micro_batches = 0;
  // Model chunks per rank (parallel.virtual_stages under the interleaved schedule; 1 from a
  // coordinator): chunk c of pipeline stage s is model stage c * pp + s, and the blocks above are
  // chunk 0's.
  int virtual_stages = 1;

  // The rank's own view of it: CheckPlace, a non-empty block range inside the model's
  // `n_layer` blocks (the first stage starting at 0, the last ending at n_layer unless it holds
  // more chunks), and a share of at least one micro-batch of at least one sequence.
  // kInvalidArgument showing the numbers.
  absl::Status Validate(int world, int n_layer) const;
  bool model_parallel() const { return shape.tp > 1 || shape.pp > 1; }
};

// Every rank's layout (index = rank) checked together, after each one's Validate: every place of
// the mesh taken once, the stages covering the blocks in order with the ranks of one stage
// agreeing on its blocks (an activation has the same shape at every boundary, so a wrong split
// would train a wrong model without an error), one micro-batch size, and the ranks of a replica
// agreeing on its share. Returns the batch plan of rank `rank`, numbered globally.
// kInvalidArgument (a rank's own view) or kFailedPrecondition (ranks disagree), naming the ranks.
absl::StatusOr<BatchPlan> ValidateJob(const std::vector<Layout>& all, int rank, int n_layer);

// ValidateJob over the job: every rank all-gathers every rank's layout over `world` (null or one
// rank: just this one). A collective: every rank of `world` calls it.
absl::StatusOr<BatchPlan> AgreeOnLayout(comm::Backend* world, const Layout& mine, int n_layer,
                                        absl::Duration timeout);

// The blocks of every model stage from the config: `stages` (blocks per model stage, summing to
// n_layer) or, when it is empty, UniformSplit. kInvalidArgument when `stages` has another number
// of entries than `model_stages`, or does not cover the blocks with non-empty stages.
absl::StatusOr<std::vector<int>> BlocksPerStage(const std::vector<int>& stages, int n_layer,
                                                int model_stages);
// Blocks [first, end) of model stage `j` of `blocks` (BlocksPerStage's).
std::pair<int, int> StageRange(const std::vector<int>& blocks, int j);

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_LAYOUT_H_
