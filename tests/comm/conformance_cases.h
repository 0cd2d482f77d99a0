// The backend conformance cases: one set of rank bodies that every backend must pass. Each case
// runs on every rank of a group (as real processes: forked ranks for Gloo, mpirun for MPI) and
// returns OK or what went wrong on that rank. Expected values are closed forms of the rank and
// element index: rank r contributes (r+1)*i at element i, so a sum is i*N(N+1)/2, an average
// i*(N+1)/2, a max N*i and a min i.
#ifndef SHOAL_TESTS_COMM_CONFORMANCE_CASES_H_
#define SHOAL_TESTS_COMM_CONFORMANCE_CASES_H_

#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "comm/backend.h"

namespace shoal::comm::conformance {

template <typename... Args>
absl::Status Fail(const char* file, int line, const char* what, const Args&... args) {
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", what, " ", args...));
}

// Returns a failure from the case when `cond` is false; extra arguments are appended.
#define CONF_CHECK(cond, ...) \
  if (!(cond)) return ::shoal::comm::conformance::Fail(__FILE__, __LINE__, "check failed: " #cond, ##__VA_ARGS__)
// Returns a failure from the case when the absl::Status `expr` is not OK.
#define CONF_OK(expr)                                                                          \
  do {                                                                                         \
    const absl::Status _conf_s = (expr);                                                       \
    if (!_conf_s.ok()) {                                                                       \
      return ::shoal::comm::conformance::Fail(__FILE__, __LINE__, #expr, "-> ", _conf_s.ToString()); \
    }                                                                                          \
  } while (0)

inline absl::Status WaitOn(std::unique_ptr<Work> work) { return work->Wait(); }

// OK when `got` equals `want` (within rtol for floating types); else names the first mismatch.
inline absl::Status ExpectTensor(const at::Tensor& got, const at::Tensor& want,
                                 const std::string& what, double rtol = 0) {
  if (got.sizes() != want.sizes()) {
    return absl::InternalError(absl::StrCat(what, ": shape mismatch"));
  }
  at::Tensor g = got.to(at::kDouble).view({-1});
  at::Tensor w = want.to(at::kDouble).view({-1});
  at::Tensor bad = (g - w).abs() > w.abs() * rtol;
  if (!bad.any().item<bool>()) return absl::OkStatus();
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  return absl::InternalError(absl::StrCat(what, ": element ", i, " is ", g[i].item<double>(),
                                          ", expected ", w[i].item<double>(), " (",
                                          bad.sum().item<int64_t>(), " of ", g.numel(),
                                          " differ)"));
}

inline std::vector<int64_t> Sizes() { return {1, 1000, int64_t{1} << 20}; }

inline const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

// The closed-form factor f(N) with result[i] = f * i, for contributions (r+1)*i.
inline double ReduceFactor(ReduceOp op, int n) {
  switch (op) {
    case ReduceOp::kSum: return n * (n + 1) / 2.0;
    case ReduceOp::kAvg: return (n + 1) / 2.0;
    case ReduceOp::kMax: return n;
    case ReduceOp::kMin: return 1;
  }
  return 0;
}

// Every op on every size: one case, so one set of rank processes, for the four of them.
inline absl::Status AllReduceSumAvgMaxMin(Backend& b) {
  const int n = b.size();
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
    for (int64_t size : Sizes()) {
      at::Tensor index = at::arange(size, at::kFloat);
      at::Tensor t = index * static_cast<float>(b.rank() + 1);
      CONF_OK(WaitOn(b.AllReduce(t, op)));
      CONF_OK(ExpectTensor(t, index * ReduceFactor(op, n),
                           absl::StrCat("allreduce ", ReduceOpName(op), " of ", size),
                           op == ReduceOp::kAvg ? 1e-6 : 0));
    }
  }
  return absl::OkStatus();
}

// Sums in double, int32 and int64; an int64 average truncates toward zero.
inline absl::Status AllReduceDtypes(Backend& b) {
  const int n = b.size();
  for (at::ScalarType type : {at::kDouble, at::kInt, at::kLong}) {
    at::Tensor index = at::arange(1000, type);
    at::Tensor t = index * (b.rank() + 1);
    CONF_OK(WaitOn(b.AllReduce(t, ReduceOp::kSum)));
    CONF_OK(ExpectTensor(t, index * (n * (n + 1) / 2), c10::toString(type)));
  }
  at::Tensor avg = at::full({3}, int64_t{b.rank() + 1}, at::kLong);
  CONF_OK(WaitOn(b.AllReduce(avg, ReduceOp::kAvg)));
  CONF_OK(ExpectTensor(avg, at::full({3}, int64_t{(n * (n + 1) / 2) / n}, at::kLong),
                       "int64 average"));
  return absl::OkStatus();
}

// float16 sums (and max) on every backend; bfloat16 where the backend has it (MPI), else a
// kInvalidArgument refusal (Gloo 1.13). Values stay small integers, exact in both formats.
inline absl::Status AllReduceHalfPrecision(Backend& b) {
  const int n = b.size();
  for (at::ScalarType type : {at::kHalf, at::kBFloat16}) {
    at::Tensor index = at::arange(1000, at::kFloat).remainder(16);
    at::Tensor t = (index * (b.rank() + 1)).to(type);
    const absl::Status s = WaitOn(b.AllReduce(t, ReduceOp::kSum));
    if (type == at::kBFloat16 && b.name() == "gloo") {
      CONF_CHECK(absl::IsInvalidArgument(s), "gloo bfloat16: ", s.ToString());
      continue;
    }
    CONF_OK(s);
    CONF_OK(ExpectTensor(t, index * (n * (n + 1) / 2), c10::toString(type)));
    at::Tensor m = (index * (b.rank() + 1)).to(type);
    CONF_OK(WaitOn(b.AllReduce(m, ReduceOp::kMax)));
    CONF_OK(ExpectTensor(m, index * n, absl::StrCat(c10::toString(type), " max")));
  }
  return absl::OkStatus();
}

// Rank r's input holds (r+1)*j at flat index j; rank r's output is shard r of the reduction.
inline absl::Status ReduceScatter(Backend& b) {
  const int n = b.size();
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
    for (int64_t shard : {int64_t{1}, int64_t{1000}, int64_t{1} << 18}) {
      at::Tensor input = at::arange(n * shard, at::kFloat) * static_cast<float>(b.rank() + 1);
      at::Tensor output = at::full({shard}, -1.0f);
      CONF_OK(WaitOn(b.ReduceScatter(output, input, op)));
      at::Tensor mine = at::arange(b.rank() * shard, (b.rank() + 1) * shard, at::kFloat);
      CONF_OK(ExpectTensor(output, mine * ReduceFactor(op, n),
                           absl::StrCat("reduce_scatter ", ReduceOpName(op), " of shard ",
                                        shard),
                           op == ReduceOp::kAvg ? 1e-6 : 0));
    }
  }
  return absl::OkStatus();
}

// Rank r contributes k*N + r at element k; the output is every rank's input in rank order.
inline absl::Status AllGather(Backend& b) {
  const int n = b.size();
  for (int64_t m : {int64_t{1}, int64_t{1000}, int64_t{1} << 16}) {
    at::Tensor input = at::arange(m, at::kFloat) * n + b.rank();
    at::Tensor output = at::full({n * m}, -1.0f);
    CONF_OK(WaitOn(b.AllGather(output, input)));
    at::Tensor k = at::arange(m, at::kFloat).repeat({n});
    at::Tensor q = at::arange(n, at::kFloat).repeat_interleave(m);
    CONF_OK(ExpectTensor(output, k * n + q, absl::StrCat("allgather of ", m)));
  }
  return absl::OkStatus();
}

inline absl::Status BroadcastFromEachRoot(Backend& b) {
  for (int root = 0; root < b.size(); ++root) {
    for (int64_t size : {int64_t{1000}, int64_t{1} << 20}) {
      at::Tensor want = at::arange(size, at::kFloat) + root;
      at::Tensor t = b.rank() == root ? want.clone() : at::full({size}, -1.0f);
      CONF_OK(WaitOn(b.Broadcast(t, root)));
      CONF_OK(ExpectTensor(t, want, absl::StrCat("broadcast of ", size, " from ", root)));
    }
  }
  return absl::OkStatus();
}

// Each rank sends to the next and receives from the previous; then two tags received in the
// opposite order from the one they were sent in.
inline absl::Status SendRecvRing(Backend& b) {
  const int n = b.size();
  const int next = (b.rank() + 1) % n;
  const int prev = (b.rank() + n - 1) % n;
  for (int64_t size : {int64_t{1000}, int64_t{1} << 20}) {
    at::Tensor out = at::arange(size, at::kFloat) + 10 * b.rank();
    at::Tensor in = at::full({size}, -1.0f);
    auto recv = b.Recv(in, prev, 7);
    auto send = b.Send(out, next, 7);
    CONF_OK(send->Wait());
    CONF_OK(recv->Wait());
    CONF_OK(ExpectTensor(in, at::arange(size, at::kFloat) + 10 * prev,
                         absl::StrCat("ring message of ", size, " from ", prev)));
  }
  at::Tensor one = at::full({10}, 1.0f), two = at::full({10}, 2.0f);
  at::Tensor got_one = at::zeros({10}), got_two = at::zeros({10});
  auto send1 = b.Send(one, next, 1);
  auto send2 = b.Send(two, next, 2);
  auto recv2 = b.Recv(got_two, prev, 2);
  auto recv1 = b.Recv(got_one, prev, 1);
  CONF_OK(recv2->Wait());
  CONF_OK(recv1->Wait());
  CONF_OK(send1->Wait());
  CONF_OK(send2->Wait());
  CONF_OK(ExpectTensor(got_one, one, "tag 1"));
  CONF_OK(ExpectTensor(got_two, two, "tag 2"));
  return absl::OkStatus();
}

// The last rank arrives 300 ms late: nobody may leave the barrier before it arrives.
inline absl::Status Barrier(Backend& b) {
  const int last = b.size() - 1;
  if (b.rank() == last) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  CONF_OK(WaitOn(b.Barrier()));
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (b.rank() != last) CONF_CHECK(waited > 0.2, "left the barrier after ", waited, " s");
  for (int i = 0; i < 5; ++i) CONF_OK(WaitOn(b.Barrier()));
  return absl::OkStatus();
}

// 100 rounds of three all-reduces in flight at once and a broadcast, checked after each round.
inline absl::Status ManyOpsInSequence(Backend& b) {
  const int n = b.size();
  for (int round = 0; round < 100; ++round) {
    at::Tensor a = at::full({10}, float(b.rank() + round));
    at::Tensor c = at::full({1000}, float(b.rank() + 1));
    at::Tensor d = at::full({5}, float(round));
    at::Tensor e = at::full({7}, b.rank() == round % n ? float(round) : -1.0f);
    auto wa = b.AllReduce(a, ReduceOp::kSum);
    auto wc = b.AllReduce(c, ReduceOp::kMax);
    auto wd = b.AllReduce(d, ReduceOp::kAvg);
    auto we = b.Broadcast(e, round % n);
    CONF_OK(wa->Wait());
    CONF_OK(wc->Wait());
    CONF_OK(wd->Wait());
    CONF_OK(we->Wait());
    CONF_OK(ExpectTensor(a, at::full({10}, float(n * (n - 1) / 2 + n * round)),
                         absl::StrCat("round ", round, " sum")));
    CONF_OK(ExpectTensor(c, at::full({1000}, float(n)), absl::StrCat("round ", round, " max")));
    CONF_OK(ExpectTensor(d, at::full({5}, float(round)), absl::StrCat("round ", round, " avg"),
                         1e-6));
    CONF_OK(ExpectTensor(e, at::full({7}, float(round)), absl::StrCat("round ", round, " bcast")));
  }
  return absl::OkStatus();
}

// Bad arguments are refused on the spot with kInvalidArgument, and the group stays usable.
inline absl::Status ArgumentErrors(Backend& b) {
  const int n = b.size();
  at::Tensor small = at::zeros({3});
  at::Tensor wrong = at::zeros({n * 3 + 1});
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.ReduceScatter(small, wrong, ReduceOp::kSum))));
  at::Tensor doubles = at::zeros({n * 3}, at::kDouble);
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.AllGather(doubles, small))));
  at::Tensor strided = at::zeros({4, 4}).t();
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.AllReduce(strided, ReduceOp::kSum))));
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.Broadcast(small, n))));
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.Send(small, b.rank(), 0))));
  CONF_CHECK(absl::IsInvalidArgument(WaitOn(b.Recv(small, -1, 0))));
  const absl::Status bad = WaitOn(b.Broadcast(small, n));
  CONF_CHECK(absl::StrContains(bad.message(), "broadcast"), "message: ", bad.message());
  at::Tensor t = at::ones({4});
  CONF_OK(WaitOn(b.AllReduce(t, ReduceOp::kSum)));
  CONF_OK(ExpectTensor(t, at::full({4}, float(n)), "allreduce after argument errors"));
  return absl::OkStatus();
}

// The last rank joins an all-reduce 2.5 s late; the others, with a 1 s operation timeout, get
// kDeadlineExceeded within a generous bound and their group then refuses further work.
inline absl::Status SlowPeerTimesOut(Backend& b) {
  const int last = b.size() - 1;
  at::Tensor t = at::ones({1000});
  if (b.rank() == last) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    CollectiveOptions o;
    o.timeout = absl::Seconds(5);
    // The others gave up; whether this completes depends on the backend. It must return.
    WaitOn(b.AllReduce(t, ReduceOp::kSum, o)).IgnoreError();
    return absl::OkStatus();
  }
  CollectiveOptions o;
  o.timeout = absl::Seconds(1);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = WaitOn(b.AllReduce(t, ReduceOp::kSum, o));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CONF_CHECK(absl::IsDeadlineExceeded(s), "got ", s.ToString());
  CONF_CHECK(absl::StrContains(s.message(), "allreduce"), "message: ", s.message());
  CONF_CHECK(took < 20, "took ", took, " s");
  const absl::Status after = WaitOn(b.AllReduce(t, ReduceOp::kSum, o));
  CONF_CHECK(absl::IsFailedPrecondition(after), "after the timeout: ", after.ToString());
  return absl::OkStatus();
}

// The last rank exits (without a word) after a barrier; the others' next all-reduce fails with
// kUnavailable (a closed connection) or kDeadlineExceeded (the 3 s backend timeout), and never
// hangs.
inline absl::Status PeerExitsBeforeAllReduce(Backend& b) {
  const int last = b.size() - 1;
  CONF_OK(WaitOn(b.Barrier()));
  if (b.rank() == last) {
    std::printf("rank %d: exiting on purpose\n", b.rank());
    std::fflush(stdout);
    ::_exit(0);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  at::Tensor t = at::ones({1 << 16});
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = WaitOn(b.AllReduce(t, ReduceOp::kSum));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("rank %d: allreduce after the peer left: %s (%.2f s)\n", b.rank(),
              s.ToString().c_str(), took);
  CONF_CHECK(absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s), "got ", s.ToString());
  CONF_CHECK(took < 20, "took ", took, " s");
  const absl::Status after = WaitOn(b.Barrier());
  CONF_CHECK(!after.ok(), "a barrier with a dead peer succeeded");
  return absl::OkStatus();
}

struct Case {
  const char* name;
  absl::Status (*run)(Backend&);
  int min_world = 1;     // skipped on smaller groups
  bool gloo = true;      // runs on these backends
  bool mpi = true;
  absl::Duration backend_timeout = absl::Seconds(60);
  // Rendezvous case: the last rank is never started; the others' CreateBackend must fail with
  // kDeadlineExceeded or kUnavailable within a generous bound (run is unused).
  bool last_rank_missing = false;
  // Also run (Gloo, world of 2) with the ranks meeting through a file store instead of TCP.
  bool via_file_store = false;
};

inline const std::vector<Case>& AllCases() {
  static const std::vector<Case> cases = {
      {"AllReduceSumAvgMaxMin", AllReduceSumAvgMaxMin, 1, true, true, absl::Seconds(60), false, true},
      {"AllReduceDtypes", AllReduceDtypes},
      {"AllReduceHalfPrecision", AllReduceHalfPrecision},
      {"ReduceScatter", ReduceScatter},
      {"AllGather", AllGather},
      {"BroadcastFromEachRoot", BroadcastFromEachRoot},
      {"SendRecvRing", SendRecvRing, 2, true, true, absl::Seconds(60), false, true},
      // Not last: under MPI the late rank's all-reduce completes while the others are already
      // in the next case's collective (MPI progresses inside MPI calls only).
      {"SlowPeerTimesOut", SlowPeerTimesOut, 2},
      {"Barrier", Barrier},
      {"ManyOpsInSequence", ManyOpsInSequence, 1, true, true, absl::Seconds(60), false, true},
      {"ArgumentErrors", ArgumentErrors},
      // A dead peer takes the whole job down under OpenMPI 4.1 (no ULFM): Gloo only.
      {"PeerExitsBeforeAllReduce", PeerExitsBeforeAllReduce, 2, true, false, absl::Seconds(3)},
      // MPI has no rendezvous of ours: mpirun starts every rank or none.
      {"LastRankNeverArrives", nullptr, 2, true, false, absl::Seconds(3), true},
  };
  return cases;
}

}  // namespace shoal::comm::conformance

#endif  // SHOAL_TESTS_COMM_CONFORMANCE_CASES_H_
