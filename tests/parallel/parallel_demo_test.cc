// Tests for parallel/demo.h: the real Demo optimizer driven by W in-process workers over W copies
// of a tiny model's flat buffers (no exchange; payloads are handed to Apply in worker order).
// Everything is checked against closed forms and invariants written in this file: moves of 0 or
// lr after the decoupled decay, signSGD when everything is sent (one worker and two), error
// feedback against the codec decoding the payload bytes at the documented offsets, replicas
// staying bit-identical, the byte count computed by hand from the chunk rule, refusals that leave
// everything untouched, the state dict round trip, and FNV-1a on bytes hashed by hand.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "memory/flat_buffer.h"
#include "parallel/demo.h"
#include "parallel/demo_codec.h"
#include "tests/parallel/demo_test_workers.h"

namespace shoal::parallel {
namespace {

using memory::FlatBuffer;
using ::testing::HasSubstr;
using ::shoal::testing::DemoTestSpecs;
using ::shoal::testing::ParamSpec;
using StateList = std::vector<std::pair<std::string, at::Tensor>>;
using Worker = ::shoal::testing::DemoTestWorker;

// The tiny model is DemoTestSpecs(): three 2-D weights with weight decay, then three vectors
// without.
constexpr int kNumParams = 6;

// A worker over the tiny model with parameters `init`. `name_prefix` renames every parameter
// (same shapes, another layout fingerprint).
std::unique_ptr<Worker> MakeWorker(const DemoOptions& options, const std::vector<at::Tensor>& init,
                                   const std::string& name_prefix = "") {
  auto w = ::shoal::testing::MakeDemoTestWorker(DemoTestSpecs(), options, name_prefix);
  EXPECT_TRUE(w.ok()) << w.status();
  if (!w.ok()) return nullptr;
  (*w)->SetParams(init);
  return *std::move(w);
}

std::vector<std::unique_ptr<Worker>> MakeWorkers(int count, const DemoOptions& options,
                                                 const std::vector<at::Tensor>& init) {
  std::vector<std::unique_ptr<Worker>> out;
  for (int i = 0; i < count; ++i) out.push_back(MakeWorker(options, init));
  return out;
}

// Small parameters (scale 0.01) so that float32 rounding of p is far below lr.
std::vector<at::Tensor> InitParams() {
  std::vector<at::Tensor> out;
  for (const ParamSpec& s : DemoTestSpecs()) out.push_back(0.01 * at::randn(s.shape));
  return out;
}

std::vector<at::Tensor> RandomGrads() {
  std::vector<at::Tensor> out;
  for (const ParamSpec& s : DemoTestSpecs()) out.push_back(at::randn(s.shape));
  return out;
}

// A tensor with |x| >= 0.1 everywhere and random signs: its sign survives any float rounding.
at::Tensor AwayFromZero(const std::vector<int64_t>& shape) {
  const at::Tensor u = at::randn(shape);
  return at::where(u >= 0, 0.1 + u.abs(), -(0.1 + u.abs()));
}

DemoOptions Options(int chunk, int topk, at::ScalarType wire, double decay = 0.999,
                    double weight_decay = 0.0) {
  DemoOptions o;
  o.codec = DemoCodecOptions{chunk, topk, wire};
  o.decay = decay;
  o.weight_decay = weight_decay;
  return o;
}

// One synchronous step of all workers: each compresses, then each applies all payloads in worker
// order. Returns the payloads.
std::vector<at::Tensor> StepAll(const std::vector<std::unique_ptr<Worker>>& workers, double lr,
                                double grad_scale) {
  std::vector<at::Tensor> payloads;
  for (const auto& w : workers) payloads.push_back(w->demo->Compress(lr, grad_scale));
  for (const auto& w : workers) {
    const absl::Status s = w->demo->Apply(payloads, lr);
    EXPECT_TRUE(s.ok()) << s;
  }
  return payloads;
}

double WeightDecayOf(int i, double weight_decay) {
  return DemoTestSpecs()[i].decay ? weight_decay : 0.0;
}

// Every element moves by exactly 0 or lr beyond the decoupled decay, |p_new − p·(1 − lr·λ)| ∈
// {0, lr}, for both groups (λ only on the decay group). lr = 2^-5 and λ = 0.25 make 1 − lr·λ
// exact in float; parameters stay below ~0.15 so their float32 rounding (≤ 1.5e-8) is within
// 1e-6·lr. One tile of fc.weight (rows 64..127, a whole 64×64 tile) gets zero gradient on every
// worker: nothing is ever selected there but zeros, so its elements must not move at all.
TEST(DemoTest, EveryElementMovesByZeroOrLrAfterDecay) {
  at::manual_seed(1);
  const double lr = 1.0 / 32, wd = 0.25;
  const int num_workers = 2;
  auto workers = MakeWorkers(num_workers, Options(64, 32, at::kFloat, 0.999, wd), InitParams());
  for (int step = 0; step < 3; ++step) {
    for (auto& w : workers) {
      std::vector<at::Tensor> g = RandomGrads();
      g[0].narrow(0, 64, 64).zero_();
      w->SetGrads(g);
    }
    const std::vector<at::Tensor> before = workers[0]->CloneParams();
    StepAll(workers, lr, 1.0);
    int64_t zeros = 0, lrs = 0, total = 0;
    for (int i = 0; i < kNumParams; ++i) {
      const at::Tensor expect_decayed =
          before[i].to(at::kDouble) * (1.0 - lr * WeightDecayOf(i, wd));
      const at::Tensor moved = (workers[0]->Param(i).to(at::kDouble) - expect_decayed).abs();
      const at::Tensor is_zero = moved <= 1e-6 * lr;
      const at::Tensor is_lr = (moved - lr).abs() <= 1e-6 * lr;
      EXPECT_TRUE((is_zero | is_lr).all().item<bool>())
          << DemoTestSpecs()[i].name << " step " << step
          << ": a move that is neither 0 nor lr, max " << moved.max().item<double>();
      zeros += is_zero.sum().item<int64_t>();
      lrs += is_lr.sum().item<int64_t>();
      total += moved.numel();
      if (i == 0) {
        EXPECT_TRUE(is_zero.narrow(0, 64, 64).all().item<bool>()) << "the all-zero tile moved";
      }
    }
    EXPECT_GE(zeros, 64 * 64) << "step " << step;
    EXPECT_GT(lrs, total / 2) << "step " << step;
  }
  EXPECT_EQ(workers[0]->demo->steps(), 3);
}

// topk ≥ every tile's size and one worker: everything is sent, so the update is signSGD with
// decoupled decay, p ← p·(1 − lr·λ) − lr·sign(g), and nothing stays in delta. Gradients are
// bounded away from 0 so the float32 DCT round trip cannot flip a sign.
TEST(DemoTest, OneWorkerSendingEverythingIsSignSgd) {
  at::manual_seed(2);
  const double lr = 1.0 / 32, wd = 0.25, scale = 0.5;
  auto worker = MakeWorker(Options(64, 4096, at::kFloat, 0.999, wd), InitParams());
  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> g;
    for (const ParamSpec& s : DemoTestSpecs()) g.push_back(AwayFromZero(s.shape));
    worker->SetGrads(g);
    const std::vector<at::Tensor> before = worker->CloneParams();
    const at::Tensor payload = worker->demo->Compress(lr, scale);
    ASSERT_TRUE(worker->demo->Apply({payload}, lr).ok());
    const StateList state = worker->demo->StateDict();
    for (int i = 0; i < kNumParams; ++i) {
      const at::Tensor expect = before[i].to(at::kDouble) * (1.0 - lr * WeightDecayOf(i, wd)) -
                                lr * g[i].sign().to(at::kDouble);
      const double err = (worker->Param(i).to(at::kDouble) - expect).abs().max().item<double>();
      EXPECT_LE(err, 1e-6 * lr) << DemoTestSpecs()[i].name << " step " << step;
      // state[0] is demo.step; the deltas follow in parameter order.
      const at::Tensor& delta = state[i + 1].second;
      ASSERT_EQ(state[i + 1].first, std::string("demo.delta.") + DemoTestSpecs()[i].name);
      EXPECT_LE(delta.abs().max().item<double>(),
                1e-5 * lr * scale * g[i].abs().max().item<double>())
          << DemoTestSpecs()[i].name << " step " << step;
    }
  }
}

// topk = all and W = 2: every worker's buffer is sent whole, so the decoded mean is
// lr·(g0 + g1)/2 and the update is −lr·sign(g0 + g1): distributed signSGD with mean aggregation.
// g0 = a + b, g1 = a − b with |a| ≥ 0.1 and b large, so the workers' own signs often disagree with
// the mean's (the test could not pass with either worker's sign alone).
TEST(DemoTest, TwoWorkersSendingEverythingIsSignOfMean) {
  at::manual_seed(3);
  const double lr = 1.0 / 32;
  auto workers = MakeWorkers(2, Options(64, 4096, at::kFloat, 0.5, 0.0), InitParams());
  std::vector<at::Tensor> a, g0, g1;
  for (const ParamSpec& s : DemoTestSpecs()) {
    a.push_back(AwayFromZero(s.shape));
    const at::Tensor b = 3.0 * at::randn(s.shape);
    g0.push_back(a.back() + b);
    g1.push_back(a.back() - b);
  }
  workers[0]->SetGrads(g0);
  workers[1]->SetGrads(g1);
  const std::vector<at::Tensor> before = workers[0]->CloneParams();
  StepAll(workers, lr, 1.0);
  int64_t disagree = 0, total = 0;
  for (int i = 0; i < kNumParams; ++i) {
    const at::Tensor expect = before[i].to(at::kDouble) - lr * a[i].sign().to(at::kDouble);
    for (int w = 0; w < 2; ++w) {
      const double err =
          (workers[w]->Param(i).to(at::kDouble) - expect).abs().max().item<double>();
      EXPECT_LE(err, 1e-6 * lr) << DemoTestSpecs()[i].name << " worker " << w;
    }
    disagree += (g0[i].sign() != a[i].sign()).sum().item<int64_t>();
    total += a[i].numel();
  }
  EXPECT_GT(disagree, total / 10);
}

// Reads the payload at the documented offsets: 16 header bytes, then per parameter
// (DemoTestSpecs() order) tiles·k int16 indices followed by tiles·k values in the wire dtype.
struct ParsedPayload {
  char magic[4];
  uint32_t fingerprint;
  int64_t step;
  std::vector<DemoSelection> selections;
  int64_t end;  // offset after the last block
};

ParsedPayload Parse(const at::Tensor& payload, const std::vector<DemoCodec>& codecs) {
  ParsedPayload out;
  const uint8_t* bytes = payload.data_ptr<uint8_t>();
  std::memcpy(out.magic, bytes, 4);
  std::memcpy(&out.fingerprint, bytes + 4, 4);
  std::memcpy(&out.step, bytes + 8, 8);
  int64_t offset = 16;
  for (const DemoCodec& c : codecs) {
    DemoSelection sel;
    sel.indices = at::empty({c.tiles(), c.k()}, at::kShort);
    std::memcpy(sel.indices.data_ptr(), bytes + offset, sel.indices.nbytes());
    offset += sel.indices.nbytes();
    sel.values = at::empty({c.tiles(), c.k()}, c.wire_dtype());
    std::memcpy(sel.values.data_ptr(), bytes + offset, sel.values.nbytes());
    offset += sel.values.nbytes();
    out.selections.push_back(std::move(sel));
  }
  out.end = offset;
  return out;
}

std::vector<DemoCodec> CodecsFor(const DemoOptions& options) {
  std::vector<DemoCodec> out;
  for (const ParamSpec& s : DemoTestSpecs()) {
    auto c = DemoCodec::Create(s.shape, options.codec);
    EXPECT_TRUE(c.ok()) << c.status();
    out.push_back(*std::move(c));
  }
  return out;
}

// Error feedback, checked through the wire: after Compress, delta_after + Decode(what the payload
// carries) == decay·delta_before + lr·scale·grad, for every parameter and each wire dtype (with
// bf16/fp16 the rounded values are what was subtracted). The payload is parsed at the documented
// offsets and decoded with a codec built here, so this also pins the wire layout: the header, the
// block order, and that each selection is a top-k of the DCT of the updated buffer.
TEST(DemoTest, ErrorFeedbackThroughThePayloadBytes) {
  for (at::ScalarType wire : {at::kFloat, at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(c10::toString(wire));
    at::manual_seed(4);
    const double lr = 0.01, scale = 0.5, decay = 0.9;
    const DemoOptions options = Options(16, 8, wire, decay, 0.1);
    auto worker = MakeWorker(options, InitParams());
    const std::vector<DemoCodec> codecs = CodecsFor(options);
    // A first step so that delta is non-zero before the one checked.
    worker->SetGrads(RandomGrads());
    ASSERT_TRUE(worker->demo->Apply({worker->demo->Compress(lr, scale)}, lr).ok());

    const std::vector<at::Tensor> g = RandomGrads();
    worker->SetGrads(g);
    std::vector<at::Tensor> delta_before;
    for (const auto& [name, t] : worker->demo->StateDict()) {
      if (name != "demo.step") delta_before.push_back(t.clone());
    }
    ASSERT_EQ(delta_before.size(), static_cast<size_t>(kNumParams));
    EXPECT_GT(delta_before[0].abs().max().item<double>(), 0);

    const at::Tensor payload = worker->demo->Compress(lr, scale);
    ASSERT_EQ(payload.scalar_type(), at::kByte);
    ASSERT_EQ(payload.numel(), worker->demo->PayloadBytes());
    const ParsedPayload parsed = Parse(payload, codecs);
    EXPECT_EQ(std::string(parsed.magic, 4), "SDM1");
    EXPECT_EQ(parsed.fingerprint, worker->demo->fingerprint());
    EXPECT_EQ(parsed.step, 2);
    EXPECT_EQ(parsed.end, payload.numel());

    const StateList after = worker->demo->StateDict();
    for (int i = 0; i < kNumParams; ++i) {
      SCOPED_TRACE(DemoTestSpecs()[i].name);
      const DemoCodec& codec = codecs[i];
      const DemoSelection& sel = parsed.selections[i];
      const at::Tensor target =
          delta_before[i].to(at::kDouble) * decay + lr * scale * g[i].to(at::kDouble);
      const at::Tensor sent = codec.Decode(codec.Decompress(sel, at::kDouble));
      const at::Tensor delta_after = after[i + 1].second.to(at::kDouble);
      const double err = (delta_after + sent - target).abs().max().item<double>();
      EXPECT_LE(err, 1e-5 * target.abs().max().item<double>());

      // Each tile's indices are distinct, in range, and a top-k by |coef| of the target's DCT
      // (within float rounding: the smallest sent |coef| is at least the largest unsent one), and
      // the values are those coefficients rounded to the wire dtype.
      const at::Tensor coefs = codec.Encode(target);  // (tiles, tile_numel) double
      const at::Tensor idx = sel.indices.to(at::kLong);
      ASSERT_TRUE((idx >= 0).all().item<bool>());
      ASSERT_TRUE((idx < codec.tile_numel()).all().item<bool>());
      const at::Tensor picked = coefs.gather(1, idx);
      const double value_tol = wire == at::kFloat ? 1e-5 : 1e-2;
      EXPECT_LE((sel.values.to(at::kDouble) - picked).abs().max().item<double>(),
                value_tol * coefs.abs().max().item<double>() + 1e-12);
      at::Tensor mask = at::ones_like(coefs, at::kBool);
      mask.scatter_(1, idx, false);
      EXPECT_EQ(mask.logical_not().sum(1).eq(codec.k()).all().item<bool>(), true)
          << "repeated index in a tile";
      if (codec.k() < codec.tile_numel()) {
        const at::Tensor min_sent = std::get<0>(picked.abs().min(1));
        const at::Tensor max_unsent = std::get<0>(at::where(mask, coefs.abs(), -1.0).max(1));
        EXPECT_TRUE((min_sent >= max_unsent - 1e-6 * coefs.abs().max()).all().item<bool>());
      }
    }
  }
}

// W = 3 workers with different gradients for 20 steps stay bit-identical: every worker applies
// the same payloads in worker order, though its own payload sits at a different position in the
// list on each worker. Their deltas differ (different data) while the parameters agree, which is
// what HashTensors is for.
TEST(DemoTest, ReplicasStayBitIdentical) {
  at::manual_seed(5);
  const double wd = 0.1;
  const std::vector<at::Tensor> init = InitParams();
  auto workers = MakeWorkers(3, Options(64, 32, at::kBFloat16, 0.999, wd), init);
  for (int step = 0; step < 20; ++step) {
    for (auto& w : workers) w->SetGrads(RandomGrads());
    const double lr = 0.01 * (1.0 + 0.5 * std::sin(step));  // a schedule, not a constant
    StepAll(workers, lr, 0.8);
    for (int w = 1; w < 3; ++w) {
      for (int f = 0; f < 2; ++f) {
        ASSERT_TRUE(at::equal(workers[w]->Flats()[f], workers[0]->Flats()[f]))
            << "worker " << w << " drifted at step " << step;
      }
      EXPECT_EQ(HashTensors(workers[w]->Flats()), HashTensors(workers[0]->Flats()));
    }
  }
  EXPECT_FALSE(at::equal(workers[0]->Param(0), init[0]));  // the steps moved the weights
  const StateList s0 = workers[0]->demo->StateDict(), s1 = workers[1]->demo->StateDict();
  EXPECT_FALSE(at::equal(s0[1].second, s1[1].second));  // each worker keeps its own residual
  EXPECT_EQ(workers[2]->demo->steps(), 20);
}

// PayloadBytes against the wire formula 16 + Σ tiles·k·(2 + value bytes), with tiles and k worked
// out by hand from the chunk rule for the tiny model's shapes.
TEST(DemoTest, PayloadBytesAndTrafficMatchTheClosedForm) {
  // chunk 64, topk 32: (n1 × n2 tiles, k = min(32, n1·n2))
  //   fc.weight 128×64  → 64×64,  2 tiles, k 32 →  64 picks
  //   proj.weight 96×40 → 48×40,  2 tiles, k 32 →  64
  //   head.weight 50×64 → 50×64,  1 tile,  k 32 →  32
  //   fc.bias 64        → 1×64,   1 tile,  k 32 →  32
  //   ln.gain 100       → 1×50,   2 tiles, k 32 →  64
  //   head.bias 97      → 1×1,   97 tiles, k 1  →  97      total 353 picks
  const int64_t picks_64_32 = 64 + 64 + 32 + 32 + 64 + 97;
  // chunk 16, topk 8:
  //   fc.weight 128×64  → 16×16, 8·4 = 32 tiles, k 8 → 256
  //   proj.weight 96×40 → 16×10, 6·4 = 24 tiles, k 8 → 192   (40: largest divisor < 16 is 10)
  //   head.weight 50×64 → 10×16, 5·4 = 20 tiles, k 8 → 160   (50: largest divisor < 16 is 10)
  //   fc.bias 64        → 1×16,  4 tiles,  k 8 →  32
  //   ln.gain 100       → 1×10, 10 tiles,  k 8 →  80
  //   head.bias 97      → 1×1,  97 tiles,  k 1 →  97      total 817 picks
  const int64_t picks_16_8 = 256 + 192 + 160 + 32 + 80 + 97;
  ASSERT_EQ(picks_64_32, 353);
  ASSERT_EQ(picks_16_8, 817);
  struct Case {
    int chunk, topk;
    at::ScalarType wire;
    int64_t bytes;
  };
  const std::vector<Case> cases = {
      {64, 32, at::kFloat, 16 + picks_64_32 * (2 + 4)},
      {64, 32, at::kBFloat16, 16 + picks_64_32 * (2 + 2)},
      {64, 32, at::kHalf, 16 + picks_64_32 * (2 + 2)},
      {16, 8, at::kFloat, 16 + picks_16_8 * (2 + 4)},
      {16, 8, at::kBFloat16, 16 + picks_16_8 * (2 + 2)},
      {16, 8, at::kHalf, 16 + picks_16_8 * (2 + 2)},
  };
  at::manual_seed(6);
  const std::vector<at::Tensor> init = InitParams();
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "chunk " << c.chunk << " topk " << c.topk << " "
                                    << c10::toString(c.wire));
    const int num_workers = 3;
    auto workers = MakeWorkers(num_workers, Options(c.chunk, c.topk, c.wire), init);
    EXPECT_EQ(workers[0]->demo->PayloadBytes(), c.bytes);
    for (auto& w : workers) w->SetGrads(RandomGrads());
    const std::vector<at::Tensor> payloads = StepAll(workers, 0.01, 1.0);
    EXPECT_EQ(payloads[0].numel(), c.bytes);
    const DemoTraffic t = workers[1]->demo->last_traffic();
    EXPECT_EQ(t.sent, c.bytes);
    EXPECT_EQ(t.received, num_workers * c.bytes);
  }
}

// Apply's refusals: each leaves the parameters and steps() as they were and names worker 1.
class DemoApplyRefusalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::manual_seed(7);
    init_ = InitParams();
    workers_ = MakeWorkers(2, options_, init_);
    for (auto& w : workers_) {
      w->SetGrads(RandomGrads());
      payloads_.push_back(w->demo->Compress(lr_, 1.0));
    }
  }

  // Applies {payloads_[0], bad} on worker 0 and checks the code, the message and that nothing
  // changed.
  void ExpectRefused(const at::Tensor& bad, absl::StatusCode code,
                     const std::vector<std::string>& in_message) {
    Worker& w = *workers_[0];
    const at::Tensor flat0 = w.Flats()[0].clone(), flat1 = w.Flats()[1].clone();
    const absl::Status s = w.demo->Apply({payloads_[0], bad}, lr_);
    EXPECT_EQ(s.code(), code) << s;
    for (const std::string& m : in_message) EXPECT_THAT(std::string(s.message()), HasSubstr(m));
    EXPECT_TRUE(at::equal(w.Flats()[0], flat0));
    EXPECT_TRUE(at::equal(w.Flats()[1], flat1));
    EXPECT_EQ(w.demo->steps(), 0);
  }

  // Byte offset of the int16 index block of parameter `param` (DemoTestSpecs() order), from the
  // layout.
  int64_t IndexOffset(int param) const {
    int64_t offset = kDemoHeaderBytes;
    const std::vector<DemoCodec> codecs = CodecsFor(options_);
    for (int i = 0; i < param; ++i) offset += codecs[i].tiles() * codecs[i].k() * (2 + 4);
    return offset;
  }

  const double lr_ = 0.01;
  const DemoOptions options_ = Options(64, 32, at::kFloat);
  std::vector<at::Tensor> init_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<at::Tensor> payloads_;
};

TEST_F(DemoApplyRefusalTest, PayloadOfAnotherSize) {
  ExpectRefused(payloads_[1].narrow(0, 0, payloads_[1].numel() - 2).clone(),
                absl::StatusCode::kInvalidArgument, {"worker 1"});
}

TEST_F(DemoApplyRefusalTest, BadMagic) {
  at::Tensor bad = payloads_[1].clone();
  bad.data_ptr<uint8_t>()[0] = 'X';
  ExpectRefused(bad, absl::StatusCode::kInvalidArgument, {"worker 1", "magic"});
}

TEST_F(DemoApplyRefusalTest, AnotherFingerprint) {
  // Bytes 4..7 overwritten: same size, another settings fingerprint.
  at::Tensor bad = payloads_[1].clone();
  uint32_t fp;
  std::memcpy(&fp, bad.data_ptr<uint8_t>() + 4, 4);
  fp ^= 1;
  std::memcpy(bad.data_ptr<uint8_t>() + 4, &fp, 4);
  ExpectRefused(bad, absl::StatusCode::kInvalidArgument, {"worker 1", "fingerprint"});
}

TEST_F(DemoApplyRefusalTest, PeerWithRenamedParameters) {
  // Same shapes (same payload size), other parameter names: another layout fingerprint.
  auto other = MakeWorker(options_, init_, "model.");
  ASSERT_EQ(other->demo->PayloadBytes(), workers_[0]->demo->PayloadBytes());
  EXPECT_NE(other->demo->fingerprint(), workers_[0]->demo->fingerprint());
  other->SetGrads(RandomGrads());
  ExpectRefused(other->demo->Compress(lr_, 1.0), absl::StatusCode::kInvalidArgument,
                {"worker 1"});
}

TEST_F(DemoApplyRefusalTest, PeerWithAnotherTopk) {
  auto other = MakeWorker(Options(64, 16, at::kFloat), init_);
  EXPECT_NE(other->demo->fingerprint(), workers_[0]->demo->fingerprint());
  other->SetGrads(RandomGrads());
  ExpectRefused(other->demo->Compress(lr_, 1.0), absl::StatusCode::kInvalidArgument,
                {"worker 1"});
}

TEST_F(DemoApplyRefusalTest, PayloadOfAnotherStep) {
  at::Tensor bad = payloads_[1].clone();
  const int64_t step = 2;  // worker 0 is at step 1
  std::memcpy(bad.data_ptr<uint8_t>() + 8, &step, 8);
  ExpectRefused(bad, absl::StatusCode::kFailedPrecondition, {"worker 1"});
}

TEST_F(DemoApplyRefusalTest, IndexOutOfRange) {
  // proj.weight's first index of tile 0 set to 32767 (its tiles hold 48·40 = 1920 coefficients).
  at::Tensor bad = payloads_[1].clone();
  const int16_t huge = 32767;
  std::memcpy(bad.data_ptr<uint8_t>() + IndexOffset(1), &huge, 2);
  ExpectRefused(bad, absl::StatusCode::kDataLoss, {"worker 1", "proj.weight"});
}

TEST_F(DemoApplyRefusalTest, RepeatedIndex) {
  // ln.gain's tile 0: the second index set equal to the first.
  at::Tensor bad = payloads_[1].clone();
  uint8_t* bytes = bad.data_ptr<uint8_t>();
  std::memcpy(bytes + IndexOffset(4) + 2, bytes + IndexOffset(4), 2);
  ExpectRefused(bad, absl::StatusCode::kDataLoss, {"worker 1", "ln.gain"});
}

TEST_F(DemoApplyRefusalTest, GoodPayloadsStillApplyAfterRefusals) {
  at::Tensor bad = payloads_[1].clone();
  bad.data_ptr<uint8_t>()[1] = 'X';
  ExpectRefused(bad, absl::StatusCode::kInvalidArgument, {"worker 1"});
  ASSERT_TRUE(workers_[0]->demo->Apply(payloads_, lr_).ok());
  EXPECT_EQ(workers_[0]->demo->steps(), 1);
}

TEST(DemoCreateTest, RefusesOptionsOutOfRangeNamingThem) {
  struct Case {
    DemoOptions options;
    std::string names;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<Case> cases = {
      {Options(64, 32, at::kFloat, 1.0), "decay"},
      {Options(64, 32, at::kFloat, -0.1), "decay"},
      {Options(64, 0, at::kFloat), "topk"},
      {Options(0, 32, at::kFloat), "chunk"},
      {Options(64, 32, at::kDouble), "wire dtype"},
      {Options(64, 32, at::kFloat, 0.999, -0.1), "weight_decay"},
      {Options(64, 32, at::kFloat, 0.999, nan), "weight_decay"},
  };
  for (const Case& c : cases) {
    FlatBuffer params, grads;
    for (const ParamSpec& s : DemoTestSpecs()) params.Add(s.name, s.shape);
    params.Allocate();
    grads = params.MakeLike();
    const auto demo = Demo::Create({{&params, &grads, true}}, c.options);
    ASSERT_FALSE(demo.ok()) << c.names;
    EXPECT_EQ(demo.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(demo.status().message()), HasSubstr(c.names));
  }
}

// A second optimizer loaded with the first's state (and the same parameters) steps exactly like
// the first afterwards; one given the parameters but not the state does not (delta matters).
TEST(DemoStateTest, RoundTripThenStepIdentically) {
  at::manual_seed(8);
  const DemoOptions options = Options(16, 8, at::kBFloat16, 0.99, 0.1);
  const std::vector<at::Tensor> init = InitParams();
  auto a = MakeWorker(options, init);
  auto b = MakeWorker(options, init);
  auto c = MakeWorker(options, init);
  for (int step = 0; step < 3; ++step) {
    a->SetGrads(RandomGrads());
    ASSERT_TRUE(a->demo->Apply({a->demo->Compress(0.01, 1.0)}, 0.01).ok());
  }
  const StateList state = a->demo->StateDict();
  ASSERT_EQ(state.size(), static_cast<size_t>(kNumParams + 1));
  EXPECT_EQ(state[0].first, "demo.step");
  EXPECT_EQ(state[0].second.item<int64_t>(), 3);
  b->SetParams(a->CloneParams());
  c->SetParams(a->CloneParams());
  ASSERT_TRUE(b->demo->LoadStateDict(state).ok());
  EXPECT_EQ(b->demo->steps(), 3);
  // c has the step count but not the residual.
  StateList c_state = c->demo->StateDict();
  c_state[0].second = at::scalar_tensor(3, at::kLong);
  ASSERT_TRUE(c->demo->LoadStateDict(c_state).ok());
  for (int step = 0; step < 2; ++step) {
    const std::vector<at::Tensor> g = RandomGrads();
    for (Worker* w : {a.get(), b.get(), c.get()}) {
      w->SetGrads(g);
      ASSERT_TRUE(w->demo->Apply({w->demo->Compress(0.01, 1.0)}, 0.01).ok());
    }
  }
  for (int f = 0; f < 2; ++f) EXPECT_TRUE(at::equal(b->Flats()[f], a->Flats()[f]));
  const StateList sa = a->demo->StateDict(), sb = b->demo->StateDict();
  for (size_t i = 1; i < sa.size(); ++i) EXPECT_TRUE(at::equal(sa[i].second, sb[i].second));
  EXPECT_EQ(b->demo->steps(), 5);
  EXPECT_FALSE(at::equal(c->Flats()[0], a->Flats()[0]));
}

// LoadStateDict's refusals: kDataLoss naming the tensor, with nothing changed.
TEST(DemoStateTest, RefusesDamagedStateWithoutSideEffects) {
  at::manual_seed(9);
  const DemoOptions options = Options(64, 32, at::kFloat);
  const std::vector<at::Tensor> init = InitParams();
  auto source = MakeWorker(options, init);
  auto target = MakeWorker(options, init);
  for (Worker* w : {source.get(), target.get()}) {  // different residuals on each
    w->SetGrads(RandomGrads());
    ASSERT_TRUE(w->demo->Apply({w->demo->Compress(0.01, 1.0)}, 0.01).ok());
  }
  source->SetGrads(RandomGrads());
  ASSERT_TRUE(source->demo->Apply({source->demo->Compress(0.01, 1.0)}, 0.01).ok());
  ASSERT_EQ(source->demo->steps(), 2);

  auto cloned = [](const StateList& s) {
    StateList out;
    for (const auto& [n, t] : s) out.emplace_back(n, t.clone());
    return out;
  };
  const StateList target_before = cloned(target->demo->StateDict());
  auto expect_refused = [&](const StateList& bad, const std::string& name) {
    const absl::Status s = target->demo->LoadStateDict(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(name));
    EXPECT_EQ(target->demo->steps(), 1);
    const StateList now = target->demo->StateDict();
    for (size_t i = 1; i < now.size(); ++i) {
      EXPECT_TRUE(at::equal(now[i].second, target_before[i].second)) << now[i].first;
    }
  };

  StateList missing = cloned(source->demo->StateDict());
  missing.erase(missing.begin() + 5);  // demo.delta.ln.gain (the last but one)
  ASSERT_EQ(source->demo->StateDict()[5].first, "demo.delta.ln.gain");
  expect_refused(missing, "demo.delta.ln.gain");

  StateList wrong_shape = cloned(source->demo->StateDict());
  wrong_shape[2].second = at::zeros({96, 41});  // demo.delta.proj.weight is (96, 40)
  expect_refused(wrong_shape, "demo.delta.proj.weight");

  StateList negative = cloned(source->demo->StateDict());
  negative[0].second = at::scalar_tensor(-1, at::kLong);
  expect_refused(negative, "demo.step");

  // The undamaged state loads.
  ASSERT_TRUE(target->demo->LoadStateDict(source->demo->StateDict()).ok());
  EXPECT_EQ(target->demo->steps(), 2);
}

// 64-bit FNV-1a, written out here: h = offset basis; per byte h ^= byte; h *= prime (mod 2^64).
uint64_t Fnv1a64(const std::vector<uint8_t>& bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (uint8_t b : bytes) {
    h ^= b;
    h *= 0x100000001b3ULL;
  }
  return h;
}

TEST(HashTensorsTest, IsFnv1aOverTheRawBytes) {
  // 1.0f is 0x3F800000: little-endian bytes 00 00 80 3F. Worked by hand (and by Fnv1a64 above):
  // 0x4b72477f9c5c2f98.
  EXPECT_EQ(Fnv1a64({0x00, 0x00, 0x80, 0x3F}), 0x4b72477f9c5c2f98ULL);
  EXPECT_EQ(HashTensors({at::tensor({1.0f})}), 0x4b72477f9c5c2f98ULL);
  // Tensors are hashed one after the other: {1.0f}, {-2.0f} (0xC0000000) is the hash of the
  // eight bytes 00 00 80 3F 00 00 00 C0.
  EXPECT_EQ(HashTensors({at::tensor({1.0f}), at::tensor({-2.0f})}),
            Fnv1a64({0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0}));
  EXPECT_EQ(HashTensors({}), 0xcbf29ce484222325ULL);

  at::manual_seed(10);
  const at::Tensor x = at::randn({17, 9});
  EXPECT_EQ(HashTensors({x}), HashTensors({x.clone()}));
  EXPECT_EQ(HashTensors({x.t()}), HashTensors({x.t().contiguous()}));  // made contiguous first
  at::Tensor flipped = x.clone();
  int32_t bits;
  std::memcpy(&bits, flipped.data_ptr<float>() + 40, 4);
  bits ^= 1;  // lowest mantissa bit of one element
  std::memcpy(flipped.data_ptr<float>() + 40, &bits, 4);
  EXPECT_NE(HashTensors({x}), HashTensors({flipped}));
}

}  // namespace
}  // namespace shoal::parallel
