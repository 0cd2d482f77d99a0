// Mesh: the ranks of a job arranged as tensor x pipeline x data parallel, and the process groups
// each rank needs.
//
// Ranks are numbered as parallel/layout.h says, unless a layout places them.
// A rank's groups are the ranks that differ from it in one coordinate only: its tensor-parallel
// group (same pp, dp), its pipeline group (same tp, dp; group rank = pipeline stage) and its
// data-parallel group (same tp, pp; group rank = replica). Groups of size 1 are not built (the
// accessor returns null), nor is a data-parallel group that would be the whole world.
//
// Mesh::Create builds the groups with Gloo over namespaces of the job's store:
// "mesh/tp/<pp>.<dp>", "mesh/pp/<tp>.<dp>", "mesh/dp/<tp>.<pp>". Every rank builds its groups in the same order (tp, pp, dp),
// each build waiting only for the group's own members, so no two ranks wait on each other in a
// cycle. Not thread-safe.
#ifndef SHOAL_PARALLEL_MESH_H_
#define SHOAL_PARALLEL_MESH_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/layout.h"

namespace shoal::parallel {

class Mesh {
 public:
  // `world`: the job's group (not owned; outlives the mesh; may be null for a one-rank job).
  // `store`: the job's rendezvous store (its namespace for this generation of the group);
  // needed when any group has more than one rank. `coord`: this rank's place when a layout
  // gives it (null: CoordOf(shape, rank)); REQUIRES: the job's layouts agreed (AgreeOnLayout:
  // every place taken once). `gloo_hostname` as in comm::BackendOptions.
  // kInvalidArgument from CheckPlace; errors of CreateBackend.
  static absl::StatusOr<std::unique_ptr<Mesh>> Create(comm::Backend* world, const MeshShape& shape,
                                                      std::shared_ptr<comm::Store> store,
                                                      absl::Duration timeout,
                                                      const MeshCoord* coord = nullptr,
                                                      const std::string& gloo_hostname = "");

  const MeshShape& shape() const { return shape_; }
  const MeshCoord& coord() const { return coord_; }
  int rank() const { return rank_; }
  comm::Backend* world() const { return world_; }
  comm::Backend* tp() const { return tp_.get(); }
  comm::Backend* pp() const { return pp_.get(); }
  // The data-parallel group; the world itself when tp = pp = 1 (no separate group is built).
  comm::Backend* dp() const { return shape_.dp == 1 ? nullptr : dp_ ? dp_.get() : world_; }
  bool first_stage() const { return coord_.pp == 0; }
  bool last_stage() const { return coord_.pp == shape_.pp - 1; }

 private:
  Mesh() = default;
  MeshShape shape_;
  MeshCoord coord_;
  int rank_ = 0;
  comm::Backend* world_ = nullptr;
  std::unique_ptr<comm::Backend> tp_, pp_, dp_;
};

}  // namespace shoal::parallel

#endif  // SHOAL_PARALLEL_MESH_H_
