// CreateBackend's argument checks, and a Gloo group of one in this process: what needs no peers.
// Everything with peers is in comm_conformance_test.
#include "comm/backend.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "tests/test_util.h"

namespace shoal::comm {
namespace {

std::shared_ptr<Store> FileStore(const shoal::testing::TempDir& dir) {
  auto s = MakeFileStore(dir / "store", 1, absl::Seconds(10));
  EXPECT_TRUE(s.ok()) << s.status();
  return *s;
}

TEST(CreateBackendTest, UnknownKindIsInvalidArgument) {
  BackendOptions o;
  o.kind = "carrier-pigeon";
  auto b = CreateBackend(o);
  EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
  EXPECT_TRUE(absl::StrContains(b.status().message(), "carrier-pigeon"));
}

TEST(CreateBackendTest, RankOutsideWorldIsInvalidArgument) {
  BackendOptions o;
  o.rank = 2;
  o.world_size = 2;
  EXPECT_TRUE(absl::IsInvalidArgument(CreateBackend(o).status()));
  o.rank = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(CreateBackend(o).status()));
}

TEST(CreateBackendTest, GlooNeedsAStore) {
  BackendOptions o;
  auto b = CreateBackend(o);
  EXPECT_TRUE(absl::IsInvalidArgument(b.status())) << b.status();
  EXPECT_TRUE(absl::StrContains(b.status().message(), "store"));
}

TEST(CreateBackendTest, NcclWithoutAGpuFails) {
  BackendOptions o;
  o.kind = "nccl";
  shoal::testing::TempDir dir;
  o.store = FileStore(dir);
  auto b = CreateBackend(o);
  if (b.ok()) GTEST_SKIP() << "this machine has a GPU and NCCL";
  EXPECT_TRUE(absl::IsUnimplemented(b.status()) || absl::IsFailedPrecondition(b.status()) ||
              absl::IsUnavailable(b.status()))
      << b.status();
}

TEST(GlooGroupOfOneTest, CollectivesAreIdentitiesAndAvgDivides) {
  shoal::testing::TempDir dir;
  BackendOptions o;
  o.store = FileStore(dir);
  o.gloo_hostname = "127.0.0.1";
  auto b = CreateBackend(o);
  ASSERT_TRUE(b.ok()) << b.status();
  Backend& backend = **b;
  EXPECT_EQ(backend.name(), "gloo");
  EXPECT_EQ(backend.rank(), 0);
  EXPECT_EQ(backend.size(), 1);
  at::Tensor t = at::arange(10, at::kFloat);
  ASSERT_TRUE(backend.AllReduce(t, ReduceOp::kAvg)->Wait().ok());
  EXPECT_TRUE(t.equal(at::arange(10, at::kFloat)));
  at::Tensor out = at::zeros({10});
  ASSERT_TRUE(backend.ReduceScatter(out, t, ReduceOp::kSum)->Wait().ok());
  EXPECT_TRUE(out.equal(t));
  ASSERT_TRUE(backend.Barrier()->Wait().ok());
}

TEST(GlooGroupOfOneTest, WorkOutlivesItsBackendAndWaitingTwiceIsAnError) {
  shoal::testing::TempDir dir;
  BackendOptions o;
  o.store = FileStore(dir);
  o.gloo_hostname = "127.0.0.1";
  auto b = CreateBackend(o);
  ASSERT_TRUE(b.ok()) << b.status();
  at::Tensor t = at::ones({1000});
  std::unique_ptr<Work> work = (*b)->AllReduce(t, ReduceOp::kSum);
  b->reset();
  EXPECT_TRUE(work->Wait().ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(work->Wait()));
}

TEST(GlooGroupOfOneTest, UnsupportedDtypeIsInvalidArgumentAndGroupStaysUsable) {
  shoal::testing::TempDir dir;
  BackendOptions o;
  o.store = FileStore(dir);
  o.gloo_hostname = "127.0.0.1";
  auto b = CreateBackend(o);
  ASSERT_TRUE(b.ok()) << b.status();
  at::Tensor complex = at::zeros({4}, at::kComplexFloat);
  const absl::Status s = (*b)->AllReduce(complex, ReduceOp::kSum)->Wait();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "allreduce on gloo group of 1")) << s;
  at::Tensor t = at::ones({4});
  EXPECT_TRUE((*b)->AllReduce(t, ReduceOp::kSum)->Wait().ok());
}

}  // namespace
}  // namespace shoal::comm
