// The argument checks every backend runs first (comm/backend_internal.h, OpPrecheck): each kind
// of operation, each wrong argument, and the group's health before all of them. The expected
// statuses are written out in full (code and message) as the backends gave them before the
// checks were shared, so a change to any message shows here.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/backend_internal.h"

namespace shoal::comm::internal {
namespace {

constexpr absl::string_view kContext = "allreduce on test group of 4 (rank 1)";

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(kContext, ": ", what));
}

// CPU tensors, tags in [0, 100], any dtype: a group of 4 seen from rank 1.
OpPrecheck::Rules CpuRules() {
  OpPrecheck::Rules rules;
  rules.device = TensorDevice::kCpu;
  rules.max_tag = 100;
  return rules;
}

class OpPrecheckTest : public ::testing::Test {
 protected:
  GroupHealth health_{"test group of 4 (rank 1)"};
  OpPrecheck check_{"test", /*size=*/4, /*rank=*/1, CpuRules(), &health_};
  at::Tensor three_ = at::zeros({3});
  at::Tensor twelve_ = at::zeros({12});
  at::Tensor strided_ = at::zeros({4, 4}).t();
};

TEST_F(OpPrecheckTest, GoodArgumentsPass) {
  EXPECT_TRUE(check_.AllReduce(three_, kContext).ok());
  EXPECT_TRUE(check_.ReduceScatter(three_, twelve_, kContext).ok());
  EXPECT_TRUE(check_.AllGather(twelve_, three_, kContext).ok());
  EXPECT_TRUE(check_.Broadcast(three_, 1, kContext).ok());  // the root may be this rank
  EXPECT_TRUE(check_.Broadcast(three_, 3, kContext).ok());
  EXPECT_TRUE(check_.Send(three_, 0, 0, kContext).ok());
  EXPECT_TRUE(check_.Recv(three_, 3, 100, kContext).ok());
  EXPECT_TRUE(check_.Barrier().ok());
  // Empty shards are still size x each other.
  EXPECT_TRUE(check_.AllGather(at::zeros({0}), at::zeros({0}), kContext).ok());
}

TEST_F(OpPrecheckTest, TensorsMustBeDefinedOnTheCpuAndContiguous) {
  EXPECT_EQ(check_.AllReduce(at::Tensor(), kContext), Bad("tensor is undefined"));
  EXPECT_EQ(check_.AllReduce(strided_, kContext), Bad("tensor is not contiguous"));
  EXPECT_EQ(check_.AllReduce(at::empty({3}, at::TensorOptions().device(at::kMeta)), kContext),
            Bad("tensor is on meta, not the CPU"));
  EXPECT_EQ(check_.Broadcast(strided_, 0, kContext), Bad("tensor is not contiguous"));
  EXPECT_EQ(check_.Send(at::Tensor(), 0, 0, kContext), Bad("tensor is undefined"));
  EXPECT_EQ(check_.Recv(strided_, 0, 0, kContext), Bad("tensor is not contiguous"));
}

TEST_F(OpPrecheckTest, ShardedPairsAreSizeTimesEachOtherOfOneDtype) {
  // Output first, then input, then the pair.
  EXPECT_EQ(check_.ReduceScatter(at::Tensor(), strided_, kContext), Bad("output is undefined"));
  EXPECT_EQ(check_.ReduceScatter(three_, strided_, kContext), Bad("input is not contiguous"));
  EXPECT_EQ(check_.AllGather(twelve_, at::Tensor(), kContext), Bad("input is undefined"));
  EXPECT_EQ(check_.ReduceScatter(three_, at::zeros({13}), kContext),
            Bad("input has 13 elements, expected 4 x 3 (output)"));
  EXPECT_EQ(check_.AllGather(at::zeros({13}), three_, kContext),
            Bad("output has 13 elements, expected 4 x 3 (input)"));
  // The same pair the wrong way round: a reduce-scatter's big tensor is its input.
  EXPECT_EQ(check_.ReduceScatter(twelve_, three_, kContext),
            Bad("input has 3 elements, expected 4 x 12 (output)"));
  EXPECT_EQ(check_.AllGather(at::zeros({12}, at::kDouble), three_, kContext),
            Bad("output is Double but input is Float"));
  EXPECT_EQ(check_.ReduceScatter(at::zeros({3}, at::kInt), twelve_, kContext),
            Bad("input is Float but output is Int"));
}

TEST_F(OpPrecheckTest, PeersAreInTheGroupAndNotThisRank) {
  EXPECT_EQ(check_.Broadcast(three_, 4, kContext), Bad("root 4 is not in [0, 4)"));
  EXPECT_EQ(check_.Broadcast(three_, -1, kContext), Bad("root -1 is not in [0, 4)"));
  EXPECT_EQ(check_.Send(three_, 1, 0, kContext), Bad("dst 1 is this rank"));
  EXPECT_EQ(check_.Send(three_, 7, 0, kContext), Bad("dst 7 is not in [0, 4)"));
  EXPECT_EQ(check_.Recv(three_, 1, 0, kContext), Bad("src 1 is this rank"));
  EXPECT_EQ(check_.Recv(three_, -1, 0, kContext), Bad("src -1 is not in [0, 4)"));
}

TEST_F(OpPrecheckTest, TagsAreInRangeWhereTheBackendHasTags) {
  EXPECT_EQ(check_.Send(three_, 0, -1, kContext), Bad("tag not in [0, 100]"));
  EXPECT_EQ(check_.Recv(three_, 0, 101, kContext), Bad("tag not in [0, 100]"));
  // The peer is checked before the tag.
  EXPECT_EQ(check_.Send(three_, 1, -1, kContext), Bad("dst 1 is this rank"));

  OpPrecheck::Rules no_tags = CpuRules();
  no_tags.max_tag = std::nullopt;
  const OpPrecheck untagged("test", 4, 1, no_tags, &health_);
  EXPECT_TRUE(untagged.Send(three_, 0, -5, kContext).ok());
  EXPECT_TRUE(untagged.Recv(three_, 0, 1 << 30, kContext).ok());
}

TEST_F(OpPrecheckTest, CudaBackendsRefuseCpuTensorsNamingTheBackend) {
  OpPrecheck::Rules cuda = CpuRules();
  cuda.device = TensorDevice::kCuda;
  const OpPrecheck nccl("nccl", 4, 1, cuda, &health_);
  EXPECT_EQ(nccl.AllReduce(three_, kContext),
            Bad("tensor is a CPU tensor; the nccl backend needs CUDA tensors"));
  EXPECT_EQ(nccl.AllGather(twelve_, three_, kContext),
            Bad("output is a CPU tensor; the nccl backend needs CUDA tensors"));
  EXPECT_EQ(nccl.AllReduce(at::Tensor(), kContext), Bad("tensor is undefined"));
}

absl::Status RefuseBool(const at::Tensor& tensor, absl::string_view name,
                        absl::string_view context) {
  if (tensor.scalar_type() != at::kBool) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(context, ": ", name, " is bool"));
}

TEST_F(OpPrecheckTest, TheBackendsDtypeCheckRunsOnEveryTensorAfterTheLayout) {
  OpPrecheck::Rules rules = CpuRules();
  rules.check_dtype = &RefuseBool;
  const OpPrecheck check("test", 4, 1, rules, &health_);
  const at::Tensor flags = at::zeros({3}, at::kBool);
  EXPECT_EQ(check.AllReduce(flags, kContext), Bad("tensor is bool"));
  EXPECT_EQ(check.AllReduce(at::zeros({4, 4}, at::kBool).t(), kContext),
            Bad("tensor is not contiguous"));
  EXPECT_EQ(check.ReduceScatter(flags, twelve_, kContext), Bad("output is bool"));
  EXPECT_EQ(check.AllGather(twelve_, flags, kContext), Bad("input is bool"));
  EXPECT_EQ(check.Send(flags, 0, 0, kContext), Bad("tensor is bool"));
  EXPECT_TRUE(check.AllReduce(three_, kContext).ok());
}

// A broken group reports its first failure for every operation, bad arguments or not; an
// argument error does not break it.
TEST_F(OpPrecheckTest, AnUnusableGroupFailsEveryOperationFirst) {
  health_.RecordFailure(absl::InvalidArgumentError("a bad argument"));
  EXPECT_TRUE(check_.Barrier().ok());
  health_.RecordFailure(absl::UnavailableError("peer 2 closed the connection"));
  const absl::Status broken = absl::FailedPreconditionError(
      "test group of 4 (rank 1) is unusable after an earlier failure (peer 2 closed the "
      "connection); rebuild the group");
  EXPECT_EQ(check_.AllReduce(at::Tensor(), kContext), broken);
  EXPECT_EQ(check_.ReduceScatter(three_, three_, kContext), broken);
  EXPECT_EQ(check_.AllGather(three_, twelve_, kContext), broken);
  EXPECT_EQ(check_.Broadcast(three_, 9, kContext), broken);
  EXPECT_EQ(check_.Send(three_, 1, -1, kContext), broken);
  EXPECT_EQ(check_.Recv(three_, 0, 0, kContext), broken);
  EXPECT_EQ(check_.Barrier(), broken);
}

}  // namespace
}  // namespace shoal::comm::internal
