// What a remote peer can hand a swarm peer, mutated at random: a stage snapshot (manifest and
// bytes, GetStageState's), a step of the catch-up log (header and bytes, GetUpdates'), and
// PeerGroup frames (Exchange's). Each mutation is seeded and replayable; the checks are the
// contract's, not a captured output: nothing crashes, and whatever is refused leaves the stage
// exactly as it was (parameter hash, step count, optimizer state).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "comm/peer_group.h"
#include "parallel/demo.h"
#include "parallel/layout.h"
#include "proto/swarm.pb.h"
#include "runtime/swarm_stage.h"
#include "runtime/swarm_sync.h"
#include "tests/runtime/swarm_reference.h"

namespace shoal::runtime {
namespace {

using namespace swarm_test;  // NOLINT: the shared model and data

constexpr int kMutations = 1500;

std::unique_ptr<SwarmStage> Stage(int stage, bool demo) {
  auto blocks = parallel::BlocksPerStage({}, Model().n_layer, kStages);
  EXPECT_TRUE(blocks.ok());
  const auto [first, end] = parallel::StageRange(*blocks, stage);
  SwarmStageOptions o;
  if (demo) {
    parallel::DemoOptions d;
    d.codec.chunk = 8;
    d.codec.topk = 4;
    d.codec.wire_dtype = at::kFloat;
    o.demo = d;
  }
  auto st = SwarmStage::Create(Model(), kSeed, stage, kStages, first, end, Adam(), o);
  EXPECT_TRUE(st.ok()) << st.status();
  return st.ok() ? std::move(*st) : nullptr;
}

// One step on stage 0 (a single micro-batch), so the stage has moments and a log entry.
void TakeAStep(SwarmStage& st, int64_t step) {
  const Batch b = MicroBatchOf(step, 0);
  auto y = st.Forward({step, 0}, b.tokens);
  ASSERT_TRUE(y.ok()) << y.status();
  auto g = st.Backward({step, 0}, b.tokens, at::ones_like(*y) * 1e-3, 1.0f, true);
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_TRUE(st.Settle({step, 0}, true).ok());
  if (st.demo()) {
    auto out = st.DemoCompress(kLr, 1, 2, kClip);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_TRUE(st.DemoApply({out->own}, {out->tied, out->tied}, kLr).ok());
  } else {
    st.Apply(kLr, 1.0);
  }
}

struct Fingerprint {
  uint32_t hash;
  int64_t steps;
  std::vector<at::Tensor> optimizer;
};

Fingerprint Take(const SwarmStage& st) {
  Fingerprint f{st.ParamHash(), st.optimizer_steps(), {}};
  for (const auto& [name, t] : st.OptimizerState()) f.optimizer.push_back(t.clone());
  return f;
}

void ExpectUnchanged(const SwarmStage& st, const Fingerprint& f, const std::string& what) {
  EXPECT_EQ(st.ParamHash(), f.hash) << what;
  EXPECT_EQ(st.optimizer_steps(), f.steps) << what;
  const auto now = st.OptimizerState();
  ASSERT_EQ(now.size(), f.optimizer.size()) << what;
  for (size_t i = 0; i < now.size(); ++i) {
    EXPECT_TRUE(at::equal(now[i].second, f.optimizer[i])) << what << ": " << now[i].first;
  }
}

int64_t Pick(std::mt19937_64& rng, std::vector<int64_t> values) {
  return values[rng() % values.size()];
}

// Odd values for an integer field: off by one, zero, negative, huge.
int64_t Odd(std::mt19937_64& rng, int64_t v) {
  return Pick(rng, {v - 1, v + 1, 0, -1, -v, v * 2, int64_t{1} << 40, INT64_MAX, INT64_MIN,
                    static_cast<int64_t>(rng() % 100000)});
}

void MutateBytes(std::mt19937_64& rng, std::string* bytes) {
  switch (rng() % 4) {
    case 0:
      if (!bytes->empty()) bytes->resize(rng() % bytes->size());
      break;
    case 1:
      bytes->append(1 + rng() % 64, static_cast<char>(rng()));
      break;
    default:
      for (int i = 0; i < 1 + static_cast<int>(rng() % 8) && !bytes->empty(); ++i) {
        (*bytes)[rng() % bytes->size()] ^= static_cast<char>(1 + rng() % 255);
      }
  }
}

TEST(SwarmInputsTest, MutatedSnapshotsAreRefusedWithoutChangingTheStage) {
  for (bool demo : {false, true}) {
    auto donor = Stage(0, demo);
    auto target = Stage(0, demo);
    ASSERT_NE(donor, nullptr);
    ASSERT_NE(target, nullptr);
    TakeAStep(*donor, 0);
    const StageSnapshot valid = SnapshotOf(*donor, 0, 1);
    std::mt19937_64 rng(demo ? 2 : 1);
    int refused = 0;
    for (int i = 0; i < kMutations; ++i) {
      StageSnapshot snap = valid;
      v1::StageStateManifest& m = snap.manifest;
      const int e = static_cast<int>(rng() % m.entries_size());
      v1::StateEntry* entry = m.mutable_entries(e);
      switch (rng() % 9) {
        case 0: entry->set_offset(Odd(rng, entry->offset())); break;
        case 1: entry->set_bytes(Odd(rng, entry->bytes())); break;
        case 2:
          if (entry->shape_size() > 0) entry->set_shape(0, Odd(rng, entry->shape(0)));
          break;
        case 3: entry->set_kind(rng() % 2 ? "exp_avg_sqq" : ""); break;
        case 4: entry->set_name(rng() % 2 ? "blocks.9.attn.qkv.weight" : "wte.weight"); break;
        case 5: m.set_total_bytes(Odd(rng, m.total_bytes())); break;
        case 6: m.set_step(Odd(rng, m.step())); break;
        case 7: m.set_stage(static_cast<int32_t>(Odd(rng, m.stage()))); break;
        default: MutateBytes(rng, &snap.bytes);
      }
      const Fingerprint before = Take(*target);
      const absl::Status s = LoadSnapshot(*target, snap);
      if (!s.ok()) {
        ++refused;
        ExpectUnchanged(*target, before, "mutation " + std::to_string(i) + ": " + s.ToString());
      }
      if (::testing::Test::HasFailure()) return;
    }
    EXPECT_GT(refused, kMutations / 2) << "demo " << demo;
  }
}

TEST(SwarmInputsTest, MutatedCatchUpStepsAreRefusedWithoutChangingTheStage) {
  for (bool demo : {false, true}) {
    auto donor = Stage(0, demo);
    auto target = Stage(0, demo);
    ASSERT_NE(donor, nullptr);
    ASSERT_NE(target, nullptr);
    TakeAStep(*donor, 0);
    auto log = donor->UpdatesFrom(1, 1);
    ASSERT_TRUE(log.ok() && log->size() == 1) << log.status();
    const EncodedUpdate valid = EncodeUpdate((*log)[0]);
    std::mt19937_64 rng(demo ? 4 : 3);
    int refused = 0;
    for (int i = 0; i < kMutations; ++i) {
      EncodedUpdate e = valid;
      v1::StepUpdateHeader& h = e.header;
      switch (rng() % 9) {
        case 0: h.set_step(Odd(rng, h.step())); break;
        case 1: h.set_kind(static_cast<v1::UpdateKind>(rng() % 4)); break;
        case 2: h.set_payload_bytes(Odd(rng, h.payload_bytes())); break;
        case 3: h.set_peers(static_cast<int32_t>(Odd(rng, h.peers()))); break;
        case 4: h.set_tied_peers(static_cast<int32_t>(Odd(rng, h.tied_peers()))); break;
        case 5: h.set_lr(Pick(rng, {-1, 0, 1}) * (rng() % 2 ? 1e300 : std::nan(""))); break;
        case 6: h.set_clip_scale(rng() % 2 ? 0.0 : 1.5); break;
        default: MutateBytes(rng, &e.bytes);
      }
      const Fingerprint before = Take(*target);
      absl::StatusOr<StepUpdate> u = DecodeUpdate(*target, e);
      absl::Status s = u.status();
      if (u.ok()) s = target->ApplyUpdate(*u);
      if (!s.ok()) {
        ++refused;
        ExpectUnchanged(*target, before, "mutation " + std::to_string(i) + ": " + s.ToString());
      } else {
        // Accepted (a payload value changed, not its structure): back to state 0 for the next.
        target = Stage(0, demo);
        ASSERT_NE(target, nullptr);
      }
      if (::testing::Test::HasFailure()) return;
    }
    EXPECT_GT(refused, kMutations / 2) << "demo " << demo;
  }
}

TEST(SwarmInputsTest, RandomExchangeFramesAreAnsweredWithoutCrashing) {
  auto mailbox = std::make_shared<comm::ExchangeMailbox>();
  std::mt19937_64 rng(5);
  int64_t refused = 0;
  for (int i = 0; i < 20 * kMutations; ++i) {
    v1::ExchangeFrame f;
    f.set_group(Pick(rng, {0, 1, 2}) == 0 ? std::string(1 + rng() % 300, 'g')
                                          : "s1.k" + std::to_string(rng() % 3));
    f.set_group_size(static_cast<int32_t>(Odd(rng, 3)));
    f.set_op_seq(rng() % 4);
    f.set_op(static_cast<v1::ExchangeOp>(rng() % 7));
    f.set_phase(static_cast<uint32_t>(rng() % 3));
    f.set_source_rank(static_cast<int32_t>(Odd(rng, 1)));
    f.set_dest_rank(static_cast<int32_t>(Odd(rng, 0)));
    f.set_dtype(static_cast<v1::ExchangeDType>(rng() % 10));
    f.set_transfer_bytes(Odd(rng, 64));
    f.set_piece_bytes(Odd(rng, 32));
    f.set_piece(Odd(rng, 1));
    f.set_offset(Odd(rng, 32));
    f.set_data(std::string(rng() % 70, static_cast<char>(rng())));
    if (rng() % 10 == 0) f.mutable_abort()->set_code(static_cast<int32_t>(Odd(rng, 14)));
    v1::ExchangeAck ack;
    if (!mailbox->Deliver(f, &ack).ok()) ++refused;
  }
  const comm::ExchangeMailbox::Stats stats = mailbox->stats();
  EXPECT_EQ(stats.frames_refused, refused);
  EXPECT_EQ(stats.frames_accepted + stats.frames_refused, 20 * kMutations);
  EXPECT_LE(stats.unclaimed_bytes, int64_t{256} << 20);
}

}  // namespace
}  // namespace shoal::runtime
