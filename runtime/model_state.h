// Model-wide state across a mesh: every rank holds a stage of the model, possibly a
// tensor-parallel shard of it (runtime/gpt.h ShardSpec); checkpoints hold whole tensors under
// the single-process names, so a run can resume on any other layout.
//
// GatherModelWide assembles the whole tensors on rank 0 of the world group from the shards the
// contributing ranks hold (one data-parallel replica suffices: replicas are identical).
// The other way, after loading a checkpoint, each rank keeps its slice: Gpt::LoadParameters for
// the weights, SliceOptimizerState for the optimizer state.
#ifndef SHOAL_RUNTIME_MODEL_STATE_H_
#define SHOAL_RUNTIME_MODEL_STATE_H_

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "comm/backend.h"
#include "runtime/gpt.h"
#include "runtime/safetensors.h"

namespace shoal::runtime {

// One local tensor and how it relates to the model-wide tensor of the same name.
struct ShardedTensor {
  std::string name;
  at::Tensor local;  // float32 or int64, CPU
  ShardSpec spec;
};

// A collective over `world` (every rank calls it): ranks with `contributes` send their tensors
// to rank 0, which places every shard into a zero-initialised model-wide tensor (a tensor that
// several ranks hold, replicated or duplicated, is simply written again with the same values).
// Rank 0 returns the model-wide tensors sorted by name; other ranks return an empty list.
// kDataLoss when a peer's description of its tensors is malformed or inconsistent (two shards
// of one name disagreeing on the full shape or dtype); transfer errors from the backend.
// `world` may be null (one rank): the local tensors are assembled directly.
absl::StatusOr<NamedTensors> GatherModelWide(comm::Backend* world, bool contributes,
                                             const std::vector<ShardedTensor>& mine,
                                             const comm::CollectiveOptions& options = {});

// The parameters of this rank's model chunks (each in ShardSpecs order) as sharded tensors; and
// the AdamW state of one optimizer over those chunks (AdamW::StateDict: "exp_avg.<name>",
// "exp_avg_sq.<name>", sharded as the parameter <name>, and "step", replicated).
std::vector<ShardedTensor> ShardedParameters(const std::vector<const Gpt*>& chunks);
std::vector<ShardedTensor> ShardedOptimizerState(const std::vector<const Gpt*>& chunks,
                                                 const NamedTensors& state);

// From a model-wide optimizer state (a checkpoint's), the chunks' slice of it: the moments of
// their own parameters cut to their shards, and "step". kDataLoss names a missing tensor or one
// whose shape is not the model-wide one.
absl::StatusOr<NamedTensors> SliceOptimizerState(const std::vector<const Gpt*>& chunks,
                                                 const NamedTensors& full);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_MODEL_STATE_H_
