// The GPT's pieces (runtime/gpt.h): the embedding, a transformer block and the head, each a
// Piece with its forward and hand-written backward over the fused kernels (runtime/kernels.h),
// tensor-parallel where the group says so. Internal to the model: Gpt makes them and owns them;
// nothing else includes this header.
#ifndef SHOAL_RUNTIME_GPT_PIECES_H_
#define SHOAL_RUNTIME_GPT_PIECES_H_

#include <cstdint>
#include <memory>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "absl/time/time.h"
#include "comm/backend.h"
#include "runtime/gpt.h"

namespace shoal::runtime {

// (Re)allocates `t` only when its shape or type changes, so steady-state steps allocate nothing.
inline void Ensure(at::Tensor& t, at::IntArrayRef shape,
                   const at::TensorOptions& options = at::kFloat) {
  if (!t.defined() || t.sizes() != shape || t.scalar_type() != options.dtype() ||
      t.device() != options.device()) {
    t = at::empty(shape, options);
  }
}

// The tensor-parallel group as the pieces use it; `group` is null without tensor parallelism.
// Collectives run synchronously: a piece needs the sum before it can go on.
struct TpGroup {
  comm::Backend* group = nullptr;
  absl::Duration timeout;

  bool active() const { return group != nullptr; }
  // In place over `t` on every rank of the group; throws c10::Error naming `where` on failure.
  void AllReduce(at::Tensor& t, comm::ReduceOp op, const char* where) const {
    comm::CollectiveOptions options;
    options.timeout = timeout;
    const absl::Status s = group->AllReduce(t, op, options)->Wait();
    TORCH_CHECK(s.ok(), "tensor-parallel all-reduce in ", where, " failed: ", s.ToString());
  }
};

// A block's parameters.
struct BlockParams {
  Param ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mproj_w, mproj_b;
};

// wte: rows [v_begin, v_begin + wte.size(0)) of the vocabulary of `vocab` ids (all of them
// without tensor parallelism); the embedding all-reduces its lookups over `tp`.
std::unique_ptr<Piece> MakeEmbeddingPiece(Param wte, Param wpe, int vocab, int64_t v_begin,
                                          TpGroup tp);
// Block `block` of the model (its index names its activations on the offloader), computing
// `n_head` heads (n_head / t of the model's with tensor parallelism) of width `head_dim`.
std::unique_ptr<Piece> MakeBlockPiece(BlockParams p, int block, int n_head, int64_t head_dim,
                                      TpGroup tp);
// The final LayerNorm and the head tied to wte (its rows as for the embedding), with a
// vocabulary-parallel cross-entropy under tensor parallelism.
std::unique_ptr<Piece> MakeHeadPiece(Param lnf_w, Param lnf_b, Param wte, int vocab,
                                     int64_t v_begin, TpGroup tp);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_GPT_PIECES_H_
