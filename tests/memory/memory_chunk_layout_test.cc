// Tests for memory/chunk_layout.h: the layout invariants of ALGORITHMS.md §3.10.1 (contiguous,
// non-overlapping, in order, aligned; a group never straddles chunks; oversize groups are an
// error), hand-computed fill ratios, the split option, and the chunk-size search against
// hand-computed answers and its budget constraint, ending with a GPT-2-small-like model.
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "memory/chunk_layout.h"

namespace shoal::memory {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kAlign = 16;  // 64 bytes of float32, as the header promises

int64_t AlignUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The small example every hand computation below uses:
//   A = {a1: 10, a2: 20}  a1 at 0, a2 at 16: spans 36
//   B = {b1: 40}          spans 40
//   C = {c1: 16, c2: 5}   c1 at 0, c2 at 16: spans 21
std::vector<ChunkGroup> SmallGroups() {
  return {{{"a1", 10}, {"a2", 20}}, {{"b1", 40}}, {{"c1", 16}, {"c2", 5}}};
}

// Random groups of 1..4 tensors of 0..max_numel elements, uniquely named.
std::vector<ChunkGroup> RandomGroups(std::mt19937& rng, int num_groups, int64_t max_numel) {
  std::uniform_int_distribution<int> tensors(1, 4);
  std::uniform_int_distribution<int64_t> numel(0, max_numel);
  std::vector<ChunkGroup> groups(num_groups);
  int id = 0;
  for (ChunkGroup& g : groups) {
    const int n = tensors(rng);
    for (int i = 0; i < n; ++i) g.push_back({"t" + std::to_string(id++), numel(rng)});
  }
  return groups;
}

// §3.10.1, checked from the layout alone against the input, independently of how it was built.
void ExpectLayoutInvariants(const ChunkLayout& layout, const std::vector<ChunkGroup>& groups) {
  const int64_t cap = layout.capacity();
  const auto& tensors = layout.tensors();
  const auto& chunks = layout.chunks();

  // Same tensors, in input order, each tagged with its group.
  size_t k = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i = 0; i < groups[g].size(); ++i, ++k) {
      ASSERT_LT(k, tensors.size());
      EXPECT_EQ(tensors[k].name, groups[g][i].name);
      EXPECT_EQ(tensors[k].numel, groups[g][i].numel);
      EXPECT_EQ(tensors[k].group, static_cast<int>(g));
      EXPECT_EQ(layout.Find(groups[g][i].name), static_cast<int>(k));
    }
  }
  ASSERT_EQ(k, tensors.size());

  int64_t total_used = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    EXPECT_EQ(t.offset % kAlign, 0) << t.name;
    EXPECT_GE(t.offset, 0) << t.name;
    EXPECT_LE(t.offset + t.numel, cap) << t.name;
    if (i == 0 || tensors[i - 1].chunk != t.chunk) {
      // A chunk starts with its first tensor at offset 0, and chunks come in order.
      EXPECT_EQ(t.chunk, i == 0 ? 0 : tensors[i - 1].chunk + 1) << t.name;
      EXPECT_EQ(t.offset, 0) << t.name;
    } else {
      // Contiguous after the previous tensor up to alignment: in order, no overlap, no gap.
      EXPECT_EQ(t.offset, AlignUp(tensors[i - 1].offset + tensors[i - 1].numel)) << t.name;
    }
  }
  // A group never straddles chunks, unless it was split (then its chunks hold nothing else).
  for (size_t i = 1; i < tensors.size(); ++i) {
    if (tensors[i].group == tensors[i - 1].group && tensors[i].chunk != tensors[i - 1].chunk) {
      EXPECT_TRUE(chunks[tensors[i].chunk].split_group) << tensors[i].name;
    }
  }
  // Per-chunk accounting.
  ASSERT_EQ(layout.num_chunks(), tensors.empty() ? 0 : tensors.back().chunk + 1);
  for (int c = 0; c < layout.num_chunks(); ++c) {
    const ChunkLayout::Chunk& ch = chunks[c];
    ASSERT_GT(ch.num_tensors, 0);
    int64_t payload = 0;
    for (int i = ch.first_tensor; i < ch.first_tensor + ch.num_tensors; ++i) {
      EXPECT_EQ(tensors[i].chunk, c);
      payload += tensors[i].numel;
    }
    const auto& last = tensors[ch.first_tensor + ch.num_tensors - 1];
    EXPECT_EQ(ch.used, last.offset + last.numel);
    EXPECT_EQ(ch.payload, payload);
    EXPECT_LE(ch.used, cap);
    EXPECT_DOUBLE_EQ(layout.ChunkFill(c), static_cast<double>(ch.used) / cap);
    if (ch.split_group) {
      for (int i = ch.first_tensor; i < ch.first_tensor + ch.num_tensors; ++i) {
        EXPECT_EQ(tensors[i].group, tensors[ch.first_tensor].group);
      }
    }
    total_used += ch.used;
  }
  EXPECT_EQ(layout.TotalUsed(), total_used);
  EXPECT_DOUBLE_EQ(layout.FillRatio(),
                   static_cast<double>(total_used) / (layout.num_chunks() * static_cast<double>(cap)));
}

// The packing rule itself: a chunk is opened only when the group that opens it did not fit in the
// previous chunk. (Together with "a group is placed in the last chunk", this pins the layout.)
void ExpectGreedyPacking(const ChunkLayout& layout, const std::vector<ChunkGroup>& groups) {
  const auto& tensors = layout.tensors();
  for (int c = 1; c < layout.num_chunks(); ++c) {
    const ChunkLayout::Chunk& ch = layout.chunks()[c];
    const ChunkLayout::Chunk& prev = layout.chunks()[c - 1];
    if (ch.split_group || prev.split_group) continue;
    const int g = tensors[ch.first_tensor].group;
    EXPECT_GT(AlignUp(prev.used) + GroupSpan(groups[g]), layout.capacity())
        << "chunk " << c << " was opened although group " << g << " fitted in chunk " << c - 1;
  }
}

TEST(ChunkLayoutTest, GroupSpanByHand) {
  const auto groups = SmallGroups();
  EXPECT_EQ(GroupSpan(groups[0]), 36);
  EXPECT_EQ(GroupSpan(groups[1]), 40);
  EXPECT_EQ(GroupSpan(groups[2]), 21);
  EXPECT_EQ(GroupSpan({{"z", 0}}), 0);
}

TEST(ChunkLayoutTest, SmallExampleByHand) {
  const auto groups = SmallGroups();
  {
    // 64: A (36) alone; B would start at 48 and end at 88 > 64; C would end at 48+21 = 69 > 64.
    auto layout = ChunkLayout::Build(groups, 64);
    ASSERT_TRUE(layout.ok()) << layout.status();
    ExpectLayoutInvariants(*layout, groups);
    ASSERT_EQ(layout->num_chunks(), 3);
    EXPECT_EQ(layout->chunks()[0].used, 36);
    EXPECT_EQ(layout->chunks()[1].used, 40);
    EXPECT_EQ(layout->chunks()[2].used, 21);
    EXPECT_EQ(layout->chunks()[2].payload, 21);
    EXPECT_DOUBLE_EQ(layout->FillRatio(), 97.0 / 192.0);
  }
  {
    // 96: A + B (b1 at 48, ends 88), C would end at 96 + 21: new chunk.
    auto layout = ChunkLayout::Build(groups, 96);
    ASSERT_TRUE(layout.ok()) << layout.status();
    ExpectLayoutInvariants(*layout, groups);
    ASSERT_EQ(layout->num_chunks(), 2);
    const auto& b1 = layout->tensors()[layout->Find("b1")];
    EXPECT_EQ(b1.chunk, 0);
    EXPECT_EQ(b1.offset, 48);
    EXPECT_EQ(layout->tensors()[layout->Find("c1")].chunk, 1);
    EXPECT_DOUBLE_EQ(layout->FillRatio(), 109.0 / 192.0);
    EXPECT_DOUBLE_EQ(layout->ChunkFill(0), 88.0 / 96.0);
  }
  {
    // 128: everything in one chunk, c1 at 96, c2 at 112, ends at 117.
    auto layout = ChunkLayout::Build(groups, 128);
    ASSERT_TRUE(layout.ok()) << layout.status();
    ExpectLayoutInvariants(*layout, groups);
    ASSERT_EQ(layout->num_chunks(), 1);
    EXPECT_EQ(layout->tensors()[layout->Find("c2")].offset, 112);
    EXPECT_EQ(layout->chunks()[0].payload, 91);
    EXPECT_DOUBLE_EQ(layout->FillRatio(), 117.0 / 128.0);
  }
  EXPECT_EQ(ChunkLayout::Build(groups, 64)->Find("nope"), -1);
}

TEST(ChunkLayoutTest, RandomLayoutsKeepInvariants) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> cap16(8, 40);  // capacity = 16 * this
  for (int trial = 0; trial < 300; ++trial) {
    const auto groups = RandomGroups(rng, 1 + trial % 20, 60);
    const int64_t cap = kAlign * cap16(rng);
    auto layout = ChunkLayout::Build(groups, cap);
    int64_t largest = 0;
    for (const auto& g : groups) largest = std::max(largest, GroupSpan(g));
    if (largest > cap) {
      EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    ASSERT_TRUE(layout.ok()) << layout.status();
    ExpectLayoutInvariants(*layout, groups);
    ExpectGreedyPacking(*layout, groups);
  }
}

TEST(ChunkLayoutTest, OversizeGroupIsAnErrorNamingIt) {
  // A spans 36 > 32: its first tensor, its span and the capacity appear in the message.
  auto layout = ChunkLayout::Build(SmallGroups(), 32);
  ASSERT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(layout.status().message(), HasSubstr("'a1'"));
  EXPECT_THAT(layout.status().message(), HasSubstr("36"));
  EXPECT_THAT(layout.status().message(), HasSubstr("32"));
}

TEST(ChunkLayoutTest, SplitOversizeGroupGetsDedicatedChunks) {
  // D = {d1: 30, d2: 30, d3: 10} spans 0..30, 32..62, 64..74 = 74 > 48.
  const std::vector<ChunkGroup> groups = {
      {{"a1", 10}, {"a2", 20}}, {{"d1", 30}, {"d2", 30}, {"d3", 10}}, {{"c1", 16}, {"c2", 5}}};
  EXPECT_EQ(ChunkLayout::Build(groups, 48).status().code(), absl::StatusCode::kInvalidArgument);

  ChunkLayoutOptions options;
  options.split_oversize_groups = true;
  auto layout = ChunkLayout::Build(groups, 48, options);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ExpectLayoutInvariants(*layout, groups);
  // chunk 0: A (36); D opens chunk 1 (d1 0..30; d2 would end at 62 > 48), chunk 2: d2 0..30,
  // d3 32..42; C opens chunk 3.
  ASSERT_EQ(layout->num_chunks(), 4);
  EXPECT_FALSE(layout->chunks()[0].split_group);
  EXPECT_TRUE(layout->chunks()[1].split_group);
  EXPECT_TRUE(layout->chunks()[2].split_group);
  EXPECT_FALSE(layout->chunks()[3].split_group);
  EXPECT_EQ(layout->tensors()[layout->Find("d1")].chunk, 1);
  EXPECT_EQ(layout->tensors()[layout->Find("d2")].chunk, 2);
  EXPECT_EQ(layout->tensors()[layout->Find("d2")].offset, 0);
  EXPECT_EQ(layout->tensors()[layout->Find("d3")].offset, 32);
  EXPECT_EQ(layout->tensors()[layout->Find("c1")].chunk, 3);
  EXPECT_DOUBLE_EQ(layout->FillRatio(), (36.0 + 30 + 42 + 21) / (4 * 48));

  // Dedicated means dedicated even when the next group would fit: at 64, D fills chunk 0 with d1
  // 0..30 and d2 32..62, d3 goes to chunk 1 (0..10), and the 1-element group e, which would fit
  // after d3, opens chunk 2.
  const std::vector<ChunkGroup> tail = {{{"d1", 30}, {"d2", 30}, {"d3", 10}}, {{"e", 1}}};
  auto dedicated = ChunkLayout::Build(tail, 64, options);
  ASSERT_TRUE(dedicated.ok()) << dedicated.status();
  ExpectLayoutInvariants(*dedicated, tail);
  ASSERT_EQ(dedicated->num_chunks(), 3);
  EXPECT_EQ(dedicated->tensors()[dedicated->Find("d3")].chunk, 1);
  EXPECT_EQ(dedicated->tensors()[dedicated->Find("e")].chunk, 2);

  // A single tensor above the capacity cannot be split.
  auto too_big = ChunkLayout::Build({{{"huge", 49}}}, 48, options);
  ASSERT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_big.status().message(), HasSubstr("'huge'"));
}

TEST(ChunkLayoutTest, BadInputIsNamed) {
  const auto groups = SmallGroups();
  for (int64_t cap : {0, -16, 17, 40}) {
    auto s = ChunkLayout::Build(groups, cap).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << cap;
    EXPECT_THAT(s.message(), HasSubstr(std::to_string(cap)));
  }
  EXPECT_EQ(ChunkLayout::Build({}, 64).status().code(), absl::StatusCode::kInvalidArgument);
  auto empty_group = ChunkLayout::Build({{{"x", 1}}, {}}, 64).status();
  EXPECT_EQ(empty_group.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty_group.message(), HasSubstr("group 1"));
  auto negative = ChunkLayout::Build({{{"neg", -1}}}, 64).status();
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.message(), HasSubstr("'neg'"));
  auto duplicate = ChunkLayout::Build({{{"w", 1}}, {{"w", 2}}}, 64).status();
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(duplicate.message(), HasSubstr("'w'"));
}

ChunkSizeSearchOptions BigBudget() {
  ChunkSizeSearchOptions options;
  options.resident_budget_bytes = int64_t{1} << 40;
  return options;
}

TEST(ChunkSizeSearchTest, PicksHandComputedBest) {
  // Fills (from SmallExampleByHand): 64 -> 97/192, 96 -> 109/192, 128 -> 117/128, 160 -> 117/160.
  ChunkSizeSearchOptions options = BigBudget();
  options.candidates = {160, 64, 128, 96};
  options.tighten = false;
  auto result = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->capacity, 128);
  EXPECT_DOUBLE_EQ(result->layout.FillRatio(), 117.0 / 128.0);
  ASSERT_EQ(result->candidates.size(), 4u);  // sorted ascending
  const int64_t caps[] = {64, 96, 128, 160};
  const int chunks[] = {3, 2, 1, 1};
  const double fills[] = {97.0 / 192, 109.0 / 192, 117.0 / 128, 117.0 / 160};
  for (int i = 0; i < 4; ++i) {
    const ChunkSizeCandidate& c = result->candidates[i];
    EXPECT_EQ(c.capacity, caps[i]);
    EXPECT_TRUE(c.valid);
    EXPECT_EQ(c.num_chunks, chunks[i]);
    EXPECT_DOUBLE_EQ(c.fill_ratio, fills[i]);
  }
  EXPECT_EQ(result->chosen, 2);
  std::cout << FormatChunkSizeTable(*result);

  // The same as a range.
  options.candidates.clear();
  options.min_capacity = 64;
  options.max_capacity = 160;
  options.step = 32;
  auto ranged = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(ranged.ok()) << ranged.status();
  EXPECT_EQ(ranged->capacity, 128);
  EXPECT_EQ(ranged->candidates.size(), 4u);
}

TEST(ChunkSizeSearchTest, RespectsTheResidentBudget) {
  // 2 chunks x 96 x 4 B = 768 B: 128 and 160 no longer fit, 96 is the best that does.
  ChunkSizeSearchOptions options;
  options.resident_budget_bytes = 768;
  options.candidates = {64, 96, 128, 160};
  options.tighten = false;
  auto result = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->capacity, 96);
  EXPECT_DOUBLE_EQ(result->layout.FillRatio(), 109.0 / 192.0);
  EXPECT_FALSE(result->candidates[2].valid);
  EXPECT_THAT(result->candidates[2].invalid_reason, HasSubstr("768"));
  EXPECT_FALSE(result->candidates[3].valid);
  // Every candidate the budget allows must respect it.
  for (const ChunkSizeCandidate& c : result->candidates) {
    if (c.valid) {
      EXPECT_LE(2 * c.capacity * 4, 768);
    }
  }

  // Three resident chunks at 14 B per element: 3 x 64 x 14 = 2688 B allows only 64.
  options.min_resident_chunks = 3;
  options.bytes_per_element = 14;
  options.resident_budget_bytes = 2688;
  result = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->capacity, 64);

  // One byte less: nothing is valid, and the error names the constraint.
  options.resident_budget_bytes = 2687;
  auto none = SearchChunkSize(SmallGroups(), options);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(none.status().message(), HasSubstr("resident_budget_bytes=2687"));
  EXPECT_THAT(none.status().message(), HasSubstr("min_resident_chunks=3"));
  EXPECT_THAT(none.status().message(), HasSubstr("'b1', 40 elements"));  // the largest group
}

TEST(ChunkSizeSearchTest, TooSmallCandidatesAreReportedNotFatal) {
  ChunkSizeSearchOptions options = BigBudget();
  options.candidates = {32, 48, 64};  // 32 < A's 36; 48 holds every group
  options.tighten = false;
  auto result = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->candidates[0].valid);
  EXPECT_THAT(result->candidates[0].invalid_reason, HasSubstr("'a1'"));
  // 48: A | B | C = 97 / 144; 64: 97 / 192.
  EXPECT_EQ(result->capacity, 48);
  EXPECT_DOUBLE_EQ(result->layout.FillRatio(), 97.0 / 144.0);

  options.candidates = {16, 32};
  EXPECT_EQ(SearchChunkSize(SmallGroups(), options).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(ChunkSizeSearchTest, TiesGoToTheSmallerCapacity) {
  // Two 32-element groups: 32 gives 2 full chunks, 64 one full chunk: both fill 100%.
  ChunkSizeSearchOptions options = BigBudget();
  options.candidates = {64, 32};
  options.tighten = false;
  auto result = SearchChunkSize({{{"x", 32}}, {{"y", 32}}}, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->capacity, 32);
  EXPECT_DOUBLE_EQ(result->layout.FillRatio(), 1.0);
}

TEST(ChunkSizeSearchTest, BadOptionsAreNamed) {
  ChunkSizeSearchOptions options = BigBudget();
  options.candidates = {64, 72};
  EXPECT_THAT(SearchChunkSize(SmallGroups(), options).status().message(), HasSubstr("72"));
  options.candidates = {64};
  options.step = 16;
  EXPECT_EQ(SearchChunkSize(SmallGroups(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = ChunkSizeSearchOptions();
  EXPECT_THAT(SearchChunkSize(SmallGroups(), options).status().message(),
              HasSubstr("resident_budget_bytes"));
  options = BigBudget();
  options.min_resident_chunks = 0;
  EXPECT_THAT(SearchChunkSize(SmallGroups(), options).status().message(),
              HasSubstr("min_resident_chunks"));
  // Bad groups are reported as such, not as a table of invalid sizes.
  options = BigBudget();
  auto dup = SearchChunkSize({{{"w", 1}}, {{"w", 1}}}, options);
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dup.status().message(), HasSubstr("duplicate"));
}

TEST(ChunkSizeSearchTest, TighteningKeepsTheLayoutAndNeverLowersTheFill) {
  // Hand example: 160 -> fullest chunk 117 -> 128, same single chunk, fill 117/128.
  ChunkSizeSearchOptions options = BigBudget();
  options.candidates = {160};
  auto result = SearchChunkSize(SmallGroups(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->capacity, 128);
  EXPECT_EQ(result->candidates[0].tight_capacity, 128);
  EXPECT_DOUBLE_EQ(result->candidates[0].tight_fill_ratio, 117.0 / 128.0);

  // Random models: the layout at the tight capacity places every tensor exactly where the layout
  // at the grid point did.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const auto groups = RandomGroups(rng, 1 + trial % 15, 100);
    int64_t largest = 0;
    for (const auto& g : groups) largest = std::max(largest, GroupSpan(g));
    const int64_t cap = AlignUp(std::max<int64_t>(largest, 1)) + kAlign * (trial % 13);
    auto loose = ChunkLayout::Build(groups, cap);
    ASSERT_TRUE(loose.ok()) << loose.status();
    int64_t max_used = 0;
    for (const auto& c : loose->chunks()) max_used = std::max(max_used, c.used);
    auto tight = ChunkLayout::Build(groups, std::max(kAlign, AlignUp(max_used)));
    ASSERT_TRUE(tight.ok()) << tight.status();
    ASSERT_EQ(tight->num_chunks(), loose->num_chunks());
    for (size_t i = 0; i < loose->tensors().size(); ++i) {
      EXPECT_EQ(tight->tensors()[i].chunk, loose->tensors()[i].chunk);
      EXPECT_EQ(tight->tensors()[i].offset, loose->tensors()[i].offset);
    }
    EXPECT_GE(tight->FillRatio(), loose->FillRatio());
  }
}

// GPT-2 small: token and position embeddings, 12 identical blocks, the final layer norm.
std::vector<ChunkGroup> Gpt2SmallGroups() {
  const int64_t d = 768, vocab = 50257, ctx = 1024;
  std::vector<ChunkGroup> groups;
  groups.push_back({{"wte", vocab * d}, {"wpe", ctx * d}});
  for (int l = 0; l < 12; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    groups.push_back({{p + "ln_1.w", d},
                      {p + "ln_1.b", d},
                      {p + "attn.c_attn.w", d * 3 * d},
                      {p + "attn.c_attn.b", 3 * d},
                      {p + "attn.c_proj.w", d * d},
                      {p + "attn.c_proj.b", d},
                      {p + "ln_2.w", d},
                      {p + "ln_2.b", d},
                      {p + "mlp.c_fc.w", d * 4 * d},
                      {p + "mlp.c_fc.b", 4 * d},
                      {p + "mlp.c_proj.w", 4 * d * d},
                      {p + "mlp.c_proj.b", d}});
  }
  groups.push_back({{"ln_f.w", d}, {"ln_f.b", d}});
  return groups;
}

TEST(ChunkSizeSearchTest, GptLikeModelFillsOverNinetyPercent) {
  const auto groups = Gpt2SmallGroups();
  int64_t params = 0;
  for (const auto& g : groups) {
    for (const auto& t : g) params += t.numel;
  }
  ASSERT_EQ(params, 124439808);  // GPT-2 small's published parameter count

  // A budget that does not bind (2 x 124 M x 4 B < 2 GiB): the default grid, tightened.
  ChunkSizeSearchOptions options;
  options.resident_budget_bytes = int64_t{2} << 30;
  auto result = SearchChunkSize(groups, options);
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << FormatChunkSizeTable(*result) << result->layout.DebugString();
  ExpectLayoutInvariants(result->layout, groups);
  ExpectGreedyPacking(result->layout, groups);
  EXPECT_GT(result->layout.FillRatio(), 0.9);
  // The winner is the best valid row, and the returned layout is that row's.
  for (const ChunkSizeCandidate& c : result->candidates) {
    if (c.valid) {
      EXPECT_LE(c.tight_fill_ratio, result->layout.FillRatio() + 1e-12);
    }
  }
  EXPECT_EQ(result->layout.num_chunks(), result->candidates[result->chosen].num_chunks);
  // The grid starts at the largest group (the embeddings: wte + wpe at an aligned offset).
  EXPECT_EQ(result->candidates.front().capacity, AlignUp(AlignUp(50257 * 768) + 1024 * 768));

  // A budget that binds: at most 45 M elements per chunk (2 x 45 M x 4 B).
  options.resident_budget_bytes = int64_t{2} * 45'000'000 * 4;
  result = SearchChunkSize(groups, options);
  ASSERT_TRUE(result.ok()) << result.status();
  std::cout << FormatChunkSizeTable(*result);
  EXPECT_LE(result->capacity, 45'000'000);
  for (const ChunkSizeCandidate& c : result->candidates) EXPECT_LE(c.capacity, 45'000'000);
  ExpectLayoutInvariants(result->layout, groups);

  // 30 M elements cannot hold the embeddings, nor even wte alone when splitting is allowed.
  options.resident_budget_bytes = int64_t{2} * 30'000'000 * 4;
  auto none = SearchChunkSize(groups, options);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(none.status().message(), HasSubstr("'wte'"));
  options.layout.split_oversize_groups = true;
  none = SearchChunkSize(groups, options);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(none.status().message(), HasSubstr("tensor ('wte'"));
}

}  // namespace
}  // namespace shoal::memory
