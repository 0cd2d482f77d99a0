#include "parallel/layout.h"

#include <ATen/ATen.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/gpt_arithmetic.h"
#include "common/status.h"

namespace shoal::parallel {

absl::StatusOr<MeshShape> ShapeForWorld(int world, int tp, int pp) {
  if (tp < 1 || pp < 1 || world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("mesh: tp = ", tp, ", pp = ", pp,
                                                   " and ranks = ", world, " must be >= 1"));
  }
  if (world % (tp * pp) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mesh: ", world, " ranks cannot be split into tensor-parallel groups of ", tp, " x ",
        pp, " pipeline stages (", tp * pp, " does not divide ", world, ")"));
  }
  return MeshShape{tp, pp, world / (tp * pp)};
}

MeshCoord CoordOf(const MeshShape& s, int rank) {
  MeshCoord c;
  c.tp = rank % s.tp;
  c.dp = (rank / s.tp) % s.dp;
  c.pp = rank / (s.tp * s.dp);
  return c;
}

int RankOf(const MeshShape& s, const MeshCoord& c) { return c.tp + s.tp * (c.dp + s.dp * c.pp); }

std::string ToString(const MeshShape& s) {
  return absl::StrCat("(tp ", s.tp, ", pp ", s.pp, ", dp ", s.dp, ")");
}

absl::Status CheckPlace(const MeshShape& shape, const MeshCoord& c, int world) {
  if (shape.tp < 1 || shape.pp < 1 || shape.dp < 1 || shape.size() != world) {
    return absl::InvalidArgumentError(absl::StrCat("mesh ", ToString(shape), " needs ",
                                                   shape.size(), " ranks; the job has ", world));
  }
  if (c.tp < 0 || c.tp >= shape.tp || c.pp < 0 || c.pp >= shape.pp || c.dp < 0 ||
      c.dp >= shape.dp) {
    return absl::InvalidArgumentError(absl::StrCat("mesh ", ToString(shape), ": place tp ", c.tp,
                                                   ", pp ", c.pp, ", dp ", c.dp,
                                                   " is outside the mesh"));
  }
  return absl::OkStatus();
}

BatchPlan BatchPlan::Even(int micro_batch_size, int micro_batches, int replica, int replicas) {
  BatchPlan p;
  p.micro_batch_size = micro_batch_size;
  p.micro_batches = micro_batches;
  p.replica = replica;
  p.replicas = replicas;
  p.step_micro_batches = micro_batches * replicas;
  return p;
}

absl::Status Layout::Validate(int world, int n_layer) const {
  SHOAL_RETURN_IF_ERROR(CheckPlace(shape, coord, world));
  const int s = coord.pp;
  if (!(0 <= first_block && first_block < end_block && end_block <= n_layer &&
        (s != 0 || first_block == 0) &&
        (s != shape.pp - 1 || virtual_stages > 1 || end_block == n_layer))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the layout gives pipeline stage ", s, " of ", shape.pp, " blocks [", first_block, ", ",
        end_block, "), which is not a non-empty range of the model's ", n_layer,
        " blocks (the first stage starts at 0, the last ends at ", n_layer, ")"));
  }
  if (virtual_stages < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("the layout gives ", virtual_stages, " model chunks per rank; at least 1"));
  }
  if (micro_batch_size < 1 || micro_batches < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the layout gives this replica ", micro_batches, " micro-batches of ", micro_batch_size,
        " sequences; both must be >= 1"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BatchPlan> ValidateJob(const std::vector<Layout>& all, int rank, int n_layer) {
  const int world = static_cast<int>(all.size());
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", world));
  }
  const Layout& mine = all[rank];
  const MeshShape& shape = mine.shape;
  for (int r = 0; r < world; ++r) {
    absl::Status s = all[r].Validate(world, n_layer);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("rank ", r, ": ", s.message()));
    if (all[r].shape.tp != shape.tp || all[r].shape.pp != shape.pp ||
        all[r].shape.dp != shape.dp) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's ranks disagree on the mesh: rank ", r, " has ", ToString(all[r].shape),
          ", rank ", rank, " ", ToString(shape)));
    }
  }
  // Every place exactly once.
  std::vector<int> owner(world, -1);
  for (int r = 0; r < world; ++r) {
    const int place = RankOf(shape, all[r].coord);
    if (owner[place] >= 0) {
      const MeshCoord& p = all[r].coord;
      return absl::FailedPreconditionError(absl::StrCat(
          "mesh ", ToString(shape), ": ranks ", owner[place], " and ", r,
          " were both placed at tp ", p.tp, ", pp ", p.pp, ", dp ", p.dp));
    }
    owner[place] = r;
  }
  // The stages cover the blocks in order, each block once; the ranks of a stage agree on it.
  std::vector<std::pair<int, int>> range(shape.pp, {-1, -1});
  for (int r = 0; r < world; ++r) {
    const int stage = all[r].coord.pp;
    const std::pair<int, int> blocks = {all[r].first_block, all[r].end_block};
    if (range[stage].first >= 0 && range[stage] != blocks) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's stages disagree: rank ", r, " has stage ", stage, " with blocks [",
          blocks.first, ", ", blocks.second, "), another rank of it [", range[stage].first, ", ",
          range[stage].second, ")"));
    }
    range[stage] = blocks;
  }
  for (int stage = 0; stage < shape.pp; ++stage) {
    const int expected_first = stage == 0 ? 0 : range[stage - 1].second;
    if (range[stage].first != expected_first) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's stages do not cover the model's ", n_layer, " blocks in order: stage ",
          stage, " has [", range[stage].first, ", ", range[stage].second, ")"));
    }
  }
  // One micro-batch size; the ranks of a replica agree on its share.
  std::vector<int> share(shape.dp, -1);
  for (int r = 0; r < world; ++r) {
    const Layout& l = all[r];
    const int replica = l.coord.dp;
    if (l.micro_batch_size != mine.micro_batch_size ||
        (share[replica] >= 0 && share[replica] != l.micro_batches)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's batch plan is inconsistent: rank ", r, " has replica ", replica,
          " with ", l.micro_batches, " micro-batches of ", l.micro_batch_size,
          " sequences; rank ", rank, " has replica ", mine.coord.dp, " with ",
          mine.micro_batches, " of ", mine.micro_batch_size));
    }
    share[replica] = l.micro_batches;
  }
  BatchPlan plan;
  plan.micro_batch_size = mine.micro_batch_size;
  plan.micro_batches = mine.micro_batches;
  plan.replica = mine.coord.dp;
  plan.replicas = shape.dp;
  plan.step_micro_batches = 0;
  plan.first_micro_batch = 0;
  plan.shares = share;
  for (int d = 0; d < shape.dp; ++d) {
    // Every replica has a rank: the places are all taken.
    if (d < plan.replica) plan.first_micro_batch += share[d];
    plan.step_micro_batches += share[d];
  }
  return plan;
}

absl::StatusOr<BatchPlan> AgreeOnLayout(comm::Backend* world, const Layout& mine, int n_layer,
                                        absl::Duration timeout) {
  // Every rank's (shape, place, blocks, share) as ten integers.
  constexpr int kFields = 10;
  const std::vector<int64_t> row = {mine.shape.tp,    mine.shape.pp,      mine.shape.dp,
                                    mine.coord.tp,    mine.coord.pp,      mine.coord.dp,
                                    mine.first_block, mine.end_block,     mine.micro_batch_size,
                                    mine.micro_batches};
  const int n = world != nullptr ? world->size() : 1;
  const int rank = world != nullptr ? world->rank() : 0;
  std::vector<int64_t> table = row;
  if (n > 1) {
    at::Tensor all = at::empty({kFields * n}, at::kLong);
    SHOAL_RETURN_IF_ERROR(world->AllGather(all, at::tensor(row, at::kLong), {timeout})->Wait());
    table.assign(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + kFields * n);
  }
  std::vector<Layout> layouts(n);
  for (int r = 0; r < n; ++r) {
    const int64_t* f = table.data() + kFields * r;
    Layout& l = layouts[r];
    l.shape = {static_cast<int>(f[0]), static_cast<int>(f[1]), static_cast<int>(f[2])};
    l.coord = {static_cast<int>(f[3]), static_cast<int>(f[4]), static_cast<int>(f[5])};
    l.first_block = static_cast<int>(f[6]);
    l.end_block = static_cast<int>(f[7]);
    l.micro_batch_size = static_cast<int>(f[8]);
    l.micro_batches = static_cast<int>(f[9]);
  }
  return ValidateJob(layouts, rank, n_layer);
}

absl::StatusOr<std::vector<int>> BlocksPerStage(const std::vector<int>& stages, int n_layer,
                                                int model_stages) {
  std::vector<int> blocks = stages.empty() ? UniformSplit(n_layer, model_stages) : stages;
  int sum = 0;
  bool positive = true;
  for (int b : blocks) {
    sum += b;
    positive = positive && b > 0;
  }
  if (static_cast<int>(blocks.size()) != model_stages || sum != n_layer || !positive) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parallel.stages = [", absl::StrJoin(blocks, ", "), "] does not split the model's ",
        n_layer, " blocks over ", model_stages, " model stages, each with at least one"));
  }
  return blocks;
}

std::pair<int, int> StageRange(const std::vector<int>& blocks, int j) {
  int first = 0;
  for (int i = 0; i < j; ++i) first += blocks[i];
  return {first, first + blocks[j]};
}

}  // namespace shoal::parallel
