// Tests for memory/flat_buffer.h: the layout (alignment, no overlap, sizes), views aliasing the
// flat storage, and MakeLike giving the same layout over fresh zeroed storage.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "memory/flat_buffer.h"

namespace shoal::memory {
namespace {

constexpr int64_t kAlignElements = 16;  // 64 bytes of float32, as the header promises

int64_t NumelOf(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

// Shapes whose sizes are deliberately not multiples of 16, plus a scalar and an exact multiple.
const std::vector<std::pair<std::string, std::vector<int64_t>>>& TestShapes() {
  static const auto* shapes = new std::vector<std::pair<std::string, std::vector<int64_t>>>{
      {"wte", {7, 5}},   {"ln.w", {3}},        {"ln.b", {3}},         {"scalar", {}},
      {"attn", {4, 16}}, {"mlp", {2, 3, 5}},   {"one", {1}},          {"exact", {32}},
      {"big", {129}},
  };
  return *shapes;
}

FlatBuffer MakeTestBuffer() {
  FlatBuffer buf;
  for (const auto& [name, shape] : TestShapes()) buf.Add(name, shape);
  buf.Allocate();
  return buf;
}

TEST(FlatBufferTest, AddReturnsConsecutiveIndices) {
  FlatBuffer buf;
  int i = 0;
  for (const auto& [name, shape] : TestShapes()) EXPECT_EQ(buf.Add(name, shape), i++);
  EXPECT_FALSE(buf.allocated());
  buf.Allocate();
  EXPECT_TRUE(buf.allocated());
}

TEST(FlatBufferTest, EntriesRecordNamesShapesAndNumels) {
  FlatBuffer buf = MakeTestBuffer();
  const auto& shapes = TestShapes();
  ASSERT_EQ(buf.entries().size(), shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto& e = buf.entries()[i];
    EXPECT_EQ(e.name, shapes[i].first);
    EXPECT_EQ(e.shape, shapes[i].second);
    EXPECT_EQ(e.numel, NumelOf(shapes[i].second)) << e.name;
  }
}

TEST(FlatBufferTest, ViewsHaveTheShapesAsAddedAndFloat32) {
  FlatBuffer buf = MakeTestBuffer();
  const auto& shapes = TestShapes();
  for (size_t i = 0; i < shapes.size(); ++i) {
    at::Tensor v = buf.View(static_cast<int>(i));
    EXPECT_EQ(v.sizes().vec(), shapes[i].second) << shapes[i].first;
    EXPECT_EQ(v.numel(), NumelOf(shapes[i].second));
    EXPECT_EQ(v.scalar_type(), at::kFloat);
    EXPECT_TRUE(v.is_contiguous());
    EXPECT_EQ(v.device().type(), at::kCPU);
  }
}

TEST(FlatBufferTest, OffsetsAlignedAndEntriesDoNotOverlap) {
  FlatBuffer buf = MakeTestBuffer();
  std::vector<std::pair<int64_t, int64_t>> ranges;  // [offset, offset + numel)
  for (const auto& e : buf.entries()) {
    EXPECT_EQ(e.offset % kAlignElements, 0) << e.name << " at " << e.offset;
    EXPECT_GE(e.offset, 0);
    EXPECT_LE(e.offset + e.numel, buf.numel()) << e.name;
    ranges.emplace_back(e.offset, e.offset + e.numel);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    EXPECT_LE(ranges[i - 1].second, ranges[i].first) << "entries overlap";
  }
}

TEST(FlatBufferTest, ViewDataPointersAre64ByteAligned) {
  FlatBuffer buf = MakeTestBuffer();
  const float* base = buf.flat().data_ptr<float>();
  for (int i = 0; i < static_cast<int>(buf.entries().size()); ++i) {
    at::Tensor v = buf.View(i);
    EXPECT_EQ(v.data_ptr<float>() - base, buf.entries()[i].offset);
    // Base allocation alignment is LibTorch's (64 bytes on CPU); the offset keeps it.
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data_ptr<float>()) % 64, 0u) << buf.entries()[i].name;
  }
}

TEST(FlatBufferTest, NumelCoversAllEntries) {
  FlatBuffer buf = MakeTestBuffer();
  int64_t sum = 0;
  for (const auto& e : buf.entries()) sum += e.numel;
  EXPECT_GE(buf.numel(), sum);
  EXPECT_EQ(buf.flat().dim(), 1);
  EXPECT_EQ(buf.flat().numel(), buf.numel());
  EXPECT_EQ(buf.numel() % kAlignElements, 0);
}

TEST(FlatBufferTest, AllocateZeroes) {
  FlatBuffer buf = MakeTestBuffer();
  EXPECT_EQ(buf.flat().scalar_type(), at::kFloat);
  EXPECT_EQ(at::count_nonzero(buf.flat()).item<int64_t>(), 0);
}

TEST(FlatBufferTest, WritingAViewChangesFlat) {
  FlatBuffer buf = MakeTestBuffer();
  const int idx = buf.Find("mlp");
  ASSERT_GE(idx, 0);
  const auto& e = buf.entries()[idx];
  at::Tensor v = buf.View(idx);
  v.copy_(at::arange(e.numel, at::kFloat).add_(1).view(e.shape));
  at::Tensor flat = buf.flat();
  for (int64_t k = 0; k < e.numel; ++k) {
    EXPECT_EQ(flat[e.offset + k].item<float>(), static_cast<float>(k + 1));
  }
  // Nothing outside the entry changed.
  EXPECT_EQ(flat.sum().item<double>(), static_cast<double>(e.numel * (e.numel + 1) / 2));
}

TEST(FlatBufferTest, WritingFlatChangesViews) {
  FlatBuffer buf = MakeTestBuffer();
  buf.flat().copy_(at::arange(buf.numel(), at::kFloat));
  for (int i = 0; i < static_cast<int>(buf.entries().size()); ++i) {
    const auto& e = buf.entries()[i];
    at::Tensor expected = at::arange(e.offset, e.offset + e.numel, at::kFloat).view(e.shape);
    EXPECT_TRUE(at::equal(buf.View(i), expected)) << e.name;
  }
}

TEST(FlatBufferTest, ViewsOfDifferentEntriesAreIndependent) {
  FlatBuffer buf = MakeTestBuffer();
  buf.View(buf.Find("ln.w")).fill_(3.0f);
  EXPECT_EQ(at::count_nonzero(buf.View(buf.Find("ln.b"))).item<int64_t>(), 0);
  EXPECT_EQ(at::count_nonzero(buf.View(buf.Find("wte"))).item<int64_t>(), 0);
  EXPECT_EQ(buf.flat().sum().item<double>(), 9.0);
}

TEST(FlatBufferTest, FindReturnsIndexOrMinusOne) {
  FlatBuffer buf;
  EXPECT_EQ(buf.Find("wte"), -1);
  const auto& shapes = TestShapes();
  for (const auto& [name, shape] : shapes) buf.Add(name, shape);
  for (size_t i = 0; i < shapes.size(); ++i) EXPECT_EQ(buf.Find(shapes[i].first), static_cast<int>(i));
  EXPECT_EQ(buf.Find("missing"), -1);
  EXPECT_EQ(buf.Find(""), -1);
  EXPECT_EQ(buf.Find("ln"), -1);  // no prefix matching
}

TEST(FlatBufferTest, MakeLikeHasSameLayoutAndFreshZeroedStorage) {
  FlatBuffer buf = MakeTestBuffer();
  buf.flat().fill_(5.0f);
  FlatBuffer like = buf.MakeLike();
  ASSERT_TRUE(like.allocated());
  EXPECT_EQ(like.numel(), buf.numel());
  ASSERT_EQ(like.entries().size(), buf.entries().size());
  for (size_t i = 0; i < buf.entries().size(); ++i) {
    EXPECT_EQ(like.entries()[i].name, buf.entries()[i].name);
    EXPECT_EQ(like.entries()[i].shape, buf.entries()[i].shape);
    EXPECT_EQ(like.entries()[i].offset, buf.entries()[i].offset);
    EXPECT_EQ(like.entries()[i].numel, buf.entries()[i].numel);
    EXPECT_EQ(like.View(static_cast<int>(i)).sizes(), buf.View(static_cast<int>(i)).sizes());
  }
  EXPECT_EQ(like.flat().scalar_type(), at::kFloat);
  EXPECT_EQ(at::count_nonzero(like.flat()).item<int64_t>(), 0);
  EXPECT_NE(like.flat().data_ptr<float>(), buf.flat().data_ptr<float>());
  EXPECT_FALSE(like.flat().is_alias_of(buf.flat()));
  // Writes to either do not reach the other.
  like.View(0).fill_(-1.0f);
  EXPECT_TRUE(at::all(buf.flat() == 5.0f).item<bool>());
  buf.flat().fill_(2.0f);
  EXPECT_EQ(like.flat().sum().item<double>(), -static_cast<double>(like.entries()[0].numel));
}

TEST(FlatBufferTest, EmptyBufferAllocates) {
  FlatBuffer buf;
  buf.Allocate();
  EXPECT_TRUE(buf.allocated());
  EXPECT_EQ(buf.numel(), 0);
  EXPECT_EQ(buf.flat().numel(), 0);
  EXPECT_EQ(buf.Find("x"), -1);
}

}  // namespace
}  // namespace shoal::memory
