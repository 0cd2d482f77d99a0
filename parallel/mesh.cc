#include "parallel/mesh.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace shoal::parallel {

absl::StatusOr<std::unique_ptr<Mesh>> Mesh::Create(comm::Backend* world, const MeshShape& shape,
                                                   std::shared_ptr<comm::Store> store,
                                                   absl::Duration timeout,
                                                   const MeshCoord* coord,
                                                   const std::string& gloo_hostname) {
  const int world_size = world != nullptr ? world->size() : 1;
  std::unique_ptr<Mesh> m(new Mesh());
  m->shape_ = shape;
  m->world_ = world;
  m->rank_ = world != nullptr ? world->rank() : 0;
  m->coord_ = coord != nullptr ? *coord : CoordOf(shape, m->rank_);
  const MeshCoord c = m->coord_;
  SHOAL_RETURN_IF_ERROR(CheckPlace(shape, c, world_size));
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
