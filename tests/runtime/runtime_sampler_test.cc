// BatchSampler over a real token file whose token i is i itself, so every window reveals its
// start. Window starts are checked against a reference SplitMix64 written here as the usual
// sequential generator (and pinned to its published first outputs).
#include "runtime/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/file_util.h"

namespace shoal::runtime {
namespace {

// Reference SplitMix64 (Vigna, splitmix64.c): the state advances by the golden gamma and each
// output is the mixed state.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_;
};

TEST(SplitMix64ReferenceTest, MatchesPublishedOutputs) {
  SplitMix64 rng(1234567);
  EXPECT_EQ(rng.Next(), 6457827717110365317ULL);
  EXPECT_EQ(rng.Next(), 3203168211198807973ULL);
  EXPECT_EQ(rng.Next(), 9817491932198370423ULL);
  EXPECT_EQ(rng.Next(), 4593380528125082431ULL);
  EXPECT_EQ(rng.Next(), 16408922859458223821ULL);
}

BatchSpec Spec(int batch_size, int block_size, int grad_accum = 1, int dp_rank = 0,
               int dp_size = 1) {
  BatchSpec spec;
  spec.batch_size = batch_size;
  spec.block_size = block_size;
  spec.grad_accum = grad_accum;
  spec.dp_rank = dp_rank;
  spec.dp_size = dp_size;
  return spec;
}

class SamplerTest : public ::testing::Test {
 protected:
  static constexpr int kTokens = 5000;

  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/shoal_smp_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    file_ = OpenIdentityFile("identity.bin", kTokens);
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(dir_).ok()); }

  // A token file of n tokens where token i has id i (little-endian on disk).
  std::unique_ptr<TokenFile> OpenIdentityFile(const std::string& name, int n) {
    const std::string path = dir_ + "/" + name;
    {
      std::ofstream out(path, std::ios::binary);
      for (int i = 0; i < n; ++i) {
        out.put(static_cast<char>(i & 0xFF));
        out.put(static_cast<char>(i >> 8));
      }
    }
    auto f = TokenFile::Open(path, 65536);
    EXPECT_TRUE(f.ok()) << f.status();
    return f.ok() ? std::move(*f) : nullptr;
  }

  struct Batch {
    std::vector<int64_t> x, y;
    bool operator==(const Batch& o) const { return x == o.x && y == o.y; }
  };

  static Batch Train(const BatchSampler& s, const BatchSpec& spec, int64_t step, int micro) {
    Batch b{std::vector<int64_t>(spec.batch_size * spec.block_size),
            std::vector<int64_t>(spec.batch_size * spec.block_size)};
    s.TrainBatch(step, micro, b.x.data(), b.y.data());
    return b;
  }

  static Batch Val(const BatchSampler& s, const BatchSpec& spec, int index, int num_batches) {
    Batch b{std::vector<int64_t>(spec.batch_size * spec.block_size),
            std::vector<int64_t>(spec.batch_size * spec.block_size)};
    s.ValBatch(index, num_batches, b.x.data(), b.y.data());
    return b;
  }

  // Checks that every row of `b` is a contiguous window of the identity file with y = x + 1
  // shifted, inside the file; returns the row starts.
  static std::vector<int64_t> RowStarts(const Batch& b, const BatchSpec& spec, int n) {
    std::vector<int64_t> starts;
    for (int r = 0; r < spec.batch_size; ++r) {
      const int64_t* x = b.x.data() + r * spec.block_size;
      const int64_t* y = b.y.data() + r * spec.block_size;
      for (int t = 0; t < spec.block_size; ++t) {
        EXPECT_EQ(x[t], x[0] + t) << "row " << r << " is not a contiguous window";
        EXPECT_EQ(y[t], x[t] + 1) << "row " << r << ": y is not x shifted by one";
      }
      EXPECT_GE(x[0], 0);
      EXPECT_LE(x[0] + spec.block_size, n - 1) << "target runs past the end of the file";
      starts.push_back(x[0]);
    }
    return starts;
  }

  std::string dir_;
  std::unique_ptr<TokenFile> file_;
};

TEST_F(SamplerTest, WindowStartsFollowTheDocumentedHash) {
  BatchSpec spec = Spec(4, 32);
  const uint64_t seed = 42;
  BatchSampler sampler(*file_, seed, spec);
  SplitMix64 ref(seed);
  for (uint64_t g = 0; g < 1000; ++g) {
    ASSERT_EQ(sampler.TrainWindowStart(g), ref.Next() % (kTokens - 32)) << "g = " << g;
  }
}

TEST_F(SamplerTest, TrainBatchRowsAreShiftedWindowsAtTheirGlobalIndex) {
  BatchSpec spec = Spec(3, 16, 2, 1, 4);
  BatchSampler sampler(*file_, 7, spec);
  for (int64_t step : {0, 1, 17}) {
    for (int micro : {0, 1}) {
      const std::vector<int64_t> starts =
          RowStarts(Train(sampler, spec, step, micro), spec, kTokens);
      for (int b = 0; b < spec.batch_size; ++b) {
        const uint64_t g = ((step * 2 + micro) * 4 + 1) * 3 + b;
        EXPECT_EQ(starts[b], static_cast<int64_t>(sampler.TrainWindowStart(g)));
      }
    }
  }
}

TEST_F(SamplerTest, SameInputsGiveSameBatch) {
  BatchSpec spec = Spec(8, 64, 4, 2, 3);
  BatchSampler a(*file_, 1234, spec);
  BatchSampler b(*file_, 1234, spec);
  EXPECT_EQ(Train(a, spec, 99, 3), Train(b, spec, 99, 3));
  EXPECT_EQ(Train(a, spec, 99, 3), Train(a, spec, 99, 3));
}

TEST_F(SamplerTest, GlobalBatchIsInvariantUnderResharding) {
  for (int grad_accum : {1, 2}) {
    BatchSpec one = Spec(8, 24, grad_accum);
    BatchSampler whole(*file_, 5, one);
    BatchSpec half = Spec(4, 24, grad_accum, 0, 2);
    BatchSpec r1 = half;
    r1.dp_rank = 1;
    BatchSampler rank0(*file_, 5, half);
    BatchSampler rank1(*file_, 5, r1);
    for (int64_t step : {0, 1, 2, 1000}) {
      for (int micro = 0; micro < grad_accum; ++micro) {
        Batch joined = Train(rank0, half, step, micro);
        const Batch second = Train(rank1, r1, step, micro);
        joined.x.insert(joined.x.end(), second.x.begin(), second.x.end());
        joined.y.insert(joined.y.end(), second.y.begin(), second.y.end());
        EXPECT_EQ(Train(whole, one, step, micro), joined)
            << "step " << step << " micro " << micro << " grad_accum " << grad_accum;
      }
    }
  }
}

TEST_F(SamplerTest, DifferentStepsMicroBatchesAndSeedsDiffer) {
  BatchSpec spec = Spec(4, 16, 2);
  BatchSampler s(*file_, 3, spec);
  BatchSampler other_seed(*file_, 4, spec);
  EXPECT_FALSE(Train(s, spec, 0, 0) == Train(s, spec, 1, 0));
  EXPECT_FALSE(Train(s, spec, 0, 0) == Train(s, spec, 0, 1));
  EXPECT_FALSE(Train(s, spec, 5, 0) == Train(other_seed, spec, 5, 0));
}

TEST_F(SamplerTest, StartsCoverTheFileEvenly) {
  // 20,000 draws over 4,900 possible starts bucketed in 49 bins of 100: ~408 a bin expected.
  // Deterministic (fixed seed), so the loose bounds cannot flake.
  BatchSpec spec = Spec(1, 100);
  BatchSampler s(*file_, 11, spec);
  std::vector<int> bins(49);
  for (uint64_t g = 0; g < 20000; ++g) {
    const uint64_t start = s.TrainWindowStart(g);
    ASSERT_LT(start, static_cast<uint64_t>(kTokens - 100));
    ++bins[start / 100];
  }
  for (int i = 0; i < 49; ++i) {
    EXPECT_GT(bins[i], 300) << "bin " << i;
    EXPECT_LT(bins[i], 520) << "bin " << i;
  }
}

TEST_F(SamplerTest, ValBatchesAreFixedAndEvenlySpaced) {
  BatchSpec spec = Spec(4, 50);
  BatchSampler s(*file_, 1, spec);
  BatchSampler other_seed(*file_, 999, spec);
  const int num_batches = 5;
  const int64_t windows = num_batches * spec.batch_size;
  const int64_t last = kTokens - spec.block_size - 1;
  std::vector<int64_t> all;
  for (int i = 0; i < num_batches; ++i) {
    const Batch b = Val(s, spec, i, num_batches);
    EXPECT_EQ(b, Val(other_seed, spec, i, num_batches)) << "val must not depend on the seed";
    EXPECT_EQ(b, Val(s, spec, i, num_batches));
    for (int64_t start : RowStarts(b, spec, kTokens)) all.push_back(start);
  }
  ASSERT_EQ(static_cast<int64_t>(all.size()), windows);
  for (int64_t w = 0; w < windows; ++w) EXPECT_EQ(all[w], w * last / (windows - 1)) << w;
  EXPECT_EQ(all.front(), 0);
  EXPECT_EQ(all.back(), last);  // the last window ends exactly at the file's last token
}

TEST_F(SamplerTest, SingleValWindowStartsAtZero) {
  BatchSpec spec = Spec(1, 10);
  BatchSampler s(*file_, 1, spec);
  EXPECT_EQ(RowStarts(Val(s, spec, 0, 1), spec, kTokens), std::vector<int64_t>{0});
}

TEST_F(SamplerTest, MoreValWindowsThanStartsStaysInBounds) {
  // A file of 12 tokens with block_size 8 has 4 possible starts; ask for 3 x 4 windows.
  std::unique_ptr<TokenFile> small = OpenIdentityFile("small.bin", 12);
  ASSERT_NE(small, nullptr);
  BatchSpec spec = Spec(4, 8);
  BatchSampler s(*small, 1, spec);
  std::set<int64_t> distinct;
  for (int i = 0; i < 3; ++i) {
    for (int64_t start : RowStarts(Val(s, spec, i, 3), spec, 12)) distinct.insert(start);
  }
  EXPECT_EQ(distinct, (std::set<int64_t>{0, 1, 2, 3}));
}

TEST_F(SamplerTest, ShortestFileHasExactlyOneWindow) {
  std::unique_ptr<TokenFile> small = OpenIdentityFile("min.bin", 9);
  ASSERT_NE(small, nullptr);
  BatchSpec spec = Spec(2, 8);
  BatchSampler s(*small, 77, spec);
  EXPECT_EQ(RowStarts(Train(s, spec, 3, 0), spec, 9), (std::vector<int64_t>{0, 0}));
}

TEST_F(SamplerTest, FileNotLongerThanBlockViolatesRequires) {
  std::unique_ptr<TokenFile> small = OpenIdentityFile("tiny.bin", 8);
  ASSERT_NE(small, nullptr);
  BatchSpec spec = Spec(1, 8);
  EXPECT_DEATH({ BatchSampler s(*small, 1, spec); }, "block_size");
}

}  // namespace
}  // namespace shoal::runtime
