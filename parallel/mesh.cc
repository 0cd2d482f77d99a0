#include "parallel/mesh.h"

#include <ATen/ATen.h>

#include <vector>

#include "absl/strings/str_cat.h"
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

absl::StatusOr<std::unique_ptr<Mesh>> Mesh::Create(comm::Backend* world, const MeshShape& shape,
                                                   std::shared_ptr<comm::Store> store,
                                                   absl::Duration timeout,
                                                   const MeshCoord* coord,
                                                   const std::string& gloo_hostname) {
  const int world_size = world != nullptr ? world->size() : 1;
  if (shape.size() != world_size || shape.tp < 1 || shape.pp < 1 || shape.dp < 1) {
    return absl::InvalidArgumentError(absl::StrCat("mesh ", ToString(shape), " needs ",
                                                   shape.size(), " ranks; the job has ",
                                                   world_size));
  }
  std::unique_ptr<Mesh> m(new Mesh());
  m->shape_ = shape;
  m->world_ = world;
  m->rank_ = world != nullptr ? world->rank() : 0;
  m->coord_ = coord != nullptr ? *coord : CoordOf(shape, m->rank_);
  const MeshCoord c = m->coord_;
  if (c.tp < 0 || c.tp >= shape.tp || c.pp < 0 || c.pp >= shape.pp || c.dp < 0 ||
      c.dp >= shape.dp) {
    return absl::InvalidArgumentError(absl::StrCat("mesh ", ToString(shape), ": rank ", m->rank_,
                                                   " placed at tp ", c.tp, ", pp ", c.pp, ", dp ",
                                                   c.dp, ", outside the mesh"));
  }
  if (coord != nullptr && world_size > 1) {
    // Every place exactly once: ranks compare where they were put.
    at::Tensor mine = at::tensor({static_cast<int64_t>(RankOf(shape, c))}, at::kLong);
    at::Tensor all = at::empty({world_size}, at::kLong);
    SHOAL_RETURN_IF_ERROR(world->AllGather(all, mine, {timeout})->Wait());
    std::vector<int> owner(world_size, -1);
    for (int r = 0; r < world_size; ++r) {
      const int64_t place = all[r].item<int64_t>();
      if (place < 0 || place >= world_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("mesh ", ToString(shape), ": rank ", r, " reports place ", place));
      }
      if (owner[place] >= 0) {
        const MeshCoord p = CoordOf(shape, static_cast<int>(place));
        return absl::FailedPreconditionError(absl::StrCat(
            "mesh ", ToString(shape), ": ranks ", owner[place], " and ", r,
            " were both placed at tp ", p.tp, ", pp ", p.pp, ", dp ", p.dp));
      }
      owner[place] = r;
    }
  }
  auto build = [&](int size, int rank, const std::string& name,
                   std::unique_ptr<comm::Backend>* out) -> absl::Status {
    if (size == 1) return absl::OkStatus();
    if (store == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("mesh: group ", name, " has ", size, " ranks but there is no store"));
    }
    comm::BackendOptions o;
    o.kind = "gloo";
    o.rank = rank;
    o.world_size = size;
    o.store = comm::MakePrefixStore(name, store);
    o.timeout = timeout;
    o.gloo_hostname = gloo_hostname;
    SHOAL_ASSIGN_OR_RETURN(*out, comm::CreateBackend(o));
    return absl::OkStatus();
  };
  SHOAL_RETURN_IF_ERROR(
      build(shape.tp, c.tp, absl::StrCat("mesh/tp/", c.pp, ".", c.dp), &m->tp_));
  SHOAL_RETURN_IF_ERROR(
      build(shape.pp, c.pp, absl::StrCat("mesh/pp/", c.tp, ".", c.dp), &m->pp_));
  // The world is the data-parallel group when it is the only dimension and ranks are in order.
  if (shape.tp == 1 && shape.pp == 1 && coord == nullptr) return m;
  SHOAL_RETURN_IF_ERROR(
      build(shape.dp, c.dp, absl::StrCat("mesh/dp/", c.tp, ".", c.pp), &m->dp_));
  return m;
}

}  // namespace shoal::parallel
