// comm::PeerGroup with real gRPC servers on 127.0.0.1.
//
//   - Rank processes (copies of this binary, rank_launcher.h): each starts its own
//     ExchangeServer on a free port, publishes its address in a shared folder and reads everyone
//     else's, which gives the roster. Then: all-reduce results bit-identical on every peer and
//     equal to the inputs summed in rank order in float (computed here, element by element);
//     tensors of many frames; all-gather, broadcast, reduce-scatter; a peer killed with SIGKILL in
//     the middle of an all-reduce; the backend conformance cases (conformance_cases.h).
//   - In this process, with peers played by hand over raw Exchange calls: frames that are
//     refused (wrong token, group, piece, ...), ranks that disagree, a peer's abort, a missing or
//     unreachable peer, TLS, a group destroyed with an operation in flight.
#include "comm/peer_group.h"

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "proto/swarm.grpc.pb.h"
#include "tests/comm/conformance_cases.h"
#include "tests/comm/rank_launcher.h"
#include "tests/test_util.h"

namespace shoal::comm {
namespace {

using ::shoal::testing::EnvInt;
using ::shoal::testing::EnvString;
using ::shoal::testing::RankResult;
using ::shoal::testing::TempDir;

constexpr char kCaseEnv[] = "SHOAL_PG_CASE";
constexpr char kWorldEnv[] = "SHOAL_PG_WORLD";
constexpr char kDirEnv[] = "SHOAL_PG_DIR";
constexpr char kNumelEnv[] = "SHOAL_PG_NUMEL";
constexpr char kFrameEnv[] = "SHOAL_PG_FRAME";
constexpr char kVictimEnv[] = "SHOAL_PG_VICTIM";
constexpr char kToken[] = "peer-group-test-token";

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- Inputs and references, defined here independently of the code under test. ----

// n floats for `seed`: signs and mantissas from splitmix64, magnitudes spread over 2^-10..2^10,
// so that float sums round, and the order of a sum shows in its bits.
std::vector<float> Values(uint64_t seed, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (int64_t i = 0; i < n; ++i) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float unit = static_cast<float>(z >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f;
    out[static_cast<size_t>(i)] = std::ldexp(unit, static_cast<int>((z >> 8) % 21) - 10);
  }
  return out;
}

// The inputs summed in the order given, one float addition at a time.
std::vector<float> SumInOrder(const std::vector<std::vector<float>>& inputs) {
  std::vector<float> sum = inputs[0];
  for (size_t r = 1; r < inputs.size(); ++r) {
    for (size_t i = 0; i < sum.size(); ++i) sum[i] = sum[i] + inputs[r][i];
  }
  return sum;
}

at::Tensor TensorOf(const std::vector<float>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
  if (!v.empty()) std::memcpy(t.data_ptr<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

// OK when the tensor holds exactly the bytes of `want`; else names the first difference.
absl::Status SameBytes(const at::Tensor& t, const std::vector<float>& want,
                       const std::string& what) {
  if (t.numel() != static_cast<int64_t>(want.size()) || t.scalar_type() != at::kFloat) {
    return absl::InternalError(absl::StrCat(what, ": ", t.numel(), " elements, expected ",
                                            want.size(), " floats"));
  }
  const float* got = t.data_ptr<float>();
  if (std::memcmp(got, want.data(), want.size() * sizeof(float)) == 0) return absl::OkStatus();
  int64_t first = -1, count = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++count;
    }
  }
  return absl::InternalError(absl::StrCat(what, ": element ", first, " is ", got[first],
                                          ", expected ", want[static_cast<size_t>(first)], " (",
                                          count, " of ", want.size(), " differ)"));
}

absl::Status WaitOn(std::unique_ptr<Work> work) { return work->Wait(); }

// ---- Inside a rank process. ----

struct RankPeer {
  std::shared_ptr<ExchangeMailbox> mailbox;
  std::unique_ptr<ExchangeServer> server;
  std::vector<std::string> roster;
};

// Starts this rank's server, publishes its address as <dir>/addr.<rank> and waits (60 s at
// most) until every rank's is there.
absl::Status JoinRoster(const std::string& dir, int rank, int world, RankPeer* peer) {
  peer->mailbox = std::make_shared<ExchangeMailbox>();
  ExchangeServerOptions o;
  o.token = kToken;
  absl::StatusOr<std::unique_ptr<ExchangeServer>> server = ExchangeServer::Start(o, peer->mailbox);
  if (!server.ok()) return server.status();
  peer->server = std::move(*server);
  const std::string mine = absl::StrCat("127.0.0.1:", peer->server->port());
  if (absl::Status s = WriteFileAtomic(absl::StrCat(dir, "/addr.", rank), mine); !s.ok()) {
    return s;
  }
  peer->roster.assign(static_cast<size_t>(world), "");
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int r = 0; r < world; ++r) {
    while (true) {
      absl::StatusOr<std::string> a = ReadFileToString(absl::StrCat(dir, "/addr.", r));
      if (a.ok() && !a->empty()) {
        peer->roster[static_cast<size_t>(r)] = *a;
        break;
      }
      if (std::chrono::steady_clock::now() > end) {
        return absl::DeadlineExceededError(absl::StrCat("rank ", r, " never published"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PeerGroup>> MakeGroup(const RankPeer& peer,
                                                     std::vector<std::string> roster, int rank,
                                                     const std::string& group,
                                                     absl::Duration timeout,
                                                     int64_t frame_bytes = kMaxFrameBytes) {
  PeerGroupOptions o;
  o.roster = std::move(roster);
  o.rank = rank;
  o.group = group;
  o.token = kToken;
  o.timeout = timeout;
  o.frame_bytes = frame_bytes;
  return PeerGroup::Create(o, peer.mailbox);
}

// Every collective on inputs every rank can compute, checked against references computed
// element by element; the all-reduce results also go to <dir>/result.<op>.<rank> for the test
// to compare across ranks.
absl::Status DeterminismBody(PeerGroup& g, const std::string& dir, int64_t n) {
  const int p = g.size();
  const int me = g.rank();
  std::vector<std::vector<float>> inputs;
  for (int r = 0; r < p; ++r) inputs.push_back(Values(static_cast<uint64_t>(r), n));
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
    std::vector<float> want = SumInOrder(inputs);
    if (op == ReduceOp::kAvg) {
      for (float& x : want) x = x / static_cast<float>(p);
    }
    at::Tensor t = TensorOf(inputs[static_cast<size_t>(me)]);
    const std::string what = absl::StrCat("allreduce ", conformance::ReduceOpName(op), " of ", n);
    CONF_OK(WaitOn(g.AllReduce(t, op)));
    CONF_OK(SameBytes(t, want, what));
    const char* bytes = static_cast<const char*>(t.data_ptr());
    CONF_OK(WriteFileAtomic(absl::StrCat(dir, "/result.", conformance::ReduceOpName(op), ".", me),
                            absl::string_view(bytes, t.nbytes())));
  }
  // The inputs can tell summation orders apart (with three or more ranks; two floats add the
  // same either way), so the comparison above would catch a rank that summed in another order.
  if (p >= 3 && n >= 1000) {
    std::vector<std::vector<float>> reversed(inputs.rbegin(), inputs.rend());
    CONF_CHECK(!SameBytes(TensorOf(SumInOrder(reversed)), SumInOrder(inputs), "order").ok(),
               "reversed order gives the same bits");
  }
  // All-gather: every rank's input, in rank order.
  {
    const int64_t m = 1003;
    std::vector<float> want;
    for (int r = 0; r < p; ++r) {
      std::vector<float> v = Values(static_cast<uint64_t>(50 + r), m);
      want.insert(want.end(), v.begin(), v.end());
    }
    at::Tensor in = TensorOf(Values(static_cast<uint64_t>(50 + me), m));
    at::Tensor out = at::full({p * m}, -1.0f);
    CONF_OK(WaitOn(g.AllGather(out, in)));
    CONF_OK(SameBytes(out, want, "allgather"));
  }
  // Broadcast from every root.
  {
    const int64_t m = std::min<int64_t>(n, int64_t{1} << 20);
    for (int root = 0; root < p; ++root) {
      const std::vector<float> want = Values(static_cast<uint64_t>(100 + root), m);
      at::Tensor t = me == root ? TensorOf(want) : at::full({m}, -1.0f);
      CONF_OK(WaitOn(g.Broadcast(t, root)));
      CONF_OK(SameBytes(t, want, absl::StrCat("broadcast from ", root)));
    }
  }
  // Reduce-scatter: this rank's shard of the rank-order sum.
  {
    const int64_t m = 1001;
    std::vector<std::vector<float>> in;
    for (int r = 0; r < p; ++r) in.push_back(Values(static_cast<uint64_t>(200 + r), p * m));
    const std::vector<float> sum = SumInOrder(in);
    const std::vector<float> want(sum.begin() + me * m, sum.begin() + (me + 1) * m);
    at::Tensor out = at::full({m}, -1.0f);
    CONF_OK(WaitOn(g.ReduceScatter(out, TensorOf(in[static_cast<size_t>(me)]), ReduceOp::kSum)));
    CONF_OK(SameBytes(out, want, "reduce_scatter"));
  }
  CONF_OK(WaitOn(g.Barrier()));
  return absl::OkStatus();
}

// The victim issues an all-reduce of many small frames and kills itself with SIGKILL as soon
// as frames of that all-reduce reach it. The survivors' all-reduce must fail within the timeout
// with a status naming the victim, leave their tensor untouched, refuse further work, and a new
// group without the victim must then succeed.
absl::Status KilledBody(const RankPeer& peer, int rank, int victim, int64_t n) {
  const int world = static_cast<int>(peer.roster.size());
  const absl::Duration timeout = absl::Seconds(20);
  absl::StatusOr<std::unique_ptr<PeerGroup>> g =
      MakeGroup(peer, peer.roster, rank, "killed.try0", timeout, 64 << 10);
  CONF_OK(g.status());
  const std::vector<float> input = Values(static_cast<uint64_t>(rank), n);
  at::Tensor t = TensorOf(input);
  if (rank == victim) {
    auto work = (*g)->AllReduce(t, ReduceOp::kSum);
    const auto t0 = std::chrono::steady_clock::now();
    while (peer.mailbox->stats().frames_accepted == 0 && SecondsSince(t0) < 30) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::printf("rank %d: killing myself mid-allreduce (%lld frames in)\n", rank,
                static_cast<long long>(peer.mailbox->stats().frames_accepted));
    std::fflush(stdout);
    ::kill(::getpid(), SIGKILL);
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return absl::InternalError("still alive after SIGKILL");
  }
  const std::string victim_name = absl::StrCat("rank ", victim, " (", peer.roster[victim], ")");
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = WaitOn((*g)->AllReduce(t, ReduceOp::kSum));
  const double took = SecondsSince(t0);
  std::printf("rank %d: allreduce with the victim: %s (%.2f s)\n", rank, s.ToString().c_str(),
              took);
  CONF_CHECK(absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s), "got ", s.ToString());
  CONF_CHECK(absl::StrContains(s.message(), victim_name), "does not name ", victim_name, ": ",
             s.message());
  CONF_CHECK(took < absl::ToDoubleSeconds(timeout) + 5, "took ", took, " s");
  CONF_OK(SameBytes(t, input, "the tensor after the failed allreduce"));
  const absl::Status after = WaitOn((*g)->AllReduce(t, ReduceOp::kSum));
  CONF_CHECK(absl::IsFailedPrecondition(after), "after the failure: ", after.ToString());

  // The round again, without the victim.
  std::vector<std::string> survivors;
  std::vector<std::vector<float>> inputs;
  int new_rank = -1;
  for (int r = 0; r < world; ++r) {
    if (r == victim) continue;
    if (r == rank) new_rank = static_cast<int>(survivors.size());
    survivors.push_back(peer.roster[r]);
    inputs.push_back(Values(static_cast<uint64_t>(r), n));
  }
  absl::StatusOr<std::unique_ptr<PeerGroup>> again =
      MakeGroup(peer, survivors, new_rank, "killed.try1", timeout, 64 << 10);
  CONF_OK(again.status());
  CONF_OK(WaitOn((*again)->AllReduce(t, ReduceOp::kSum)));
  CONF_OK(SameBytes(t, SumInOrder(inputs), "allreduce without the victim"));
  return absl::OkStatus();
}

const conformance::Case* FindConformanceCase(const std::string& name) {
  for (const conformance::Case& c : conformance::AllCases()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

int RunRank() {
  ::alarm(110);  // a rank never outlives its test by much, whatever happens
  const std::string name = EnvString(kCaseEnv);
  const int rank = EnvInt(::shoal::testing::kRankEnv, -1);
  const int world = EnvInt(kWorldEnv, -1);
  const std::string dir = EnvString(kDirEnv);
  if (rank < 0 || world < 1 || dir.empty()) {
    std::fprintf(stderr, "rank process: bad environment\n");
    return 2;
  }
  RankPeer peer;
  if (absl::Status s = JoinRoster(dir, rank, world, &peer); !s.ok()) {
    std::printf("rank %d: joining the roster: %s\n", rank, s.ToString().c_str());
    return 1;
  }
  absl::Status s;
  if (name == "determinism") {
    auto g = MakeGroup(peer, peer.roster, rank, "determinism", absl::Seconds(60),
                       EnvInt(kFrameEnv, static_cast<int>(kMaxFrameBytes)));
    s = g.ok() ? DeterminismBody(**g, dir, EnvInt(kNumelEnv, 1000)) : g.status();
  } else if (name == "killed") {
    s = KilledBody(peer, rank, EnvInt(kVictimEnv, world - 1), EnvInt(kNumelEnv, 1000));
  } else if (const conformance::Case* c = FindConformanceCase(name); c != nullptr) {
    auto g = MakeGroup(peer, peer.roster, rank, c->name, c->backend_timeout);
    s = g.ok() ? c->run(**g) : g.status();
  } else {
    s = absl::InvalidArgumentError("unknown case " + name);
  }
  std::printf("rank %d: %s: %s\n", rank, name.c_str(), s.ToString().c_str());
  std::fflush(stdout);
  return s.ok() ? 0 : 1;
}

// ---- The tests that start ranks. ----

std::vector<RankResult> LaunchCase(const std::string& name, int world, const TempDir& dir,
                                   std::map<std::string, std::string> env = {}) {
  env[kCaseEnv] = name;
  env[kWorldEnv] = std::to_string(world);
  env[kDirEnv] = dir.path();
  std::vector<int> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(r);
  return ::shoal::testing::LaunchRanks(ranks, env, std::chrono::seconds(100));
}

struct DeterminismParam {
  int world;
  int64_t numel;
  int64_t frame_bytes;
};

class DeterminismTest : public ::testing::TestWithParam<DeterminismParam> {};

// Every rank checks its results against the rank-order references; here the all-reduce
// results of all ranks are compared byte for byte.
TEST_P(DeterminismTest, ResultsAreBitIdenticalAndEqualTheRankOrderSum) {
  const DeterminismParam p = GetParam();
  TempDir dir;
  const auto results = LaunchCase(
      "determinism", p.world, dir,
      {{kNumelEnv, std::to_string(p.numel)}, {kFrameEnv, std::to_string(p.frame_bytes)}});
  for (const RankResult& r : results) {
    ASSERT_EQ(r.exit_code, 0) << ::shoal::testing::DescribeRanks(results);
  }
  for (const char* op : {"sum", "avg"}) {
    const std::string first = ::shoal::testing::ReadTextFile(dir / absl::StrCat("result.", op, ".0"));
    ASSERT_EQ(first.size(), static_cast<size_t>(p.numel) * sizeof(float)) << op;
    for (int r = 1; r < p.world; ++r) {
      EXPECT_TRUE(first == ::shoal::testing::ReadTextFile(dir / absl::StrCat("result.", op, ".", r)))
          << op << ": rank " << r << "'s result differs from rank 0's";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Worlds, DeterminismTest,
    ::testing::Values(
        // 3M floats: 12 MB, several 4 MiB frames per transfer on 1 or 2 peers.
        DeterminismParam{1, 3000000, kMaxFrameBytes}, DeterminismParam{2, 3000000, kMaxFrameBytes},
        DeterminismParam{3, 3000000, kMaxFrameBytes}, DeterminismParam{4, 3000000, kMaxFrameBytes},
        // Uneven shards cut into many small frames.
        DeterminismParam{3, 100003, 16 << 10},
        // Fewer elements than peers: some shards are empty.
        DeterminismParam{4, 3, kMaxFrameBytes}),
    [](const ::testing::TestParamInfo<DeterminismParam>& info) {
      return absl::StrCat("World", info.param.world, "Numel", info.param.numel, "Frame",
                          info.param.frame_bytes);
    });

struct KilledParam {
  int world;
  int victim;
};

class KilledPeerTest : public ::testing::TestWithParam<KilledParam> {};

TEST_P(KilledPeerTest, SurvivorsFailNamingItKeepTheirInputAndRegroup) {
  const KilledParam p = GetParam();
  TempDir dir;
  const auto results = LaunchCase(
      "killed", p.world, dir,
      {{kNumelEnv, std::to_string(3000000)}, {kVictimEnv, std::to_string(p.victim)}});
  for (const RankResult& r : results) {
    // What each survivor saw, and how long it took, for the log.
    for (absl::string_view line : absl::StrSplit(r.output, '\n')) {
      if (absl::StrContains(line, "with the victim")) std::printf("%s\n", std::string(line).c_str());
    }
    if (r.rank == p.victim) {
      EXPECT_EQ(r.exit_code, 128 + SIGKILL) << ::shoal::testing::DescribeRanks(results);
    } else {
      EXPECT_EQ(r.exit_code, 0) << ::shoal::testing::DescribeRanks(results);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Victims, KilledPeerTest,
                         ::testing::Values(KilledParam{4, 3}, KilledParam{3, 0}),
                         [](const ::testing::TestParamInfo<KilledParam>& info) {
                           return absl::StrCat("World", info.param.world, "Victim",
                                               info.param.victim);
                         });

// The backend conformance cases, on peer groups of 1, 2 and 3 (uneven shards). Left out:
// point-to-point (not implemented here) and the rendezvous case (a peer group has none).
class ConformanceTest : public ::testing::Test {
 public:
  ConformanceTest(const conformance::Case* c, int world) : case_(c), world_(world) {}
  void TestBody() override {
    TempDir dir;
    const auto results = LaunchCase(case_->name, world_, dir);
    for (const RankResult& r : results) {
      EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                                << ::shoal::testing::DescribeRanks(results);
    }
  }

 private:
  const conformance::Case* case_;
  const int world_;
};

void RegisterConformanceTests() {
  for (int world : {1, 2, 3}) {
    for (const conformance::Case& c : conformance::AllCases()) {
      if (c.run == nullptr || std::string(c.name) == "SendRecvRing" || world < c.min_world) {
        continue;
      }
      const conformance::Case* cp = &c;
      ::testing::RegisterTest(("ConformanceWorld" + std::to_string(world)).c_str(), c.name,
                              nullptr, nullptr, __FILE__, __LINE__,
                              [=]() -> ::testing::Test* { return new ConformanceTest(cp, world); });
    }
  }
}

// ---- In this process: peers played by hand. ----

struct LocalPeer {
  std::shared_ptr<ExchangeMailbox> mailbox;
  std::unique_ptr<ExchangeServer> server;
  std::string address;
};

LocalPeer StartLocalPeer(const std::string& token = kToken, ExchangeMailboxOptions mo = {},
                         const std::string& cert = "", const std::string& key = "",
                         const std::string& listen = "127.0.0.1:0") {
  LocalPeer p;
  p.mailbox = std::make_shared<ExchangeMailbox>(mo);
  ExchangeServerOptions o;
  o.listen = listen;
  o.token = token;
  o.tls_cert_file = cert;
  o.tls_key_file = key;
  auto server = ExchangeServer::Start(o, p.mailbox);
  EXPECT_TRUE(server.ok()) << server.status();
  if (server.ok()) {
    p.server = std::move(*server);
    p.address = absl::StrCat("127.0.0.1:", p.server->port());
  }
  return p;
}

PeerGroupOptions GroupOptions(std::vector<std::string> roster, int rank, const std::string& group,
                              absl::Duration timeout = absl::Seconds(20)) {
  PeerGroupOptions o;
  o.roster = std::move(roster);
  o.rank = rank;
  o.group = group;
  o.token = kToken;
  o.timeout = timeout;
  return o;
}

std::unique_ptr<PeerGroup> MustCreate(const PeerGroupOptions& o, const LocalPeer& peer) {
  auto g = PeerGroup::Create(o, peer.mailbox);
  EXPECT_TRUE(g.ok()) << g.status();
  return g.ok() ? std::move(*g) : nullptr;
}

// A raw client of one peer's Exchange.
class RawClient {
 public:
  explicit RawClient(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(16 << 20);
    stub_ = v1::SwarmPeer::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  }
  grpc::Status Send(const v1::ExchangeFrame& frame, const std::string& token = kToken,
                    v1::ExchangeAck* ack = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    v1::ExchangeAck ignored;
    return stub_->Exchange(&ctx, frame, ack != nullptr ? ack : &ignored);
  }

 private:
  std::unique_ptr<v1::SwarmPeer::Stub> stub_;
};

// A well-formed one-piece frame of `bytes` float32 bytes from rank `source` to rank `dest`.
v1::ExchangeFrame Frame(const std::string& group, int size, int source, int dest, uint64_t op_seq,
                        int64_t bytes, v1::ExchangeOp op = v1::EXCHANGE_OP_ALL_REDUCE) {
  v1::ExchangeFrame f;
  f.set_group(group);
  f.set_group_size(size);
  f.set_op_seq(op_seq);
  f.set_op(op);
  f.set_phase(0);
  f.set_source_rank(source);
  f.set_dest_rank(dest);
  f.set_dtype(v1::EXCHANGE_DTYPE_FLOAT32);
  f.set_transfer_bytes(bytes);
  f.set_piece_bytes(std::max<int64_t>(bytes, 1));
  f.set_piece(0);
  f.set_offset(0);
  f.set_data(std::string(static_cast<size_t>(bytes), '\0'));
  return f;
}

void ExpectRefused(const grpc::Status& s, grpc::StatusCode code, const std::string& part) {
  EXPECT_EQ(s.error_code(), code) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), part))
      << "'" << s.error_message() << "' does not mention '" << part << "'";
}

TEST(PeerGroupCreateTest, RefusesBadOptionsNamingThem) {
  LocalPeer peer = StartLocalPeer();
  auto expect_invalid = [&](PeerGroupOptions o, const std::string& part) {
    auto g = PeerGroup::Create(o, peer.mailbox);
    EXPECT_TRUE(absl::IsInvalidArgument(g.status())) << part << ": " << g.status();
    EXPECT_TRUE(absl::StrContains(g.status().message(), part)) << g.status();
  };
  const std::string a = peer.address;
  expect_invalid(GroupOptions({}, 0, "g"), "roster");
  expect_invalid(GroupOptions({a, "nohost"}, 0, "g"), "roster entry 1");
  expect_invalid(GroupOptions({a, "127.0.0.1:0"}, 0, "g"), "roster entry 1");
  expect_invalid(GroupOptions({a, a}, 0, "g"), "appears twice");
  expect_invalid(GroupOptions({a}, 1, "g"), "rank 1");
  expect_invalid(GroupOptions({a}, 0, ""), "group name");
  expect_invalid(GroupOptions({a}, 0, "bad\nname"), "group name");
  expect_invalid(GroupOptions({a}, 0, std::string(201, 'g')), "group name");
  expect_invalid(GroupOptions({a}, 0, "g", absl::ZeroDuration()), "timeout");
  PeerGroupOptions o = GroupOptions({a}, 0, "g");
  o.frame_bytes = kMaxFrameBytes + 1;
  expect_invalid(o, "frame_bytes");
  o = GroupOptions({a}, 0, "g");
  o.token = "tok\n";
  expect_invalid(o, "token");
  o = GroupOptions({a}, 0, "g");
  o.reconnect_grace = absl::Milliseconds(-1);
  expect_invalid(o, "reconnect_grace");
  TempDir dir;
  o = GroupOptions({a}, 0, "g");
  o.tls_ca_file = dir / "missing.pem";
  EXPECT_TRUE(absl::IsNotFound(PeerGroup::Create(o, peer.mailbox).status()));
  ::shoal::testing::WriteTextFile(dir / "junk.pem", "not a certificate");
  o.tls_ca_file = dir / "junk.pem";
  expect_invalid(o, "junk.pem");
  // A name is used once per process, even after its group is gone.
  { auto first = MustCreate(GroupOptions({a}, 0, "once"), peer); }
  auto second = PeerGroup::Create(GroupOptions({a}, 0, "once"), peer.mailbox);
  EXPECT_TRUE(absl::IsAlreadyExists(second.status())) << second.status();
}

TEST(PeerGroupFramesTest, BadFramesAreRefusedWithClearErrors) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "frames"), a);
  ASSERT_NE(g, nullptr);
  RawClient client(a.address);
  const v1::ExchangeFrame good = Frame("frames", 2, 1, 0, 0, 16);

  ExpectRefused(client.Send(good, ""), grpc::StatusCode::UNAUTHENTICATED, "missing authorization");
  ExpectRefused(client.Send(good, "not-the-token"), grpc::StatusCode::UNAUTHENTICATED,
                "wrong token");

  v1::ExchangeFrame f = good;
  f.set_piece(5);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "piece 5 is out of range");
  f = good;
  f.set_data("short");
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "carries 5 bytes");
  f = good;
  f.set_offset(4);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "offset");
  f = good;
  f.set_source_rank(2);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "source_rank 2");
  f = good;
  f.set_dest_rank(1);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "dest_rank 1");
  f = good;
  f.set_piece_bytes(kMaxFrameBytes + 1);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "piece_bytes");
  f = good;
  f.set_transfer_bytes(15);
  f.set_piece_bytes(15);
  f.set_data(std::string(15, '\0'));
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "transfer_bytes 15");
  f = good;
  f.set_dtype(static_cast<v1::ExchangeDType>(99));
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "dtype");
  f = good;
  f.set_op(static_cast<v1::ExchangeOp>(42));
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "unknown op 42");
  f = good;
  f.set_group("");
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "group name");
  // The group exists here, with another size: the frame is not for this peer.
  f = Frame("frames", 3, 2, 0, 0, 16);
  ExpectRefused(client.Send(f), grpc::StatusCode::INVALID_ARGUMENT, "this peer is rank 0 of 2");
  // Frames for a group not created here are buffered (its peer may be ahead), once.
  EXPECT_TRUE(client.Send(Frame("later", 2, 1, 0, 0, 16)).ok());
  ExpectRefused(client.Send(Frame("later", 2, 1, 0, 0, 16)), grpc::StatusCode::ALREADY_EXISTS,
                "delivered before");
  // A closed group refuses everything.
  { auto gone = MustCreate(GroupOptions({a.address, b.address}, 0, "gone"), a); }
  ExpectRefused(client.Send(Frame("gone", 2, 1, 0, 0, 16)), grpc::StatusCode::FAILED_PRECONDITION,
                "closed");
  EXPECT_EQ(a.mailbox->stats().frames_refused, 13);
  // None of this touched the group.
  EXPECT_EQ(g->size(), 2);
}

TEST(PeerGroupFramesTest, MailboxBoundsFramesForOperationsNotStarted) {
  ExchangeMailboxOptions mo;
  mo.max_unclaimed_bytes = 200 << 10;
  LocalPeer a = StartLocalPeer(kToken, mo);
  RawClient client(a.address);
  int accepted = 0;
  grpc::Status last;
  for (int op = 0; op < 10 && last.ok(); ++op) {
    last = client.Send(Frame("not-yet", 2, 1, 0, static_cast<uint64_t>(op), 64 << 10));
    accepted += last.ok();
  }
  EXPECT_EQ(accepted, 3);
  ExpectRefused(last, grpc::StatusCode::RESOURCE_EXHAUSTED, "mailbox full");
  EXPECT_LE(a.mailbox->stats().unclaimed_bytes, 200 << 10);
}

// Two groups in this process, one per thread, each with its own server and mailbox.
TEST(PeerGroupLocalTest, PairReducesAndRefusesStaleFrames) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  const std::vector<std::string> roster{a.address, b.address};
  auto ga = MustCreate(GroupOptions(roster, 0, "pair"), a);
  auto gb = MustCreate(GroupOptions(roster, 1, "pair"), b);
  ASSERT_TRUE(ga && gb);
  at::Tensor x = TensorOf(Values(0, 5000));
  at::Tensor y = TensorOf(Values(1, 5000));
  // Frames of another group, shaped exactly like rank 1's part of the coming all-reduce (op 1,
  // phase 0, shard 0 of 2500 floats): they must not mix into this group's.
  RawClient client(a.address);
  v1::ExchangeFrame stranger = Frame("pair.other", 2, 1, 0, 1, 2500 * 4);
  stranger.set_data(std::string(2500 * 4, '\x7f'));
  ASSERT_TRUE(client.Send(stranger).ok());
  std::thread other([&] {
    EXPECT_TRUE(WaitOn(gb->Barrier()).ok());
    EXPECT_TRUE(WaitOn(gb->AllReduce(y, ReduceOp::kSum)).ok());
  });
  EXPECT_TRUE(WaitOn(ga->Barrier()).ok());
  EXPECT_TRUE(WaitOn(ga->AllReduce(x, ReduceOp::kSum)).ok());
  other.join();
  const std::vector<float> want = SumInOrder({Values(0, 5000), Values(1, 5000)});
  EXPECT_TRUE(SameBytes(x, want, "rank 0").ok());
  EXPECT_TRUE(SameBytes(y, want, "rank 1").ok());
  // Op 0 (the barrier) is over: a frame for it is stale.
  ExpectRefused(client.Send(Frame("pair", 2, 1, 0, 0, 0, v1::EXCHANGE_OP_BARRIER)),
                grpc::StatusCode::INVALID_ARGUMENT, "dtype");  // a barrier has no dtype
  v1::ExchangeFrame stale = Frame("pair", 2, 1, 0, 0, 0, v1::EXCHANGE_OP_BARRIER);
  stale.set_dtype(v1::EXCHANGE_DTYPE_UNSPECIFIED);
  ExpectRefused(client.Send(stale), grpc::StatusCode::FAILED_PRECONDITION, "already finished");
}

// Rank 1, played by hand, sends a frame of another operation: rank 0's all-reduce fails naming
// it, its tensor untouched, and the group refuses further work.
TEST(PeerGroupLocalTest, RanksThatDisagreeFailTheOperation) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "disagree"), a);
  ASSERT_NE(g, nullptr);
  const std::vector<float> input = Values(7, 1000);
  at::Tensor t = TensorOf(input);
  auto work = g->AllReduce(t, ReduceOp::kSum);
  // Refused when the all-reduce has started here; taken and then found wrong when it arrives
  // first (a peer may be an operation ahead). Either way the all-reduce fails.
  const grpc::Status sent = RawClient(a.address).Send(
      Frame("disagree", 2, 1, 0, 0, 4 * 1000, v1::EXCHANGE_OP_ALL_GATHER));
  if (!sent.ok()) ExpectRefused(sent, grpc::StatusCode::INVALID_ARGUMENT, "allgather");
  const absl::Status s = work->Wait();
  EXPECT_TRUE(absl::IsInternal(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("rank 1 (", b.address, ")"))) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "same collectives")) << s;
  EXPECT_TRUE(SameBytes(t, input, "after the failure").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(WaitOn(g->Barrier())));
  // A frame sent to the failed group now is answered with the failure, for the sender to stop.
  v1::ExchangeAck ack;
  ASSERT_TRUE(RawClient(a.address).Send(Frame("disagree", 2, 1, 0, 1, 16), kToken, &ack).ok());
  ASSERT_TRUE(ack.has_abort());
  EXPECT_EQ(ack.abort().code(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_TRUE(absl::StrContains(ack.abort().message(), "same collectives")) << ack.abort().message();
}

// A peer that gave up says so: rank 0 fails at once with the peer's code and reason, long
// before its 60 s timeout.
TEST(PeerGroupLocalTest, APeersAbortFailsTheOperationAtOnce) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "abort", absl::Seconds(60)), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({1000});
  const auto t0 = std::chrono::steady_clock::now();
  auto work = g->AllReduce(t, ReduceOp::kSum);
  v1::ExchangeFrame f = Frame("abort", 2, 1, 0, 0, 0);
  f.clear_data();
  f.mutable_abort()->set_code(static_cast<int>(absl::StatusCode::kUnavailable));
  f.mutable_abort()->set_message("rank 2 died");
  EXPECT_TRUE(RawClient(a.address).Send(f).ok());
  const absl::Status s = work->Wait();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "gave up on this operation: rank 2 died")) << s;
  EXPECT_LT(SecondsSince(t0), 30);
  EXPECT_TRUE(absl::StrContains(WaitOn(g->Barrier()).message(), "rank 2 died"));
}

// Peers that never take part: the timeout names them, with their addresses.
TEST(PeerGroupLocalTest, MissingPeersTimeOutNamed) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  LocalPeer c = StartLocalPeer();
  auto g = MustCreate(
      GroupOptions({a.address, b.address, c.address}, 0, "missing", absl::Seconds(1)), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({1000});
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = WaitOn(g->AllReduce(t, ReduceOp::kSum));
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("rank 1 (", b.address, ")"))) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("rank 2 (", c.address, ")"))) << s;
  EXPECT_LT(SecondsSince(t0), 15);
}

// Nothing listens at rank 1's address: kUnavailable naming it, long before the timeout.
TEST(PeerGroupLocalTest, UnreachablePeerIsNamed) {
  LocalPeer a = StartLocalPeer();
  const std::string nobody = absl::StrCat("127.0.0.1:", ::shoal::testing::FreePort());
  auto g = MustCreate(GroupOptions({a.address, nobody}, 0, "unreachable", absl::Seconds(60)), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({10});
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = WaitOn(g->AllReduce(t, ReduceOp::kSum));
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("rank 1 (", nobody, ")"))) << s;
  EXPECT_LT(SecondsSince(t0), 30);
}

// A peer that cannot be reached at first but comes up within reconnect_grace is reached: rank
// 0's first frames find nothing listening (a refused connection, as from a live peer whose
// connection failed once), and are sent again until rank 1's server answers.
TEST(PeerGroupLocalTest, APeerReachableWithinTheReconnectGraceIsNotGivenUp) {
  LocalPeer a = StartLocalPeer();
  const std::string later = absl::StrCat("127.0.0.1:", ::shoal::testing::FreePort());
  PeerGroupOptions ao = GroupOptions({a.address, later}, 0, "late", absl::Seconds(60));
  ao.reconnect_grace = absl::Seconds(20);  // far beyond the pause below, on a loaded machine too
  auto ga = MustCreate(ao, a);
  ASSERT_NE(ga, nullptr);
  at::Tensor ta = at::full({1000}, 1.0f);
  auto work = ga->AllReduce(ta, ReduceOp::kSum);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // rank 0's sends are refused
  LocalPeer b = StartLocalPeer(kToken, {}, "", "", later);
  ASSERT_EQ(b.address, later);
  auto gb = MustCreate(GroupOptions({a.address, later}, 1, "late", absl::Seconds(60)), b);
  ASSERT_NE(gb, nullptr);
  at::Tensor tb = at::full({1000}, 2.0f);
  ASSERT_TRUE(WaitOn(gb->AllReduce(tb, ReduceOp::kSum)).ok());
  const absl::Status s = work->Wait();
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(at::equal(ta, at::full({1000}, 3.0f)));
  EXPECT_TRUE(at::equal(tb, at::full({1000}, 3.0f)));
}

TEST(PeerGroupLocalTest, WrongTokenIsRefusedByThePeer) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer("another-token");
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "token"), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({10});
  const absl::Status s = WaitOn(g->AllReduce(t, ReduceOp::kSum));
  EXPECT_TRUE(absl::IsUnauthenticated(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("rank 1 (", b.address, ")"))) << s;
}

// Destroying a group fails its unfinished operations with kCancelled; their Works outlive it.
TEST(PeerGroupLocalTest, DestroyingTheGroupCancelsItsOperations) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "destroyed", absl::Seconds(60)), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({10});
  at::Tensor u = at::ones({10});
  auto first = g->AllReduce(t, ReduceOp::kSum);
  auto second = g->AllReduce(u, ReduceOp::kSum);
  const auto t0 = std::chrono::steady_clock::now();
  g.reset();
  EXPECT_TRUE(absl::IsCancelled(first->Wait()));
  EXPECT_TRUE(absl::IsCancelled(second->Wait()));
  EXPECT_LT(SecondsSince(t0), 20);
}

// Abort from another thread (a round the coordinator voided) fails the running operation and the
// queued one with its reason, long before the 60 s timeout; a peer that takes part later is told
// and fails at once too.
TEST(PeerGroupLocalTest, AbortFromAnotherThreadFailsItsOperationsAndTellsThePeers) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "voided", absl::Seconds(60)), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({1000});
  at::Tensor u = at::ones({10});
  const auto t0 = std::chrono::steady_clock::now();
  auto running = g->AllReduce(t, ReduceOp::kSum);
  auto queued = g->AllReduce(u, ReduceOp::kSum);
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    g->Abort(absl::AbortedError("the round is void"));
    g->Abort(absl::UnavailableError("a second reason"));  // changes nothing
  });
  const absl::Status first = running->Wait();
  aborter.join();
  EXPECT_TRUE(absl::IsAborted(first)) << first;
  EXPECT_TRUE(absl::StrContains(first.message(), "the round is void")) << first;
  const absl::Status second = queued->Wait();
  EXPECT_TRUE(absl::IsAborted(second)) << second;
  EXPECT_LT(SecondsSince(t0), 20);
  EXPECT_TRUE(at::equal(t, at::ones({1000})));  // a failed operation leaves its tensor alone
  EXPECT_FALSE(WaitOn(g->Barrier()).ok());

  auto gb = MustCreate(GroupOptions({a.address, b.address}, 1, "voided", absl::Seconds(60)), b);
  ASSERT_NE(gb, nullptr);
  at::Tensor v = at::ones({1000});
  const auto t1 = std::chrono::steady_clock::now();
  const absl::Status peer = WaitOn(gb->AllReduce(v, ReduceOp::kSum));
  EXPECT_TRUE(absl::IsAborted(peer)) << peer;
  EXPECT_TRUE(absl::StrContains(peer.message(), "the round is void")) << peer;
  EXPECT_LT(SecondsSince(t1), 20);
}

// TLS on both ends (a certificate for 127.0.0.1 made by the openssl CLI); a plaintext peer
// cannot take part.
TEST(PeerGroupLocalTest, WorksOverTls) {
  TempDir dir;
  const auto made = ::shoal::testing::RunCommand(absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ", dir / "peer.key", " -out ",
      dir / "peer.crt", " -days 1 -subj /CN=localhost -addext "
      "subjectAltName=DNS:localhost,IP:127.0.0.1"));
  if (made.exit_code != 0) GTEST_SKIP() << "no openssl CLI: " << made.output;
  LocalPeer a = StartLocalPeer(kToken, {}, dir / "peer.crt", dir / "peer.key");
  LocalPeer b = StartLocalPeer(kToken, {}, dir / "peer.crt", dir / "peer.key");
  const std::vector<std::string> roster{a.address, b.address};
  PeerGroupOptions oa = GroupOptions(roster, 0, "tls");
  PeerGroupOptions ob = GroupOptions(roster, 1, "tls");
  oa.tls_ca_file = ob.tls_ca_file = dir / "peer.crt";
  auto ga = MustCreate(oa, a);
  auto gb = MustCreate(ob, b);
  ASSERT_TRUE(ga && gb);
  at::Tensor x = TensorOf(Values(3, 100000));
  at::Tensor y = TensorOf(Values(4, 100000));
  std::thread other([&] { EXPECT_TRUE(WaitOn(gb->AllReduce(y, ReduceOp::kAvg)).ok()); });
  EXPECT_TRUE(WaitOn(ga->AllReduce(x, ReduceOp::kAvg)).ok());
  other.join();
  std::vector<float> want = SumInOrder({Values(3, 100000), Values(4, 100000)});
  for (float& v : want) v = v / 2.0f;
  EXPECT_TRUE(SameBytes(x, want, "rank 0").ok());
  EXPECT_TRUE(SameBytes(y, want, "rank 1").ok());
  // A plaintext group towards a TLS peer.
  LocalPeer c = StartLocalPeer();
  auto plain = MustCreate(GroupOptions({c.address, a.address}, 0, "plain", absl::Seconds(5)), c);
  ASSERT_NE(plain, nullptr);
  at::Tensor z = at::ones({10});
  const absl::Status s = WaitOn(plain->AllReduce(z, ReduceOp::kSum));
  EXPECT_TRUE(absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s)) << s;
}

TEST(PeerGroupLocalTest, SendAndRecvAreUnimplementedAfterTheArgumentChecks) {
  LocalPeer a = StartLocalPeer();
  LocalPeer b = StartLocalPeer();
  auto g = MustCreate(GroupOptions({a.address, b.address}, 0, "p2p"), a);
  ASSERT_NE(g, nullptr);
  at::Tensor t = at::ones({10});
  EXPECT_TRUE(absl::IsInvalidArgument(WaitOn(g->Send(t, 0, 0))));
  EXPECT_TRUE(absl::IsUnimplemented(WaitOn(g->Send(t, 1, 0))));
  EXPECT_TRUE(absl::IsUnimplemented(WaitOn(g->Recv(t, 1, 0))));
  at::Tensor complex = at::ones({10}, at::kComplexFloat);
  EXPECT_TRUE(absl::IsInvalidArgument(WaitOn(g->AllReduce(complex, ReduceOp::kSum))));
}

}  // namespace
}  // namespace shoal::comm

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::comm::RunRank();
  ::testing::InitGoogleTest(&argc, argv);
  shoal::comm::RegisterConformanceTests();
  return RUN_ALL_TESTS();
}
