// DeMo's exchange and replica drift check between real processes: Gloo groups of 2 and 4 (the
// test binary re-executes itself as the ranks, rendezvous through a TCP store the test serves on
// a free port of 127.0.0.1) and MPI groups of 2 (a real `mpirun -np 2` of this binary with
// --mpi <case>, as the other parallel/ multiproc tests start MPI jobs).
//
// Every case runs the same body on every rank (RunCase). A rank checks what it can see alone and
// prints one "rank R: <case> PASS" line, or the failed checks; the parent test asserts that every
// rank passed. Where ranks must agree with each other (the final parameter hashes of a DeMo run),
// each rank prints its value and the parent compares the printed values, so the comparison does
// not go through the code under test (CheckReplicasAgree is itself one of the cases).
//
//   exchange        MakeBackendExchange returns every rank's bytes in rank order, over several
//                   calls and a size change that all ranks make together.
//   size_mismatch   rank 1 sends 100 bytes, the others 96: every rank's first call is refused
//                   with kInvalidArgument naming a worker and "different settings", no hang.
//   demo_run        30 Demo::Steps with varying lr: every rank ends on the same parameter hash,
//                   the parameters moved, and each rank's parameters (and its own residual) are
//                   bit-identical to an in-process simulation of all W workers (Compress/Apply in
//                   worker order). Only the sign of the mean moves a parameter, so this shows
//                   that every worker's bytes arrived intact, hardly their order: the order is
//                   what the exchange case checks.
//   agree           CheckReplicasAgree: equal hashes pass; one odd rank gives kDataLoss on every
//                   rank, naming that rank, the step and both hashes in hex.
//   drift           W = 2 DeMo where rank 1 uses another lr on step 5 only: the check after every
//                   step passes for steps 1-4 and fails at step 5 on both ranks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <limits.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <ostream>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "parallel/demo.h"
#include "tests/comm/rank_launcher.h"
#include "tests/comm/store_ranks.h"
#include "tests/parallel/demo_test_workers.h"
#include "tests/test_util.h"

namespace shoal::parallel {
namespace {

using ::shoal::testing::EnvInt;
using ::shoal::testing::EnvString;
using ::shoal::testing::ParamSpec;
using Worker = ::shoal::testing::DemoTestWorker;

constexpr char kCaseEnv[] = "SHOAL_DEMO_EXCHANGE_CASE";
constexpr char kWorldEnv[] = "SHOAL_DEMO_EXCHANGE_WORLD";
constexpr char kPortEnv[] = "SHOAL_DEMO_EXCHANGE_PORT";

constexpr int kRunSteps = 30;
constexpr int kDriftStep = 5;

// ---- Deterministic data every rank can regenerate from seeds alone. ----

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// `t` (float32) filled with values uniform in [-scale, scale) drawn from `seed`. Written here
// rather than taken from ATen's generators so that the values depend on nothing but the seed.
void FillSeeded(at::Tensor t, uint64_t seed, float scale) {
  at::Tensor v = at::empty(t.sizes(), at::kFloat);
  float* p = v.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    const uint64_t r = SplitMix64(seed * 0x100000001b3ULL + static_cast<uint64_t>(i));
    p[i] = scale * (static_cast<float>(r >> 40) / static_cast<float>(1 << 23) - 1.0f);
  }
  t.copy_(v);
}

// Byte i of the payload that rank `w` sends on call `call` of the exchange case. For a fixed i
// and call, ranks differ by 41·Δw (mod 256), never 0 for fewer than 256 ranks; byte 0 of call 0
// is (w + 1)·41.
uint8_t PatternByte(int w, int call, int64_t i) {
  return static_cast<uint8_t>((w + 1) * 41 + call * 97 + i * 7 + (i >> 8));
}

at::Tensor PatternPayload(int w, int call, int64_t bytes) {
  at::Tensor t = at::empty({bytes}, at::kByte);
  for (int64_t i = 0; i < bytes; ++i) t.data_ptr<uint8_t>()[i] = PatternByte(w, call, i);
  return t;
}

// The learning rate and gradient scale of step `step` (1-based): varying, so that a payload
// applied with the wrong step's lr would show.
double StepLr(int step) { return 1e-2 * (0.5 + (step % 7) / 7.0); }
double StepGradScale(int step) { return step % 3 == 0 ? 0.5 : 1.0; }

// Byte-for-byte equality (at::equal compares values: -0 == 0 and NaN != NaN).
bool SameBytes(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return ca.scalar_type() == cb.scalar_type() && ca.sizes() == cb.sizes() &&
         std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// ---- A tiny model's DeMo worker. ----

// Shapes exercising several tilings at chunk 16: 48 and 32 divide, 24 → 12, 20 → 10, 37 is prime.
const std::vector<ParamSpec>& Specs() {
  static const std::vector<ParamSpec> specs = {{"fc.weight", {48, 32}, true},
                                               {"proj.weight", {20, 24}, true},
                                               {"fc.bias", {32}, false},
                                               {"ln.gain", {37}, false}};
  return specs;
}

DemoOptions Options() {
  DemoOptions o;
  o.codec.chunk = 16;
  o.codec.topk = 6;
  o.codec.wire_dtype = at::kBFloat16;
  o.decay = 0.99;
  o.weight_decay = 0.05;
  return o;
}

// The gradients worker `w` computes at step `step`.
void SetSeededGrads(Worker& worker, int w, int step) {
  for (int i = 0; i < worker.num_params(); ++i) {
    FillSeeded(worker.Grad(i), 1000003ULL * (w + 1) + 7919ULL * step + i, 1.0f);
  }
}

// A worker with the initial parameters every rank shares (one seed).
absl::StatusOr<std::unique_ptr<Worker>> MakeWorker() {
  auto w = ::shoal::testing::MakeDemoTestWorker(Specs(), Options());
  if (!w.ok()) return w.status();
  for (int i = 0; i < (*w)->num_params(); ++i) FillSeeded((*w)->Param(i), 42 + i, 0.05f);
  return w;
}

// ---- Inside a rank process (Gloo or MPI). ----

// Collects a rank's failed checks; every failure is printed at once (the parent shows the output
// of a failed rank).
class Checker {
 public:
  Checker(int rank, std::string case_name) : rank_(rank), case_(std::move(case_name)) {}
  bool Expect(bool cond, const std::string& what) {
    if (!cond) {
      std::printf("rank %d: %s FAILED: %s\n", rank_, case_.c_str(), what.c_str());
      std::fflush(stdout);
      ok_ = false;
    }
    return cond;
  }
  int Finish() {
    std::printf("rank %d: %s %s\n", rank_, case_.c_str(), ok_ ? "PASS" : "FAIL");
    std::fflush(stdout);
    return ok_ ? 0 : 1;
  }

 private:
  int rank_;
  std::string case_;
  bool ok_ = true;
};

std::string Hex(uint64_t v) { return absl::StrFormat("%016x", v); }

void RunExchange(comm::Backend& backend, Checker& check) {
  const int rank = backend.rank(), world = backend.size();
  std::unique_ptr<DemoExchange> exchange = MakeBackendExchange(&backend);
  check.Expect(exchange->rank() == rank && exchange->size() == world, "rank()/size()");
  // Three calls of 1000 bytes (the size handshake on the first only), then two of an odd 37
  // bytes that every rank switches to together (a second handshake).
  const std::vector<int64_t> sizes = {1000, 1000, 1000, 37, 37};
  for (int call = 0; call < static_cast<int>(sizes.size()); ++call) {
    const at::Tensor mine = PatternPayload(rank, call, sizes[call]);
    auto all = exchange->AllGather(mine);
    if (!check.Expect(all.ok(), absl::StrCat("call ", call, ": ", all.status().ToString()))) {
      return;
    }
    if (!check.Expect(static_cast<int>(all->size()) == world,
                      absl::StrCat("call ", call, ": ", all->size(), " payloads"))) {
      return;
    }
    for (int w = 0; w < world; ++w) {
      const at::Tensor& got = (*all)[w];
      if (!check.Expect(got.scalar_type() == at::kByte && got.dim() == 1 &&
                            got.numel() == sizes[call] && got.is_contiguous(),
                        absl::StrCat("call ", call, ": payload of worker ", w,
                                     " is not a contiguous byte vector of ", sizes[call]))) {
        continue;
      }
      const at::Tensor c = got.contiguous();
      int64_t wrong = 0, first_wrong = -1;
      for (int64_t i = 0; i < sizes[call]; ++i) {
        if (c.data_ptr<uint8_t>()[i] != PatternByte(w, call, i)) {
          if (first_wrong < 0) first_wrong = i;
          ++wrong;
        }
      }
      check.Expect(wrong == 0, absl::StrCat("call ", call, ": payload in slot ", w, " has ", wrong,
                                            " wrong bytes, the first at ", first_wrong));
    }
  }
}

void RunSizeMismatch(comm::Backend& backend, Checker& check) {
  const int rank = backend.rank();
  comm::CollectiveOptions options;
  options.timeout = absl::Seconds(5);  // should anything wait for a peer, fail soon
  std::unique_ptr<DemoExchange> exchange = MakeBackendExchange(&backend, options);
  const int64_t bytes = rank == 1 ? 100 : 96;
  auto all = exchange->AllGather(PatternPayload(rank, 0, bytes));
  const absl::Status& s = all.status();
  std::printf("rank %d: size_mismatch: %s\n", rank, s.ToString().c_str());
  check.Expect(absl::IsInvalidArgument(s), "expected kInvalidArgument, got " + s.ToString());
  check.Expect(absl::StrContains(s.message(), "different settings"),
               "message lacks 'different settings': " + s.ToString());
  // Every rank other than 1 names worker 1 and its size; rank 1 names the first worker whose
  // size differs from its own (worker 0) and states its own.
  if (rank == 1) {
    check.Expect(absl::StrContains(s.message(), "worker 0 has 96 bytes") &&
                     absl::StrContains(s.message(), "(1) 100"),
                 "rank 1's message should name worker 0's 96 bytes and its own 100: " +
                     s.ToString());
  } else {
    check.Expect(absl::StrContains(s.message(), "worker 1 has 100 bytes") &&
                     absl::StrContains(s.message(), absl::StrCat("(", rank, ") 96")),
                 "message should name worker 1's 100 bytes: " + s.ToString());
  }
}

void RunDemo(comm::Backend& backend, Checker& check) {
  const int rank = backend.rank(), world = backend.size();
  auto made = MakeWorker();
  if (!check.Expect(made.ok(), "MakeWorker: " + made.status().ToString())) return;
  std::unique_ptr<Worker> me = *std::move(made);
  const std::vector<at::Tensor> start = me->CloneFlats();
  // The reference: all W workers in this process, payloads handed over in worker order.
  std::vector<std::unique_ptr<Worker>> sim;
  for (int w = 0; w < world; ++w) {
    auto s = MakeWorker();
    if (!check.Expect(s.ok(), "MakeWorker: " + s.status().ToString())) return;
    sim.push_back(*std::move(s));
  }
  std::unique_ptr<DemoExchange> exchange = MakeBackendExchange(&backend);
  for (int step = 1; step <= kRunSteps; ++step) {
    const double lr = StepLr(step), scale = StepGradScale(step);
    SetSeededGrads(*me, rank, step);
    const absl::Status s = me->demo->Step(lr, scale, exchange.get());
    if (!check.Expect(s.ok(), absl::StrCat("step ", step, ": ", s.ToString()))) return;

    std::vector<at::Tensor> payloads;
    for (int w = 0; w < world; ++w) {
      SetSeededGrads(*sim[w], w, step);
      payloads.push_back(sim[w]->demo->Compress(lr, scale));
    }
    if (step == 1) {
      // Not vacuous: the workers really send different bytes.
      for (int w = 1; w < world; ++w) {
        check.Expect(!SameBytes(payloads[w], payloads[0]),
                     absl::StrCat("workers 0 and ", w, " sent the same payload"));
      }
    }
    for (int w = 0; w < world; ++w) {
      const absl::Status a = sim[w]->demo->Apply(payloads, lr);
      if (!check.Expect(a.ok(), absl::StrCat("simulated worker ", w, ", step ", step, ": ",
                                            a.ToString()))) {
        return;
      }
    }
  }
  const std::vector<at::Tensor> end = me->Flats();
  check.Expect(me->demo->steps() == kRunSteps, absl::StrCat("steps() = ", me->demo->steps()));
  const DemoTraffic traffic = me->demo->last_traffic();
  check.Expect(traffic.sent == me->demo->PayloadBytes() &&
                   traffic.received == world * me->demo->PayloadBytes(),
               absl::StrCat("traffic ", traffic.sent, " / ", traffic.received, " for payloads of ",
                            me->demo->PayloadBytes()));
  for (size_t g = 0; g < end.size(); ++g) {
    check.Expect(!SameBytes(end[g], start[g]), absl::StrCat("group ", g, " did not move"));
    check.Expect(SameBytes(end[g], sim[rank]->Flats()[g]),
                 absl::StrCat("group ", g, " differs from the in-process simulation (max |diff| ",
                              (end[g] - sim[rank]->Flats()[g]).abs().max().item<float>(), ")"));
    for (int w = 1; w < world; ++w) {
      check.Expect(SameBytes(sim[w]->Flats()[g], sim[0]->Flats()[g]),
                   absl::StrCat("simulated workers 0 and ", w, " differ in group ", g));
    }
  }
  // This rank's residual came from this rank's own gradients (and no other's) every step.
  const auto mine = me->demo->StateDict(), simulated = sim[rank]->demo->StateDict();
  for (size_t i = 0; i < mine.size() && i < simulated.size(); ++i) {
    check.Expect(mine[i].first == simulated[i].first && SameBytes(mine[i].second,
                                                                  simulated[i].second),
                 "state '" + mine[i].first + "' differs from the simulated worker's");
  }
  // For the parent to compare across ranks.
  std::printf("rank %d: start %s\n", rank, Hex(HashTensors(start)).c_str());
  std::printf("rank %d: hash %s\n", rank, Hex(HashTensors(end)).c_str());
}

void RunAgree(comm::Backend& backend, Checker& check) {
  const int rank = backend.rank(), world = backend.size();
  const int odd = world == 4 ? 2 : 1;
  // The common hash has its top bit set: it must survive the trip through an int64 tensor.
  constexpr uint64_t kCommon = 0xf00dface12345678ULL, kOther = 0x0123456789abcdefULL;
  const absl::Status same = CheckReplicasAgree(&backend, kCommon, 7);
  check.Expect(same.ok(), "equal hashes: " + same.ToString());
  const absl::Status differ = CheckReplicasAgree(&backend, rank == odd ? kOther : kCommon, 8);
  std::printf("rank %d: agree: %s\n", rank, differ.ToString().c_str());
  check.Expect(absl::IsDataLoss(differ), "expected kDataLoss, got " + differ.ToString());
  const std::string m(differ.message());
  check.Expect(absl::StrContains(m, absl::StrCat("rank ", odd, "'s")),
               absl::StrCat("message does not name rank ", odd, ": ", m));
  check.Expect(absl::StrContains(m, "step 8"), "message does not name step 8: " + m);
  check.Expect(absl::StrContains(m, Hex(kOther)) && absl::StrContains(m, Hex(kCommon)),
               absl::StrCat("message lacks ", Hex(kOther), " and ", Hex(kCommon), ": ", m));
  // The check is an ordinary collective: the group is still usable afterwards.
  const absl::Status again = CheckReplicasAgree(&backend, kOther, 9);
  check.Expect(again.ok(), "after a mismatch, equal hashes: " + again.ToString());
}

void RunDrift(comm::Backend& backend, Checker& check) {
  const int rank = backend.rank();
  auto made = MakeWorker();
  if (!check.Expect(made.ok(), "MakeWorker: " + made.status().ToString())) return;
  std::unique_ptr<Worker> me = *std::move(made);
  std::unique_ptr<DemoExchange> exchange = MakeBackendExchange(&backend);
  for (int step = 1; step <= kDriftStep; ++step) {
    // The payloads carry no lr, so the exchange cannot notice this; only the check can.
    const double lr = rank == 1 && step == kDriftStep ? 1.5 * StepLr(step) : StepLr(step);
    SetSeededGrads(*me, rank, step);
    const absl::Status s = me->demo->Step(lr, 1.0, exchange.get());
    if (!check.Expect(s.ok(), absl::StrCat("step ", step, ": ", s.ToString()))) return;
    const absl::Status agree = CheckReplicasAgree(&backend, HashTensors(me->Flats()), step);
    std::printf("rank %d: drift check at step %d: %s\n", rank, step, agree.ToString().c_str());
    if (step < kDriftStep) {
      check.Expect(agree.ok(), absl::StrCat("step ", step, ": ", agree.ToString()));
    } else {
      check.Expect(absl::IsDataLoss(agree) &&
                       absl::StrContains(agree.message(), absl::StrCat("step ", kDriftStep)) &&
                       absl::StrContains(agree.message(), "rank 1's"),
                   absl::StrCat("step ", step, ": expected kDataLoss naming step ", kDriftStep,
                                " and rank 1, got ", agree.ToString()));
    }
  }
}

int RunCase(const std::string& name, comm::Backend& backend) {
  // One thread: the ranks share two cores, and the in-process simulation must run with the
  // same threading as the rank it is compared with.
  at::set_num_threads(1);
  Checker check(backend.rank(), name);
  if (name == "exchange") {
    RunExchange(backend, check);
  } else if (name == "size_mismatch") {
    RunSizeMismatch(backend, check);
  } else if (name == "demo_run") {
    RunDemo(backend, check);
  } else if (name == "agree") {
    RunAgree(backend, check);
  } else if (name == "drift") {
    RunDrift(backend, check);
  } else {
    check.Expect(false, "unknown case '" + name + "'");
  }
  return check.Finish();
}

// Creates the backend `o` describes and runs case `name` on it; the rank process's exit code.
int RunCaseOn(const std::string& name, const comm::BackendOptions& o) {
  auto backend = comm::CreateBackend(o);
  if (!backend.ok()) {
    std::printf("rank %d: CreateBackend: %s\n", o.rank, backend.status().ToString().c_str());
    return 1;
  }
  const int rc = RunCase(name, **backend);
  backend->reset();
  return rc;
}

int RunGlooRank() {
  ::alarm(90);  // a rank never outlives its test by much, whatever happens
  const std::string name = EnvString(kCaseEnv);
  const int rank = EnvInt(::shoal::testing::kRankEnv, -1);
  const int world = EnvInt(kWorldEnv, -1);
  const int port = EnvInt(kPortEnv, -1);
  if (rank < 0 || world < 1 || port <= 0) {
    std::fprintf(stderr, "rank process: bad environment\n");
    return 2;
  }
  comm::TcpStoreOptions so;
  so.host = "127.0.0.1";
  so.port = port;
  so.world_size = world;
  so.timeout = absl::Seconds(20);
  auto store = comm::MakeTcpStore(so);
  if (!store.ok()) {
    std::printf("rank %d: store: %s\n", rank, store.status().ToString().c_str());
    return 1;
  }
  comm::BackendOptions o;
  o.kind = "gloo";
  o.rank = rank;
  o.world_size = world;
  o.store = comm::MakePrefixStore(name, *store);
  o.timeout = absl::Seconds(20);
  o.gloo_hostname = "127.0.0.1";
  return RunCaseOn(name, o);
}

int RunMpiRank(const std::string& name) {
  ::alarm(90);
  const int rank = EnvInt("OMPI_COMM_WORLD_RANK", -1);
  const int world = EnvInt("OMPI_COMM_WORLD_SIZE", -1);
  if (rank < 0 || world < 1) {
    std::fprintf(stderr, "--mpi: not started by mpirun (no OMPI_COMM_WORLD_RANK/SIZE)\n");
    return 2;
  }
  comm::BackendOptions o;
  o.kind = "mpi";
  o.rank = rank;
  o.world_size = world;
  o.timeout = absl::Seconds(20);
  return RunCaseOn(name, o);
}

// ---- The tests (the parent process). ----

struct RankRun {
  bool all_exited_zero = true;
  std::string output;  // every rank's output, for the failure message and the parsing
};

RankRun RunGloo(const std::string& name, int world) {
  RankRun run;
  const auto results = ::shoal::testing::LaunchRanksWithStore(
      world, {{kCaseEnv, name}, {kWorldEnv, std::to_string(world)}}, kPortEnv,
      std::chrono::seconds(60));
  if (!results.ok()) {
    run.all_exited_zero = false;
    run.output = "store server: " + results.status().ToString();
    return run;
  }
  for (const auto& r : *results) run.all_exited_zero = run.all_exited_zero && r.exit_code == 0;
  run.output = ::shoal::testing::DescribeRanks(*results);
  return run;
}

RankRun RunMpi(const std::string& name, int world) {
  RankRun run;
  char exe[PATH_MAX] = {};
  if (::readlink("/proc/self/exe", exe, sizeof(exe) - 1) <= 0) {
    run.all_exited_zero = false;
    run.output = "readlink /proc/self/exe failed";
    return run;
  }
  // `timeout` so that a wedged job ends the test instead of ctest's deadline.
  const auto r = ::shoal::testing::RunCommand(
      "timeout -k 5 90 mpirun --allow-run-as-root --oversubscribe -np " + std::to_string(world) +
      " " + exe + " --mpi " + name);
  run.all_exited_zero = r.exit_code == 0;
  run.output = "mpirun exit " + std::to_string(r.exit_code) + "\n" + r.output;
  return run;
}

// The value printed by each rank as "rank R: <key> <hex>", by rank.
std::map<int, std::string> Printed(const std::string& output, const std::string& key) {
  std::map<int, std::string> out;
  const std::regex re("rank (\\d+): " + key + " ([0-9a-f]{16})");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), re);
       it != std::sregex_iterator(); ++it) {
    out[std::stoi((*it)[1].str())] = (*it)[2].str();
  }
  return out;
}

// Every rank of `world` printed "<case> PASS".
void ExpectAllPassed(const RankRun& run, const std::string& name, int world) {
  EXPECT_TRUE(run.all_exited_zero) << run.output;
  for (int r = 0; r < world; ++r) {
    EXPECT_TRUE(absl::StrContains(run.output, absl::StrCat("rank ", r, ": ", name, " PASS")))
        << "rank " << r << "\n" << run.output;
  }
}

struct World {
  const char* backend;  // "gloo" or "mpi"
  int ranks;
};

// Names the parameter in ctest's test names (instead of gtest's dump of its bytes).
void PrintTo(const World& w, std::ostream* os) { *os << w.backend << " x" << w.ranks; }

std::string WorldName(const ::testing::TestParamInfo<World>& info) {
  return std::string(info.param.backend) + std::to_string(info.param.ranks) + "ranks";
}

class DemoExchangeTest : public ::testing::TestWithParam<World> {
 protected:
  RankRun Launch(const std::string& name) {
    return std::string(GetParam().backend) == "mpi" ? RunMpi(name, GetParam().ranks)
                                                    : RunGloo(name, GetParam().ranks);
  }
  int ranks() const { return GetParam().ranks; }
};

TEST_P(DemoExchangeTest, EveryPayloadArrivesInRankOrder) {
  ExpectAllPassed(Launch("exchange"), "exchange", ranks());
}

TEST_P(DemoExchangeTest, PayloadOfAnotherSizeIsRefusedByEveryRank) {
  ExpectAllPassed(Launch("size_mismatch"), "size_mismatch", ranks());
}

TEST_P(DemoExchangeTest, ReplicasEndBitIdenticalAndMatchTheInProcessSimulation) {
  const RankRun run = Launch("demo_run");
  ExpectAllPassed(run, "demo_run", ranks());
  const auto start = Printed(run.output, "start"), end = Printed(run.output, "hash");
  ASSERT_EQ(start.size(), static_cast<size_t>(ranks())) << run.output;
  ASSERT_EQ(end.size(), static_cast<size_t>(ranks())) << run.output;
  for (int r = 0; r < ranks(); ++r) {
    EXPECT_EQ(start.at(r), start.at(0)) << "rank " << r << " started elsewhere\n" << run.output;
    EXPECT_EQ(end.at(r), end.at(0)) << "rank " << r << " drifted\n" << run.output;
    EXPECT_NE(end.at(r), start.at(r)) << "rank " << r << " did not move\n" << run.output;
  }
}

TEST_P(DemoExchangeTest, DriftCheckNamesTheOddRankOnEveryRank) {
  ExpectAllPassed(Launch("agree"), "agree", ranks());
}

// A group of 2 is enough to diverge.
class DemoDriftTest : public DemoExchangeTest {};

TEST_P(DemoDriftTest, AnotherLrOnOneRankIsCaughtAtThatStep) {
  const RankRun run = Launch("drift");
  ExpectAllPassed(run, "drift", ranks());
  for (int r = 0; r < ranks(); ++r) {
    for (int step = 1; step < kDriftStep; ++step) {
      EXPECT_TRUE(absl::StrContains(
          run.output, absl::StrCat("rank ", r, ": drift check at step ", step, ": OK")))
          << run.output;
    }
    EXPECT_TRUE(absl::StrContains(
        run.output, absl::StrCat("rank ", r, ": drift check at step ", kDriftStep, ": DATA_LOSS")))
        << run.output;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, DemoExchangeTest,
                         ::testing::Values(World{"gloo", 2}, World{"gloo", 4}, World{"mpi", 2}),
                         WorldName);
INSTANTIATE_TEST_SUITE_P(Backends, DemoDriftTest,
                         ::testing::Values(World{"gloo", 2}, World{"mpi", 2}), WorldName);

}  // namespace
}  // namespace shoal::parallel

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::parallel::RunGlooRank();
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--mpi") == 0) return shoal::parallel::RunMpiRank(argv[i + 1]);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
