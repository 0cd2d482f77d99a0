#include "comm/peer_group.h"

#include "comm/grpc_util.h"

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "comm/backend_internal.h"
#include "comm/grpc_util.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "proto/swarm.grpc.pb.h"

namespace shoal::comm {
namespace {

constexpr size_t kMaxGroupNameBytes = 200;
constexpr int kMaxGroupSize = 1 << 16;
constexpr int64_t kMaxTransferBytes = int64_t{1} << 40;
// What a buffered frame costs beyond its payload (the message, its strings, the bookkeeping),
// so that a flood of empty frames is bounded too.
constexpr int64_t kBufferedFrameOverhead = 512;
constexpr size_t kMaxAbortMessageBytes = 4096;
// The start of the message Deliver gives when its buffer is full: the one refusal a sender
// retries (gRPC itself answers RESOURCE_EXHAUSTED for an oversized message, which must not be).
constexpr char kMailboxFull[] = "mailbox full";

absl::Status WithContext(const std::string& context, const absl::Status& s) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

bool IsPrintableAscii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) <= 0x7e;
  });
}

int64_t DTypeBytes(v1::ExchangeDType d) {
  switch (d) {
    case v1::EXCHANGE_DTYPE_FLOAT32: return 4;
    case v1::EXCHANGE_DTYPE_FLOAT64: return 8;
    case v1::EXCHANGE_DTYPE_FLOAT16: return 2;
    case v1::EXCHANGE_DTYPE_BFLOAT16: return 2;
    case v1::EXCHANGE_DTYPE_INT8: return 1;
    case v1::EXCHANGE_DTYPE_UINT8: return 1;
    case v1::EXCHANGE_DTYPE_INT32: return 4;
    case v1::EXCHANGE_DTYPE_INT64: return 8;
    default: return 0;
  }
}

v1::ExchangeDType ToWireDType(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return v1::EXCHANGE_DTYPE_FLOAT32;
    case at::kDouble: return v1::EXCHANGE_DTYPE_FLOAT64;
    case at::kHalf: return v1::EXCHANGE_DTYPE_FLOAT16;
    case at::kBFloat16: return v1::EXCHANGE_DTYPE_BFLOAT16;
    case at::kChar: return v1::EXCHANGE_DTYPE_INT8;
    case at::kByte: return v1::EXCHANGE_DTYPE_UINT8;
    case at::kInt: return v1::EXCHANGE_DTYPE_INT32;
    case at::kLong: return v1::EXCHANGE_DTYPE_INT64;
    default: return v1::EXCHANGE_DTYPE_UNSPECIFIED;
  }
}

const char* OpName(v1::ExchangeOp op) {
  switch (op) {
    case v1::EXCHANGE_OP_ALL_REDUCE: return "allreduce";
    case v1::EXCHANGE_OP_REDUCE_SCATTER: return "reduce_scatter";
    case v1::EXCHANGE_OP_ALL_GATHER: return "allgather";
    case v1::EXCHANGE_OP_BROADCAST: return "broadcast";
    case v1::EXCHANGE_OP_BARRIER: return "barrier";
    default: return "unknown op";
  }
}

// Pieces of a transfer of `bytes`: an empty transfer is one empty piece.
int64_t PieceCount(int64_t bytes, int64_t piece_bytes) {
  return bytes == 0 ? 1 : (bytes + piece_bytes - 1) / piece_bytes;
}

// The checks a frame must pass on its own, before anyone looks at the group it names.
absl::Status CheckFrame(const v1::ExchangeFrame& f) {
  if (f.group().empty() || f.group().size() > kMaxGroupNameBytes || !IsPrintableAscii(f.group())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame: the group name must be 1..", kMaxGroupNameBytes,
        " printable ASCII characters, got ", f.group().size(), " bytes"));
  }
  const std::string where = absl::StrCat("frame for group '", f.group(), "' op ", f.op_seq());
  if (f.group_size() < 1 || f.group_size() > kMaxGroupSize) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": group_size ", f.group_size(), " is not in [1, ", kMaxGroupSize, "]"));
  }
  if (f.source_rank() < 0 || f.source_rank() >= f.group_size()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": source_rank ", f.source_rank(),
                                                   " is not in [0, ", f.group_size(), ")"));
  }
  if (f.dest_rank() < 0 || f.dest_rank() >= f.group_size() || f.dest_rank() == f.source_rank()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": dest_rank ", f.dest_rank(), " is not in [0, ", f.group_size(),
                     ") or equals source_rank ", f.source_rank()));
  }
  if (!v1::ExchangeOp_IsValid(f.op()) || f.op() == v1::EXCHANGE_OP_UNSPECIFIED) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unknown op ", f.op()));
  }
  if (f.has_abort()) {
    const int code = f.abort().code();
    if (code < 1 || code > 16) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": abort code ", code, " is not a status code in [1, 16]"));
    }
    if (f.abort().message().size() > kMaxAbortMessageBytes || !f.data().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": an abort carries no data and a message of at most ", kMaxAbortMessageBytes,
          " bytes"));
    }
    return absl::OkStatus();
  }
  const uint32_t max_phase = f.op() == v1::EXCHANGE_OP_ALL_REDUCE ? 1 : 0;
  if (f.phase() > max_phase) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": phase ", f.phase(), " of ",
                                                   OpName(f.op()), " is not in [0, ", max_phase,
                                                   "]"));
  }
  const bool barrier = f.op() == v1::EXCHANGE_OP_BARRIER;
  if (!v1::ExchangeDType_IsValid(f.dtype()) ||
      (barrier != (f.dtype() == v1::EXCHANGE_DTYPE_UNSPECIFIED))) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": dtype ", f.dtype(), barrier ? " (a barrier has none)" : " is not a known dtype"));
  }
  const int64_t n = f.transfer_bytes();
  if (n < 0 || n > kMaxTransferBytes || (barrier && n != 0) ||
      (!barrier && n % DTypeBytes(f.dtype()) != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": transfer_bytes ", n, " is negative, too large or not a whole number of ",
        v1::ExchangeDType_Name(f.dtype()), " elements"));
  }
  if (f.piece_bytes() < 1 || f.piece_bytes() > kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": piece_bytes ", f.piece_bytes(),
                                                   " is not in [1, ", kMaxFrameBytes, "]"));
  }
  const int64_t pieces = PieceCount(n, f.piece_bytes());
  if (f.piece() < 0 || f.piece() >= pieces) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": piece ", f.piece(), " is out of range (the transfer of ", n, " bytes has ",
        pieces, " piece", pieces == 1 ? "" : "s", " of ", f.piece_bytes(), " bytes)"));
  }
  if (f.offset() != f.piece() * f.piece_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": offset ", f.offset(),
                                                   " is not piece x piece_bytes = ",
                                                   f.piece() * f.piece_bytes()));
  }
  const int64_t want = std::min(f.piece_bytes(), n - f.offset());
  if (static_cast<int64_t>(f.data().size()) != want) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": piece ", f.piece(), " carries ",
                                                   f.data().size(), " bytes, expected ", want));
  }
  return absl::OkStatus();
}



}  // namespace

// ---- The mailbox. ----

// Where one expected transfer of a posted operation lands.
struct ExpectedTransfer {
  uint32_t phase = 0;
  int source = 0;
  uint8_t* dest = nullptr;  // `bytes` writable bytes (null when 0)
  int64_t bytes = 0;
};

struct ExchangeMailbox::Impl {
  struct Transfer {
    uint8_t* dest = nullptr;
    int64_t bytes = 0;
    int64_t piece_bytes = 0;  // set by the first piece; the sender's frame size
    int64_t pieces = 0;
    std::vector<bool> got;
    int64_t copied = 0;       // pieces whose bytes are in place
    bool complete() const { return piece_bytes > 0 && copied == pieces; }
  };
  // The operation this process runs now in one group.
  struct Posted {
    uint64_t op_seq = 0;
    v1::ExchangeOp op = v1::EXCHANGE_OP_UNSPECIFIED;
    v1::ExchangeDType dtype = v1::EXCHANGE_DTYPE_UNSPECIFIED;
    std::map<std::pair<uint32_t, int>, Transfer> transfers;  // by (phase, source)
    // The first problem a peer reported or showed: its rank, code and what happened.
    int failed_source = -1;
    absl::StatusCode failure_code = absl::StatusCode::kOk;
    std::string failure;
    int copying = 0;  // frames being copied in with the lock released
  };
  struct Group {
    int size = 0;
    int rank = 0;
    uint64_t next_op_seq = 0;  // operations below it finished here
    std::unique_ptr<Posted> posted;
  };
  struct Buffered {
    v1::ExchangeFrame frame;
    absl::Time arrived;
    int64_t cost = 0;
  };

  explicit Impl(ExchangeMailboxOptions o) : options(o) {}

  const ExchangeMailboxOptions options;
  mutable absl::Mutex mu;
  absl::CondVar cv;  // a transfer completed, a posted operation failed, a copy finished
  std::map<std::string, Group> groups;
  // Closed groups: why, and the code of the failure that closed it (kOk: destroyed).
  struct Closed {
    std::string why;
    absl::StatusCode code = absl::StatusCode::kOk;
  };
  std::map<std::string, Closed> closed;
  std::deque<std::string> closed_order;       // oldest first, for the bound
  std::map<std::string, std::deque<Buffered>> unclaimed;
  int64_t unclaimed_bytes = 0;
  int64_t accepted = 0;
  int64_t refused = 0;

  absl::Status Deliver(const v1::ExchangeFrame& f, v1::ExchangeAck* ack);
  absl::Status Register(const std::string& name, int size, int rank);
  // Forgets the group and refuses its frames from now on; `failure` (non-OK) when it closes
  // because an operation failed, which later frames are answered with.
  void Close(const std::string& name, const absl::Status& failure);
  // Starts operation `op_seq` of a registered group: frames for it go into `expected`'s
  // buffers from now on (those buffered before are claimed at once).
  void Post(const std::string& name, uint64_t op_seq, v1::ExchangeOp op, v1::ExchangeDType dtype,
            const std::vector<ExpectedTransfer>& expected);
  // Ends the posted operation (waiting for copies in progress); later frames for it are stale.
  void Finish(const std::string& name);

  // The posted operation's state: OK when every transfer of `phase` is complete; kUnknown while
  // some are not, with their sources in `missing`; otherwise the failure a peer caused, with its
  // rank in `source`. Waits for a change until `until` first.
  absl::Status AwaitPhase(const std::string& name, uint32_t phase, absl::Time until,
                          std::vector<int>* missing, int* source);
  // The failure a peer caused in the posted operation (OK if none), with its rank in `source`.
  absl::Status PostedFailure(const std::string& name, int* source) const;
  // Whether the posted operation still waits for frames from rank `source`, in any phase.
  bool ExpectsMoreFrom(const std::string& name, int source) const;

 private:
  absl::Status Apply(Posted& p, const v1::ExchangeFrame& f, bool may_unlock)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void FailPosted(Posted& p, int source, absl::StatusCode code, std::string why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void DropUnclaimed(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void PurgeExpired(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::Status Buffer(const v1::ExchangeFrame& f, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

void ExchangeMailbox::Impl::FailPosted(Posted& p, int source, absl::StatusCode code,
                                       std::string why) {
  if (p.failure_code != absl::StatusCode::kOk) return;
  p.failed_source = source;
  p.failure_code = code;
  p.failure = std::move(why);
  cv.SignalAll();
}

// A frame for the posted operation: it must be the piece of a transfer this operation expects,
// of the size it expects. A frame that disagrees shows that the ranks issued different
// operations, so the operation fails here as well as being refused.
absl::Status ExchangeMailbox::Impl::Apply(Posted& p, const v1::ExchangeFrame& f, bool may_unlock) {
  const int src = f.source_rank();
  if (f.has_abort()) {
    FailPosted(p, src, static_cast<absl::StatusCode>(f.abort().code()),
               absl::StrCat("gave up on this operation: ", f.abort().message()));
    return absl::OkStatus();
  }
  // The local failure reads "rank 1 (HOST:PORT) sent a frame ..." once the group names the
  // rank; the sender's refusal says the same from this side.
  auto disagree = [&](const std::string& why) {
    const std::string text = absl::StrCat(
        "sent a frame for op ", f.op_seq(), " of group '", f.group(), "' that ", why,
        " (every rank must issue the same collectives, with the same sizes and dtypes, in the "
        "same order)");
    FailPosted(p, src, absl::StatusCode::kInternal, text);
    return absl::InvalidArgumentError(absl::StrCat("rank ", src, " ", text));
  };
  if (f.op() != p.op || f.dtype() != p.dtype) {
    return disagree(absl::StrCat("belongs to ", OpName(f.op()), " of ",
                                 v1::ExchangeDType_Name(f.dtype()), ", while this rank runs ",
                                 OpName(p.op), " of ", v1::ExchangeDType_Name(p.dtype)));
  }
  auto it = p.transfers.find({f.phase(), src});
  if (it == p.transfers.end()) {
    return disagree(absl::StrCat("is for phase ", f.phase(), ", where this rank expects nothing "
                                 "from rank ", src));
  }
  Transfer& t = it->second;
  if (f.transfer_bytes() != t.bytes) {
    return disagree(absl::StrCat("declares ", f.transfer_bytes(), " bytes for phase ", f.phase(),
                                 " where this rank expects ", t.bytes));
  }
  if (t.piece_bytes == 0) {
    t.piece_bytes = f.piece_bytes();
    t.pieces = PieceCount(t.bytes, t.piece_bytes);
    t.got.assign(static_cast<size_t>(t.pieces), false);
  } else if (f.piece_bytes() != t.piece_bytes) {
    return disagree(absl::StrCat("has pieces of ", f.piece_bytes(), " bytes after pieces of ",
                                 t.piece_bytes));
  }
  if (t.got[static_cast<size_t>(f.piece())]) {
    return absl::AlreadyExistsError(absl::StrCat("frame for group '", f.group(), "' op ",
                                                 f.op_seq(), ": piece ", f.piece(),
                                                 " from rank ", src, " was delivered before"));
  }
  t.got[static_cast<size_t>(f.piece())] = true;
  const size_t n = f.data().size();
  if (n > 0) {
    uint8_t* dest = t.dest + f.offset();
    // A large copy runs without the lock, so that frames from other peers land meanwhile;
    // Finish and Close wait for `copying` to drop to zero before the buffers can go away.
    if (may_unlock && n >= (size_t{64} << 10)) {
      ++p.copying;
      mu.Unlock();
      std::memcpy(dest, f.data().data(), n);
      mu.Lock();
      --p.copying;
    } else {
      std::memcpy(dest, f.data().data(), n);
    }
  }
  ++t.copied;
  cv.SignalAll();
  return absl::OkStatus();
}

void ExchangeMailbox::Impl::DropUnclaimed(const std::string& name) {
  auto it = unclaimed.find(name);
  if (it == unclaimed.end()) return;
  for (const Buffered& b : it->second) unclaimed_bytes -= b.cost;
  unclaimed.erase(it);
}

// Frames of groups that were never created here would otherwise hold their bytes for good.
void ExchangeMailbox::Impl::PurgeExpired(absl::Time now) {
  for (auto it = unclaimed.begin(); it != unclaimed.end();) {
    if (groups.count(it->first) == 0) {
      auto& q = it->second;
      while (!q.empty() && now - q.front().arrived > options.unclaimed_ttl) {
        unclaimed_bytes -= q.front().cost;
        q.pop_front();
      }
    }
    it = it->second.empty() ? unclaimed.erase(it) : std::next(it);
  }
}

absl::Status ExchangeMailbox::Impl::Buffer(const v1::ExchangeFrame& f, absl::Time now) {
  const int64_t cost =
      static_cast<int64_t>(f.data().size() + f.abort().message().size()) + kBufferedFrameOverhead;
  auto& q = unclaimed[f.group()];
  for (const Buffered& b : q) {
    const v1::ExchangeFrame& o = b.frame;
    if (o.op_seq() == f.op_seq() && o.source_rank() == f.source_rank() &&
        o.phase() == f.phase() && o.piece() == f.piece() && o.has_abort() == f.has_abort()) {
      return absl::AlreadyExistsError(absl::StrCat("frame for group '", f.group(), "' op ",
                                                   f.op_seq(), ": piece ", f.piece(),
                                                   " from rank ", f.source_rank(),
                                                   " was delivered before"));
    }
  }
  if (unclaimed_bytes + cost > options.max_unclaimed_bytes) {
    if (q.empty()) unclaimed.erase(f.group());
    return absl::ResourceExhaustedError(absl::StrCat(
        kMailboxFull, ": this peer buffers ", unclaimed_bytes,
        " bytes of frames for operations it has not started (limit ",
        options.max_unclaimed_bytes, "); retry later"));
  }
  q.push_back(Buffered{f, now, cost});
  unclaimed_bytes += cost;
  return absl::OkStatus();
}

absl::Status ExchangeMailbox::Impl::Deliver(const v1::ExchangeFrame& f, v1::ExchangeAck* ack) {
  absl::Status s = CheckFrame(f);
  absl::MutexLock lock(&mu);
  if (s.ok()) {
    const absl::Time now = absl::Now();
    PurgeExpired(now);
    if (auto c = closed.find(f.group()); c != closed.end()) {
      if (c->second.code == absl::StatusCode::kOk) {
        s = absl::FailedPreconditionError(absl::StrCat("group '", f.group(),
                                                       "' is closed on this peer (",
                                                       c->second.why, ")"));
      } else {
        // Not an error of the frame: the answer is that this peer gave up, and why.
        ack->mutable_abort()->set_code(static_cast<int>(c->second.code));
        ack->mutable_abort()->set_message(
            absl::StrCat("gave up on group '", f.group(), "': ",
                         c->second.why.substr(0, kMaxAbortMessageBytes)));
      }
    } else if (auto g = groups.find(f.group()); g != groups.end()) {
      Group& group = g->second;
      if (f.group_size() != group.size || f.dest_rank() != group.rank) {
        s = absl::InvalidArgumentError(absl::StrCat(
            "frame for group '", f.group(), "' is addressed to rank ", f.dest_rank(), " of ",
            f.group_size(), "; this peer is rank ", group.rank, " of ", group.size));
      } else if (f.op_seq() < group.next_op_seq) {
        s = absl::FailedPreconditionError(absl::StrCat("op ", f.op_seq(), " of group '",
                                                       f.group(),
                                                       "' has already finished on this peer"));
      } else if (group.posted != nullptr && f.op_seq() == group.posted->op_seq) {
        s = Apply(*group.posted, f, /*may_unlock=*/true);
      } else {
        s = Buffer(f, now);
      }
    } else {
      s = Buffer(f, now);
    }
  }
  ++(s.ok() ? accepted : refused);
  return s;
}

absl::Status ExchangeMailbox::Impl::Register(const std::string& name, int size, int rank) {
  absl::MutexLock lock(&mu);
  if (groups.count(name) > 0 || closed.count(name) > 0) {
    return absl::AlreadyExistsError(absl::StrCat(
        "group '", name, "' was created before in this process; give every group its own name"));
  }
  Group& g = groups[name];
  g.size = size;
  g.rank = rank;
  return absl::OkStatus();
}

void ExchangeMailbox::Impl::Close(const std::string& name, const absl::Status& failure) {
  absl::MutexLock lock(&mu);
  auto it = groups.find(name);
  if (it == groups.end()) return;
  Posted* p = it->second.posted.get();
  while (p != nullptr && p->copying > 0) cv.Wait(&mu);
  groups.erase(it);
  DropUnclaimed(name);
  closed[name] = Closed{failure.ok() ? std::string("it was destroyed")
                                     : std::string(failure.message()),
                        failure.code()};
  closed_order.push_back(name);
  while (static_cast<int>(closed_order.size()) > std::max(1, options.max_closed_groups)) {
    closed.erase(closed_order.front());
    closed_order.pop_front();
  }
}

void ExchangeMailbox::Impl::Post(const std::string& name, uint64_t op_seq, v1::ExchangeOp op,
                                 v1::ExchangeDType dtype,
                                 const std::vector<ExpectedTransfer>& expected) {
  absl::MutexLock lock(&mu);
  auto it = groups.find(name);
  if (it == groups.end()) return;
  auto p = std::make_unique<Posted>();
  p->op_seq = op_seq;
  p->op = op;
  p->dtype = dtype;
  for (const ExpectedTransfer& e : expected) {
    Transfer& t = p->transfers[{e.phase, e.source}];
    t.dest = e.dest;
    t.bytes = e.bytes;
  }
  it->second.posted = std::move(p);
  Posted& posted = *it->second.posted;
  // Frames that arrived before this operation started here.
  auto q = unclaimed.find(name);
  if (q == unclaimed.end()) return;
  std::deque<Buffered> keep;
  for (Buffered& b : q->second) {
    if (b.frame.op_seq() != op_seq) {
      keep.push_back(std::move(b));
      continue;
    }
    unclaimed_bytes -= b.cost;
    const v1::ExchangeFrame& f = b.frame;
    absl::Status s;
    if (f.group_size() != it->second.size || f.dest_rank() != it->second.rank) {
      FailPosted(posted, f.source_rank(), absl::StatusCode::kInternal,
                 absl::StrCat("sent a frame addressed to rank ", f.dest_rank(), " of ",
                              f.group_size(), " to this rank ", it->second.rank, " of ",
                              it->second.size, " (do the ranks have the same roster?)"));
    } else {
      Apply(posted, f, /*may_unlock=*/false).IgnoreError();  // a disagreement fails `posted`
    }
  }
  if (keep.empty()) {
    unclaimed.erase(q);
  } else {
    q->second = std::move(keep);
  }
}

void ExchangeMailbox::Impl::Finish(const std::string& name) {
  absl::MutexLock lock(&mu);
  auto it = groups.find(name);
  if (it == groups.end() || it->second.posted == nullptr) return;
  while (it->second.posted->copying > 0) cv.Wait(&mu);
  it->second.next_op_seq = it->second.posted->op_seq + 1;
  it->second.posted.reset();
}

absl::Status ExchangeMailbox::Impl::PostedFailure(const std::string& name, int* source) const {
  absl::MutexLock lock(&mu);
  auto it = groups.find(name);
  if (it == groups.end() || it->second.posted == nullptr) return absl::OkStatus();
  const Posted& p = *it->second.posted;
  if (p.failure_code == absl::StatusCode::kOk) return absl::OkStatus();
  *source = p.failed_source;
  return absl::Status(p.failure_code, p.failure);
}

bool ExchangeMailbox::Impl::ExpectsMoreFrom(const std::string& name, int source) const {
  absl::MutexLock lock(&mu);
  auto it = groups.find(name);
  if (it == groups.end() || it->second.posted == nullptr) return false;
  for (const auto& [key, t] : it->second.posted->transfers) {
    if (key.second == source && !t.complete()) return true;
  }
  return false;
}

absl::Status ExchangeMailbox::Impl::AwaitPhase(const std::string& name, uint32_t phase,
                                               absl::Time until, std::vector<int>* missing,
                                               int* source) {
  absl::MutexLock lock(&mu);
  while (true) {
    auto it = groups.find(name);
    if (it == groups.end() || it->second.posted == nullptr) {
      return absl::CancelledError("the group was closed");
    }
    const Posted& p = *it->second.posted;
    if (p.failure_code != absl::StatusCode::kOk) {
      *source = p.failed_source;
      return absl::Status(p.failure_code, p.failure);
    }
    missing->clear();
    for (const auto& [key, t] : p.transfers) {
      if (key.first == phase && !t.complete()) missing->push_back(key.second);
    }
    if (missing->empty()) return absl::OkStatus();
    if (absl::Now() >= until) return absl::UnknownError("pending");
    cv.WaitWithDeadline(&mu, until);
  }
}

ExchangeMailbox::ExchangeMailbox(ExchangeMailboxOptions options)
    : impl_(std::make_unique<Impl>(options)) {}
ExchangeMailbox::~ExchangeMailbox() = default;

absl::Status ExchangeMailbox::Deliver(const v1::ExchangeFrame& frame, v1::ExchangeAck* ack) {
  return impl_->Deliver(frame, ack);
}

ExchangeMailbox::Stats ExchangeMailbox::stats() const {
  absl::MutexLock lock(&impl_->mu);
  Stats s;
  s.frames_accepted = impl_->accepted;
  s.frames_refused = impl_->refused;
  s.unclaimed_bytes = impl_->unclaimed_bytes;
  return s;
}

// ---- The group. ----

namespace {

// The dtypes a PeerGroup moves (those with a wire dtype).
absl::Status CheckPeerGroupDtype(const at::Tensor& tensor, absl::string_view name,
                                 absl::string_view context) {
  if (ToWireDType(tensor.scalar_type()) != v1::EXCHANGE_DTYPE_UNSPECIFIED) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      context, ": ", name, " has dtype ", c10::toString(tensor.scalar_type()),
      "; a peer group takes float32/64, float16, bfloat16, int8/32/64 and uint8"));
}

internal::OpPrecheck::Rules PeerGroupRules() {
  internal::OpPrecheck::Rules rules;
  rules.device = internal::TensorDevice::kCpu;
  rules.max_tag = std::numeric_limits<int>::max();
  rules.check_dtype = &CheckPeerGroupDtype;
  return rules;
}

// Element ranges of the P shards of n elements: as even as possible, the first n % P shards one
// element longer. Shard s is owned (reduced) by rank s.
struct Shards {
  int64_t n;
  int p;
  int64_t start(int s) const { return s * (n / p) + std::min<int64_t>(s, n % p); }
  int64_t length(int s) const { return n / p + (s < n % p ? 1 : 0); }
};

// The kAvg division after the sum: each element divided by n and correctly rounded (float and
// double by IEEE division here, not by a multiplication with 1/n that a library may substitute,
// so the result is the one every peer and any reference computes); integers truncate.
void DivideExactly(at::Tensor& t, int64_t n) {
  if (n == 1) return;
  const int64_t count = t.numel();
  switch (t.scalar_type()) {
    case at::kFloat: {
      float* p = t.data_ptr<float>();
      const float d = static_cast<float>(n);
      for (int64_t i = 0; i < count; ++i) p[i] = p[i] / d;
      return;
    }
    case at::kDouble: {
      double* p = t.data_ptr<double>();
      const double d = static_cast<double>(n);
      for (int64_t i = 0; i < count; ++i) p[i] = p[i] / d;
      return;
    }
    case at::kHalf: {
      at::Half* p = t.data_ptr<at::Half>();
      for (int64_t i = 0; i < count; ++i) p[i] = static_cast<float>(p[i]) / static_cast<float>(n);
      return;
    }
    case at::kBFloat16: {
      at::BFloat16* p = t.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < count; ++i) p[i] = static_cast<float>(p[i]) / static_cast<float>(n);
      return;
    }
    default:
      internal::DivideInPlace(t, n);
  }
}

// acc <- acc (op) x, element by element.
void Combine(at::Tensor& acc, const at::Tensor& x, ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax: at::maximum_out(acc, acc, x); return;
    case ReduceOp::kMin: at::minimum_out(acc, acc, x); return;
    case ReduceOp::kSum:
    case ReduceOp::kAvg: acc.add_(x); return;
  }
}

// Since when each peer's connections have kept failing with nothing answered since: a peer
// counts as unreachable once that has lasted `grace` (a connection to a live peer can fail once:
// on a loaded machine one to 127.0.0.1 did). One per operation, kept by its sends (a frame's
// call failing in transport) and its waits (the peer's channel failing to connect) alike.
class FailureClock {
 public:
  explicit FailureClock(absl::Duration grace) : grace_(grace) {}
  // The peer answered (a frame delivered, its channel ready): its failures are forgotten.
  void Answered(int peer) { since_.erase(peer); }
  // A failure towards `peer` at `now`: true once its failures have lasted the grace.
  bool GiveUp(int peer, absl::Time now) {
    return now - since_.emplace(peer, now).first->second >= grace_;
  }

 private:
  const absl::Duration grace_;
  std::map<int, absl::Time> since_;
};

// What one operation knows while it runs.
struct OpRun {
  explicit OpRun(absl::Duration reconnect_grace) : failures(reconnect_grace) {}
  uint64_t seq = 0;  // its number in the group
  v1::ExchangeOp op = v1::EXCHANGE_OP_UNSPECIFIED;
  absl::Time deadline;
  absl::Duration timeout;
  // Peers a frame could not be delivered to (the connection failed), and how. A frame whose
  // call failed that way may still have arrived (a peer that finished the operation and exited
  // at once never sends its acknowledgement), so this fails the operation only while frames
  // from that peer are still missing here: what this rank computes depends on what it
  // receives, never on whether its own frames were acknowledged.
  std::map<int, absl::Status> unreached;
  FailureClock failures;  // PeerGroupOptions::reconnect_grace
  // The buffers posted with the mailbox. Frames are copied into them until the mailbox lets go
  // of the operation (Finish), which may be after the body returned with an error; so they live
  // here, and RunOp drops them only after Finish.
  std::vector<at::Tensor> receive_buffers;

  at::Tensor ReceiveBuffer(at::Tensor t) {
    receive_buffers.push_back(t);
    return t;
  }
};

// One operation queued on a group.
struct OpState {
  std::string context;
  v1::ExchangeOp wire_op = v1::EXCHANGE_OP_UNSPECIFIED;
  absl::Duration timeout;
  absl::Time deadline;
  std::function<absl::Status(OpRun& run)> body;

  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::Status status;
};

class PeerWork final : public Work {
 public:
  explicit PeerWork(std::shared_ptr<OpState> op) : op_(std::move(op)) {}
  absl::Status Wait() override {
    if (op_ == nullptr) return absl::FailedPreconditionError("peer group: waited twice");
    std::shared_ptr<OpState> op = std::move(op_);
    std::unique_lock<std::mutex> lock(op->mu);
    // The operation ends by its deadline on its own; the margin only guards against a bug
    // turning into a hang.
    const auto limit = absl::ToChronoTime(op->deadline + absl::Seconds(30));
    if (!op->cv.wait_until(lock, limit, [&] { return op->done; })) {
      return absl::DeadlineExceededError(
          absl::StrCat(op->context, ": not finished 30 s after its deadline"));
    }
    return op->status;
  }

 private:
  std::shared_ptr<OpState> op_;
};

}  // namespace

struct PeerGroup::Impl {
  Impl(const PeerGroupOptions& o, std::shared_ptr<ExchangeMailbox> owner,
       ExchangeMailbox::Impl* box)
      : options(o),
        size(static_cast<int>(o.roster.size())),
        rank(o.rank),
        label(absl::StrCat("peer group '", o.group, "' of ", size, " (rank ", rank, ")")),
        mailbox_owner(std::move(owner)),
        mailbox(box),
        health(label),
        precheck("peergroup", size, rank, PeerGroupRules(), &health) {}

  const PeerGroupOptions options;
  const int size;
  const int rank;
  const std::string label;  // "peer group 'g' of 4 (rank 1)"
  std::shared_ptr<ExchangeMailbox> mailbox_owner;
  ExchangeMailbox::Impl* const mailbox;
  internal::GroupHealth health;
  const internal::OpPrecheck precheck;  // reads health
  std::vector<std::shared_ptr<grpc::Channel>> channels;        // by rank; null for this one
  std::vector<std::unique_ptr<v1::SwarmPeer::Stub>> stubs;     // by rank; null for this one
  // Payload bytes of the frames this rank delivered (mutable: counted by the const sender).
  mutable std::atomic<int64_t> bytes_sent{0};

  // The operation thread and its queue.
  std::mutex queue_mu;
  std::condition_variable queue_cv;
  std::deque<std::shared_ptr<OpState>> queue;  // guarded by queue_mu
  bool stopping = false;                       // guarded by queue_mu
  std::atomic<bool> closing{false};
  std::atomic<bool> aborting{false};  // Abort was called: its reason is in `aborted`
  std::mutex abort_mu;
  absl::Status aborted;  // guarded by abort_mu
  std::thread worker;
  uint64_t next_op_seq = 0;  // the worker's

  std::string Who(int r) const { return absl::StrCat("rank ", r, " (", options.roster[r], ")"); }

  std::string Context(absl::string_view op) const { return absl::StrCat(op, " on ", label); }
  // Why the operations must stop now: the group is being destroyed, or Abort was called.
  absl::Status Interrupted() {
    if (closing.load()) return absl::CancelledError("the group is being destroyed");
    if (!aborting.load()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(abort_mu);
    return aborted;
  }

  std::unique_ptr<Work> Enqueue(std::string context, v1::ExchangeOp wire_op,
                                const CollectiveOptions& o,
                                std::function<absl::Status(OpRun&)> body);
  void RunWorker();
  absl::Status RunOp(OpState& op);

  // Sends the transfers `sends` (ExpectedTransfer::source naming the destination, .phase the
  // phase) of the running operation; see FrameSender. OK once every frame was acknowledged or
  // went to a peer in run.unreached that this rank needs nothing more from.
  absl::Status SendAll(OpRun& run, v1::ExchangeDType dtype,
                       const std::vector<ExpectedTransfer>& sends);
  // The first of run.unreached that this rank still expects frames from, as the operation's
  // status; OK if none.
  absl::Status CheckUnreached(const OpRun& run) const;
  // Tells every other peer (best effort, until `until`) that this rank gave up on the operation.
  void SendAborts(const OpRun& run, const absl::Status& abort, absl::Time until);
  v1::ExchangeFrame Header(const OpRun& run, v1::ExchangeDType dtype) const;
  // Waits until every transfer of `phase` of the posted operation arrived.
  absl::Status AwaitPhase(OpRun& run, uint32_t phase);
  // A peer's report on the posted operation (an abort, a disagreement), as this op's status.
  absl::Status PeerFailure(const absl::Status& s, int source) const {
    return absl::Status(s.code(), absl::StrCat(Who(source), " ", s.message()));
  }

  // The operations' bodies.
  absl::Status DoAllReduce(OpRun& run, at::Tensor tensor, ReduceOp op);
  absl::Status DoReduceScatter(OpRun& run, at::Tensor output, at::Tensor input, ReduceOp op);
  absl::Status DoAllGather(OpRun& run, at::Tensor output, at::Tensor input);
  absl::Status DoBroadcast(OpRun& run, at::Tensor tensor, int root);
  absl::Status DoBarrier(OpRun& run);
};

namespace {

// Sends the pieces of a set of transfers with at most `max_in_flight` Exchange calls at once,
// each with the operation's deadline. A peer's "mailbox full" answer is retried with backoff
// until the deadline. A call that failed in transport (the peer is unavailable, the connection
// broke) is retried with backoff until `failures` gives the peer up; then, or at once when a
// peer answered with its own abort, the peer goes into `unreached` and its other frames are
// dropped. A retried frame that the peer answers as delivered before (the failure came after it
// arrived) counts as delivered. Any other error (a refusal, the deadline) ends the sending,
// cancels the calls in flight and is returned, naming the peer. `interrupt` is polled while
// waiting: a non-OK status from it (a peer's abort, the group being destroyed) ends the sending
// with that status.
//
// Everything runs on the calling thread: the calls complete on a completion queue of this
// sender's own, which Run polls. (gRPC's callback API would need no loop here, but on this
// build it completes calls on threads of a process-wide queue that it tears down when the last
// channel goes, and that teardown showed a double free under AddressSanitizer.)
class FrameSender {
 public:
  FrameSender(const PeerGroup::Impl& group, absl::Time deadline, int max_in_flight,
              FailureClock* failures, std::map<int, absl::Status>* unreached,
              std::function<absl::Status()> interrupt)
      : group_(group),
        deadline_(deadline),
        max_in_flight_(max_in_flight),
        failures_(failures),
        unreached_(unreached),
        interrupt_(std::move(interrupt)) {}

  // Queues the transfer of `bytes` at `data` (kept alive by the caller until Run returns) to
  // `dest`, cut into pieces of the group's frame size; `header` holds the frame's other fields.
  void Add(const v1::ExchangeFrame& header, int dest, const uint8_t* data, int64_t bytes) {
    const int64_t piece_bytes = group_.options.frame_bytes;
    const int64_t pieces = PieceCount(bytes, piece_bytes);
    for (int64_t k = 0; k < pieces; ++k) {
      Job job;
      job.frame = header;
      job.frame.set_dest_rank(dest);
      job.frame.set_transfer_bytes(bytes);
      job.frame.set_piece_bytes(piece_bytes);
      job.frame.set_piece(k);
      job.frame.set_offset(k * piece_bytes);
      job.dest = dest;
      job.data = data == nullptr ? nullptr : data + k * piece_bytes;
      job.size = std::min(piece_bytes, bytes - k * piece_bytes);
      pending_.push_back(std::move(job));
    }
  }
  // Queues a frame without data (an abort) to `dest`.
  void AddBare(const v1::ExchangeFrame& frame, int dest) {
    Job job;
    job.frame = frame;
    job.frame.set_dest_rank(dest);
    job.dest = dest;
    pending_.push_back(std::move(job));
  }

  absl::Status Run() {
    absl::Time last_interrupt_check = absl::InfinitePast();
    while (failure_.ok()) {
      absl::Time now = absl::Now();
      if (pending_.empty() && active_.empty()) break;
      if (now >= deadline_) {
        const int dest = !active_.empty() ? active_.begin()->second->job.dest
                                          : pending_.front().dest;
        failure_ = absl::DeadlineExceededError(
            absl::StrCat("not done by its deadline: ", group_.Who(dest),
                         " has not taken all of this rank's frames"));
        break;
      }
      absl::Time next_retry = absl::InfiniteFuture();
      for (auto it = pending_.begin();
           it != pending_.end() && static_cast<int>(active_.size()) < max_in_flight_;) {
        if (it->not_before > now) {
          next_retry = std::min(next_retry, it->not_before);
          ++it;
          continue;
        }
        Start(std::move(*it));
        it = pending_.erase(it);
      }
      if (interrupt_ && now - last_interrupt_check >= absl::Milliseconds(20)) {
        last_interrupt_check = now;
        if (absl::Status s = interrupt_(); !s.ok()) {
          failure_ = s;
          break;
        }
      }
      const absl::Time wake =
          std::min({deadline_, next_retry, now + absl::Milliseconds(50)});
      void* tag = nullptr;
      bool ok = false;
      if (cq_.AsyncNext(&tag, &ok, absl::ToChronoTime(wake)) ==
          grpc::CompletionQueue::GOT_EVENT) {
        Complete(static_cast<Call*>(tag));
      }
    }
    if (!failure_.ok()) {
      cancelled_ = true;
      for (auto& [raw, call] : active_) call->ctx.TryCancel();
    }
    // Every call ends by its deadline (or at once when cancelled); then the queue is empty.
    while (!active_.empty()) {
      void* tag = nullptr;
      bool ok = false;
      if (!cq_.Next(&tag, &ok)) break;
      Complete(static_cast<Call*>(tag));
    }
    cq_.Shutdown();
    void* tag = nullptr;
    bool ok = false;
    while (cq_.Next(&tag, &ok)) {
    }
    return failure_;
  }

 private:
  struct Job {
    v1::ExchangeFrame frame;  // all but the data
    int dest = 0;
    const uint8_t* data = nullptr;
    int64_t size = 0;
    absl::Time not_before = absl::InfinitePast();
    absl::Duration backoff = absl::Milliseconds(5);
    bool resent = false;  // sent again after a transport failure
  };
  struct Call {
    Job job;
    grpc::ClientContext ctx;
    v1::ExchangeFrame frame;  // the job's frame with its data
    v1::ExchangeAck ack;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::ExchangeAck>> rpc;
  };

  void Start(Job job) {
    auto call = std::make_unique<Call>();
    call->job = std::move(job);
    call->frame = call->job.frame;
    if (call->job.size > 0) {
      call->frame.set_data(call->job.data, static_cast<size_t>(call->job.size));
    }
    call->ctx.set_deadline(absl::ToChronoTime(deadline_));
    if (!group_.options.token.empty()) {
      AddBearer(&call->ctx, group_.options.token);
    }
    Call* raw = call.get();
    active_[raw] = std::move(call);
    raw->rpc = group_.stubs[raw->job.dest]->PrepareAsyncExchange(&raw->ctx, raw->frame, &cq_);
    raw->rpc->StartCall();
    raw->rpc->Finish(&raw->ack, &raw->status, raw);
  }

  void Complete(Call* raw) {
    auto it = active_.find(raw);
    if (it == active_.end()) return;
    std::unique_ptr<Call> call = std::move(it->second);
    active_.erase(it);
    const grpc::Status& s = call->status;
    const int dest = call->job.dest;
    const grpc::StatusCode code = s.error_code();
    // Delivered: answered without an abort, or, for a frame sent again, answered that an earlier
    // try arrived (its answer did not).
    const bool delivered = (s.ok() && !call->ack.has_abort()) ||
                           (call->job.resent && code == grpc::StatusCode::ALREADY_EXISTS);
    if (delivered) failures_->Answered(dest);
    if (s.ok() && call->ack.has_abort()) {
      // The peer gave up on the group: as good as gone, with its own reason.
      const int c = call->ack.abort().code();
      MarkUnreached(dest, absl::Status(c >= 1 && c <= 16 ? static_cast<absl::StatusCode>(c)
                                                         : absl::StatusCode::kInternal,
                                       absl::StrCat(group_.Who(dest), " ",
                                                    call->ack.abort().message())));
    } else if (delivered || (cancelled_ && code == grpc::StatusCode::CANCELLED)) {
      // Delivered, or cancelled by Run after a failure.
      if (delivered) group_.bytes_sent.fetch_add(call->job.size, std::memory_order_relaxed);
    } else if (code == grpc::StatusCode::RESOURCE_EXHAUSTED &&
               absl::StartsWith(s.error_message(), kMailboxFull) && absl::Now() < deadline_) {
      Job retry = std::move(call->job);
      retry.not_before = absl::Now() + retry.backoff;
      retry.backoff = std::min(retry.backoff * 2, absl::Milliseconds(200));
      pending_.push_back(std::move(retry));
    } else if (code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::CANCELLED ||
               code == grpc::StatusCode::UNKNOWN) {
      // The transport failed: the peer is gone or cut off, unless the failure passes.
      const absl::Time now = absl::Now();
      if (!failures_->GiveUp(dest, now) && now < deadline_) {
        Job retry = std::move(call->job);
        retry.resent = true;
        retry.not_before = now + std::max(retry.backoff, absl::Milliseconds(50));
        retry.backoff = std::min(std::max(retry.backoff, absl::Milliseconds(50)) * 2,
                                 absl::Milliseconds(200));
        pending_.push_back(std::move(retry));
      } else {
        // Its other frames would fail too.
        MarkUnreached(dest, absl::UnavailableError(absl::StrCat(group_.Who(dest),
                                                                " is unavailable: ",
                                                                s.error_message())));
      }
    } else if (failure_.ok()) {
      failure_ = Classify(dest, s);
    }
  }

  void MarkUnreached(int dest, absl::Status why) {
    unreached_->emplace(dest, std::move(why));
    pending_.remove_if([dest](const Job& j) { return j.dest == dest; });
  }

  // A refused Exchange call as the operation's status. A peer's refusal of a frame becomes an
  // internal error, never kInvalidArgument or kFailedPrecondition: those would say that this
  // caller's arguments were wrong, and leave a group usable that is not.
  absl::Status Classify(int dest, const grpc::Status& s) const {
    const std::string who = group_.Who(dest);
    const std::string& m = s.error_message();
    switch (s.error_code()) {
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return absl::DeadlineExceededError(
            absl::StrCat("not done by its deadline: ", who, " did not take a frame in time (", m,
                         ")"));
      case grpc::StatusCode::UNAUTHENTICATED:
      case grpc::StatusCode::PERMISSION_DENIED:
        return absl::UnauthenticatedError(absl::StrCat(who, " refused this peer's token: ", m));
      case grpc::StatusCode::FAILED_PRECONDITION:
        return absl::AbortedError(absl::StrCat(who, " is done with the group: ", m));
      case grpc::StatusCode::UNIMPLEMENTED:
        return absl::UnimplementedError(absl::StrCat(who, " serves no Exchange: ", m));
      default:
        return absl::InternalError(absl::StrCat(
            who, " refused a frame (",
            absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())), "): ", m));
    }
  }

  const PeerGroup::Impl& group_;
  const absl::Time deadline_;
  const int max_in_flight_;
  FailureClock* const failures_;
  std::map<int, absl::Status>* const unreached_;
  const std::function<absl::Status()> interrupt_;

  grpc::CompletionQueue cq_;
  std::list<Job> pending_;
  std::map<Call*, std::unique_ptr<Call>> active_;
  bool cancelled_ = false;
  absl::Status failure_;
};

// The receiving rank's transfers of one operation, and the sending rank's, in one place.
struct Plan {
  std::vector<ExpectedTransfer> receive;
  std::vector<ExpectedTransfer> send;  // `source` holds the destination rank
};

// Destinations after this rank first, so that the ranks do not all send to rank 0 first.
std::vector<int> OthersFrom(int rank, int size) {
  std::vector<int> out;
  for (int i = 1; i < size; ++i) out.push_back((rank + i) % size);
  return out;
}

uint8_t* BytesOf(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

}  // namespace

v1::ExchangeFrame PeerGroup::Impl::Header(const OpRun& run, v1::ExchangeDType dtype) const {
  v1::ExchangeFrame header;
  header.set_group(options.group);
  header.set_group_size(size);
  header.set_op_seq(run.seq);
  header.set_op(run.op);
  header.set_source_rank(rank);
  header.set_dtype(dtype);
  return header;
}

absl::Status PeerGroup::Impl::SendAll(OpRun& run, v1::ExchangeDType dtype,
                                      const std::vector<ExpectedTransfer>& sends) {
  auto interrupt = [this]() -> absl::Status {
    SHOAL_RETURN_IF_ERROR(Interrupted());
    int source = -1;
    absl::Status s = mailbox->PostedFailure(options.group, &source);
    return s.ok() ? s : PeerFailure(s, source);
  };
  FrameSender sender(*this, run.deadline, options.max_frames_in_flight, &run.failures,
                     &run.unreached, interrupt);
  v1::ExchangeFrame header = Header(run, dtype);
  for (const ExpectedTransfer& t : sends) {
    if (run.unreached.count(t.source) > 0) continue;
    header.set_phase(t.phase);
    sender.Add(header, t.source, t.dest, t.bytes);
  }
  SHOAL_RETURN_IF_ERROR(sender.Run());
  return CheckUnreached(run);
}

absl::Status PeerGroup::Impl::CheckUnreached(const OpRun& run) const {
  for (const auto& [peer, why] : run.unreached) {
    if (mailbox->ExpectsMoreFrom(options.group, peer)) return why;
  }
  return absl::OkStatus();
}

void PeerGroup::Impl::SendAborts(const OpRun& run, const absl::Status& abort, absl::Time until) {
  std::map<int, absl::Status> unreached;
  // No grace: an abort is a courtesy, and the failed operation returns only after it.
  FailureClock no_grace(absl::ZeroDuration());
  FrameSender sender(*this, until, std::max(1, size - 1), &no_grace, &unreached, nullptr);
  v1::ExchangeFrame frame = Header(run, v1::EXCHANGE_DTYPE_UNSPECIFIED);
  frame.mutable_abort()->set_code(static_cast<int>(abort.code()));
  frame.mutable_abort()->set_message(std::string(abort.message().substr(0, kMaxAbortMessageBytes)));
  for (int r : OthersFrom(rank, size)) {
    if (run.unreached.count(r) == 0) sender.AddBare(frame, r);
  }
  sender.Run().IgnoreError();
}

absl::Status PeerGroup::Impl::AwaitPhase(OpRun& run, uint32_t phase) {
  std::vector<int> missing;
  while (true) {
    SHOAL_RETURN_IF_ERROR(Interrupted());
    const absl::Time until = std::min(run.deadline, absl::Now() + options.probe_interval);
    int source = -1;
    absl::Status s = mailbox->AwaitPhase(options.group, phase, until, &missing, &source);
    if (s.ok()) return s;
    if (!absl::IsUnknown(s)) return source >= 0 ? PeerFailure(s, source) : s;
    for (int r : missing) {
      if (auto it = run.unreached.find(r); it != run.unreached.end()) return it->second;
    }
    std::vector<std::string> names;
    for (int r : missing) names.push_back(Who(r));
    if (absl::Now() >= run.deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "not done within ", absl::FormatDuration(run.timeout),
          ": still waiting for frames from ", absl::StrJoin(names, ", ")));
    }
    // A peer that died cannot be heard from, but its channel shows it: the connection broke
    // and new ones are refused, for reconnect_grace (one failed connection is not enough).
    const absl::Time now = absl::Now();
    for (int r : missing) {
      const grpc_connectivity_state state = channels[r]->GetState(/*try_to_connect=*/true);
      if (state == GRPC_CHANNEL_READY) run.failures.Answered(r);
      if (state != GRPC_CHANNEL_TRANSIENT_FAILURE) continue;
      if (run.failures.GiveUp(r, now)) {
        return absl::UnavailableError(absl::StrCat(
            Who(r), " is unreachable (connecting to it failed for ",
            absl::FormatDuration(options.reconnect_grace), ") while this rank waited for its "
            "frames"));
      }
    }
  }
}

std::unique_ptr<Work> PeerGroup::Impl::Enqueue(std::string context, v1::ExchangeOp wire_op,
                                               const CollectiveOptions& o,
                                               std::function<absl::Status(OpRun&)> body) {
  auto op = std::make_shared<OpState>();
  op->context = std::move(context);
  op->wire_op = wire_op;
  op->timeout = internal::EffectiveTimeout(o, options.timeout);
  op->deadline = absl::Now() + op->timeout;
  op->body = std::move(body);
  {
    std::lock_guard<std::mutex> lock(queue_mu);
    queue.push_back(op);
  }
  queue_cv.notify_all();
  return std::make_unique<PeerWork>(std::move(op));
}

void PeerGroup::Impl::RunWorker() {
  while (true) {
    std::shared_ptr<OpState> op;
    {
      std::unique_lock<std::mutex> lock(queue_mu);
      queue_cv.wait(lock, [&] { return stopping || !queue.empty(); });
      if (queue.empty()) return;  // stopping, and nothing left to fail
      op = std::move(queue.front());
      queue.pop_front();
    }
    absl::Status s;
    if (closing.load()) {
      s = absl::CancelledError(absl::StrCat(op->context, ": the group was destroyed"));
    } else if (absl::Status stop = Interrupted(); !stop.ok()) {
      s = WithContext(op->context, stop);  // queued when Abort was called
    } else if (absl::Status usable = health.CheckUsable(); !usable.ok()) {
      s = WithContext(op->context, usable);  // an operation queued before it failed
    } else {
      s = RunOp(*op);
    }
    {
      std::lock_guard<std::mutex> lock(op->mu);
      op->status = std::move(s);
      op->done = true;
    }
    op->cv.notify_all();
  }
}

absl::Status PeerGroup::Impl::RunOp(OpState& op) {
  OpRun run(options.reconnect_grace);
  run.seq = next_op_seq++;
  run.op = op.wire_op;
  run.deadline = op.deadline;
  run.timeout = op.timeout;
  absl::Status s = op.body(run);
  if (s.ok()) {
    mailbox->Finish(options.group);  // no frame is copied into run.receive_buffers after this
    return s;
  }
  // From here on the group is broken. kInvalidArgument and kFailedPrecondition only ever
  // describe a caller's mistake, so nothing that happened on the wire may carry them.
  if (absl::IsInvalidArgument(s) || absl::IsFailedPrecondition(s)) {
    s = absl::InternalError(s.message());
  }
  s = WithContext(op.context, s);
  health.RecordFailure(s);
  // Refuse this group's frames from now on, and tell the others, so that they fail now rather
  // than at their deadline. Best effort, a second at most: a dead peer refuses at once. Closing
  // (not finishing the operation first) leaves no moment in which a frame of the failed operation
  // is told it "already finished": a peer still sending gets this failure as the reason. No frame
  // is copied into run.receive_buffers after this either.
  mailbox->Close(options.group, s);
  SendAborts(run, s, absl::Now() + absl::Seconds(1));
  return s;
}

// All-reduce = reduce-scatter + all-gather, each element reduced once by its shard's owner in
// rank order (see the header).
//   phase 0: rank r sends shard d of its input to rank d, for every d != r;
//            rank r reduces shard r: in_0 (op) in_1 (op) ... (op) in_{P-1}  (kAvg: then / P)
//   phase 1: rank r sends its reduced shard to every other rank.
absl::Status PeerGroup::Impl::DoAllReduce(OpRun& run, at::Tensor tensor, ReduceOp op) {
  const v1::ExchangeDType dtype = ToWireDType(tensor.scalar_type());
  at::Tensor input = tensor.view({-1});
  const int64_t e = input.element_size();
  const Shards shards{input.numel(), size};
  const int64_t mine = shards.length(rank);
  // contributions: (P, mine): row r is rank r's copy of shard `rank` (this rank's row unused).
  at::Tensor contributions = run.ReceiveBuffer(at::empty({size, mine}, input.options()));
  at::Tensor result = run.ReceiveBuffer(at::empty({input.numel()}, input.options()));
  Plan plan;
  for (int r : OthersFrom(rank, size)) {
    plan.receive.push_back({0, r, BytesOf(contributions[r]), mine * e});
    plan.receive.push_back(
        {1, r, BytesOf(result) + shards.start(r) * e, shards.length(r) * e});
    plan.send.push_back({0, r, BytesOf(input) + shards.start(r) * e, shards.length(r) * e});
  }
  mailbox->Post(options.group, run.seq, run.op, dtype, plan.receive);
  SHOAL_RETURN_IF_ERROR(SendAll(run, dtype, plan.send));
  SHOAL_RETURN_IF_ERROR(AwaitPhase(run, 0));

  at::Tensor reduced = result.narrow(0, shards.start(rank), mine);
  auto row = [&](int r) {
    return r == rank ? input.narrow(0, shards.start(rank), mine) : contributions[r];
  };
  reduced.copy_(row(0));
  for (int r = 1; r < size; ++r) Combine(reduced, row(r), op);
  if (op == ReduceOp::kAvg) DivideExactly(reduced, size);

  std::vector<ExpectedTransfer> gather;
  for (int r : OthersFrom(rank, size)) gather.push_back({1, r, BytesOf(reduced), mine * e});
  SHOAL_RETURN_IF_ERROR(SendAll(run, dtype, gather));
  SHOAL_RETURN_IF_ERROR(AwaitPhase(run, 1));
  input.copy_(result);  // the one write to the caller's tensor
  return absl::OkStatus();
}

absl::Status PeerGroup::Impl::DoReduceScatter(OpRun& run, at::Tensor output, at::Tensor input,
                                              ReduceOp op) {
  const v1::ExchangeDType dtype = ToWireDType(input.scalar_type());
  at::Tensor in = input.view({-1});
  const int64_t m = output.numel();
  const int64_t e = in.element_size();
  // Row r: rank r's shard `rank`.
  at::Tensor contributions = run.ReceiveBuffer(at::empty({size, m}, in.options()));
  Plan plan;
  for (int r : OthersFrom(rank, size)) {
    plan.receive.push_back({0, r, BytesOf(contributions[r]), m * e});
    plan.send.push_back({0, r, BytesOf(in) + r * m * e, m * e});
  }
  mailbox->Post(options.group, run.seq, run.op, dtype, plan.receive);
  SHOAL_RETURN_IF_ERROR(SendAll(run, dtype, plan.send));
  SHOAL_RETURN_IF_ERROR(AwaitPhase(run, 0));
  auto row = [&](int r) { return r == rank ? in.narrow(0, rank * m, m) : contributions[r]; };
  at::Tensor reduced = row(0).clone();
  for (int r = 1; r < size; ++r) Combine(reduced, row(r), op);
  if (op == ReduceOp::kAvg) DivideExactly(reduced, size);
  output.view({-1}).copy_(reduced);
  return absl::OkStatus();
}

absl::Status PeerGroup::Impl::DoAllGather(OpRun& run, at::Tensor output, at::Tensor input) {
  const v1::ExchangeDType dtype = ToWireDType(input.scalar_type());
  at::Tensor in = input.view({-1});
  const int64_t m = in.numel();
  const int64_t e = in.element_size();
  // Row r: rank r's input.
  at::Tensor gathered = run.ReceiveBuffer(at::empty({size, m}, in.options()));
  Plan plan;
  for (int r : OthersFrom(rank, size)) {
    plan.receive.push_back({0, r, BytesOf(gathered[r]), m * e});
    plan.send.push_back({0, r, BytesOf(in), m * e});
  }
  mailbox->Post(options.group, run.seq, run.op, dtype, plan.receive);
  SHOAL_RETURN_IF_ERROR(SendAll(run, dtype, plan.send));
  SHOAL_RETURN_IF_ERROR(AwaitPhase(run, 0));
  gathered[rank].copy_(in);
  output.view({-1}).copy_(gathered.view({-1}));
  return absl::OkStatus();
}

absl::Status PeerGroup::Impl::DoBroadcast(OpRun& run, at::Tensor tensor, int root) {
  const v1::ExchangeDType dtype = ToWireDType(tensor.scalar_type());
  const int64_t bytes = static_cast<int64_t>(tensor.nbytes());
  Plan plan;
  at::Tensor received;
  if (rank == root) {
    for (int r : OthersFrom(rank, size)) plan.send.push_back({0, r, BytesOf(tensor), bytes});
  } else {
    received = run.ReceiveBuffer(at::empty_like(tensor));
    plan.receive.push_back({0, root, BytesOf(received), bytes});
  }
  mailbox->Post(options.group, run.seq, run.op, dtype, plan.receive);
  SHOAL_RETURN_IF_ERROR(SendAll(run, dtype, plan.send));
  SHOAL_RETURN_IF_ERROR(AwaitPhase(run, 0));
  if (rank != root) tensor.copy_(received);
  return absl::OkStatus();
}

absl::Status PeerGroup::Impl::DoBarrier(OpRun& run) {
  Plan plan;
  for (int r : OthersFrom(rank, size)) {
    plan.receive.push_back({0, r, nullptr, 0});
    plan.send.push_back({0, r, nullptr, 0});
  }
  mailbox->Post(options.group, run.seq, run.op, v1::EXCHANGE_DTYPE_UNSPECIFIED, plan.receive);
  SHOAL_RETURN_IF_ERROR(SendAll(run, v1::EXCHANGE_DTYPE_UNSPECIFIED, plan.send));
  return AwaitPhase(run, 0);
}

// ---- PeerGroup. ----

absl::StatusOr<std::unique_ptr<PeerGroup>> PeerGroup::Create(
    const PeerGroupOptions& options, std::shared_ptr<ExchangeMailbox> mailbox) {
  if (mailbox == nullptr) return absl::InvalidArgumentError("peer group: no mailbox");
  const int n = static_cast<int>(options.roster.size());
  if (n < 1 || n > kMaxGroupSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer group: the roster has ", n, " peers; it needs 1..", kMaxGroupSize));
  }
  std::set<std::string> seen;
  for (int r = 0; r < n; ++r) {
    std::string host;
    int port = 0;
    SHOAL_RETURN_IF_ERROR(SplitHostPort(options.roster[r],
                                        absl::StrCat("peer group roster entry ", r), 1, &host,
                                        &port));
    if (!seen.insert(options.roster[r]).second) {
      return absl::InvalidArgumentError(absl::StrCat("peer group: roster entry ", r, " (",
                                                     options.roster[r], ") appears twice"));
    }
  }
  if (options.rank < 0 || options.rank >= n) {
    return absl::InvalidArgumentError(absl::StrCat("peer group: rank ", options.rank,
                                                   " is not in [0, ", n, ")"));
  }
  if (options.group.empty() || options.group.size() > kMaxGroupNameBytes ||
      !IsPrintableAscii(options.group)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "peer group: the group name must be 1..", kMaxGroupNameBytes,
        " printable ASCII characters, got '", options.group, "'"));
  }
  if (!IsPrintableAscii(options.token)) {
    return absl::InvalidArgumentError("peer group: the token must be printable ASCII");
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "peer group: timeout ", absl::FormatDuration(options.timeout), " <= 0"));
  }
  if (options.frame_bytes < 1 || options.frame_bytes > kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("peer group: frame_bytes ",
                                                   options.frame_bytes, " is not in [1, ",
                                                   kMaxFrameBytes, "]"));
  }
  if (options.max_frames_in_flight < 1 || options.max_frames_in_flight > 256) {
    return absl::InvalidArgumentError(absl::StrCat("peer group: max_frames_in_flight ",
                                                   options.max_frames_in_flight,
                                                   " is not in [1, 256]"));
  }
  if (options.probe_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("peer group: probe_interval must be > 0");
  }
  if (options.reconnect_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("peer group: reconnect_grace must be >= 0");
  }
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                         ClientCredentials(options.tls_ca_file, "the peer group's CA file"));

  ExchangeMailbox::Impl* box = mailbox->impl_.get();
  auto impl = std::make_unique<Impl>(options, std::move(mailbox), box);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxExchangeMessageBytes);
  args.SetMaxSendMessageSize(kMaxExchangeMessageBytes);
  // Connections of this group only: a new group after a failure starts from fresh connections
  // instead of inheriting another channel's backoff towards a peer.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // Try a failed connection again within a fraction of a second, not gRPC's default of one
  // second growing to two minutes. (GRPC_ARG_MIN_RECONNECT_BACKOFF_MS stays at its default: it
  // is also the time a connection attempt may take, 20 s, and a loaded peer can need more than
  // a fraction of a second to answer one.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  impl->channels.resize(n);
  impl->stubs.resize(n);
  for (int r = 0; r < n; ++r) {
    if (r == options.rank) continue;
    impl->channels[r] = grpc::CreateCustomChannel(options.roster[r], credentials, args);
    impl->stubs[r] = v1::SwarmPeer::NewStub(impl->channels[r]);
  }
  SHOAL_RETURN_IF_ERROR(impl->mailbox->Register(options.group, n, options.rank));
  Impl* raw = impl.get();
  impl->worker = std::thread([raw] { raw->RunWorker(); });
  return std::unique_ptr<PeerGroup>(new PeerGroup(std::move(impl)));
}

PeerGroup::PeerGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

PeerGroup::~PeerGroup() {
  impl_->closing = true;
  {
    std::lock_guard<std::mutex> lock(impl_->queue_mu);
    impl_->stopping = true;
  }
  impl_->queue_cv.notify_all();
  impl_->worker.join();
  impl_->mailbox->Close(impl_->options.group, absl::OkStatus());
}

void PeerGroup::Abort(const absl::Status& why) {
  {
    std::lock_guard<std::mutex> lock(impl_->abort_mu);
    if (impl_->aborting.load()) return;
    impl_->aborted = why.ok() ? absl::AbortedError("aborted") : why;
    impl_->aborting = true;
  }
  impl_->queue_cv.notify_all();
}

int PeerGroup::rank() const { return impl_->rank; }
int PeerGroup::size() const { return impl_->size; }
std::string PeerGroup::name() const { return "peergroup"; }
const std::string& PeerGroup::group() const { return impl_->options.group; }

int64_t PeerGroup::bytes_sent() const { return impl_->bytes_sent.load(); }
const std::string& PeerGroup::address(int rank) const { return impl_->options.roster.at(rank); }

std::unique_ptr<Work> PeerGroup::AllReduce(at::Tensor& tensor, ReduceOp op,
                                           const CollectiveOptions& options) {
  const std::string context =
      absl::StrCat(impl_->Context("allreduce"), " [", internal::ReduceOpName(op), ", ",
                   tensor.defined() ? tensor.numel() : 0, " x ",
                   tensor.defined() ? c10::toString(tensor.scalar_type()) : "undefined", "]");
  if (absl::Status s = impl_->precheck.AllReduce(tensor, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  Impl* g = impl_.get();
  return g->Enqueue(context, v1::EXCHANGE_OP_ALL_REDUCE, options,
                    [g, tensor, op](OpRun& run) { return g->DoAllReduce(run, tensor, op); });
}

std::unique_ptr<Work> PeerGroup::ReduceScatter(at::Tensor& output, const at::Tensor& input,
                                               ReduceOp op, const CollectiveOptions& options) {
  const std::string context =
      absl::StrCat(impl_->Context("reduce_scatter"), " [", internal::ReduceOpName(op), ", ",
                   input.defined() ? input.numel() : 0, " x ",
                   input.defined() ? c10::toString(input.scalar_type()) : "undefined", "]");
  if (absl::Status s = impl_->precheck.ReduceScatter(output, input, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  Impl* g = impl_.get();
  return g->Enqueue(context, v1::EXCHANGE_OP_REDUCE_SCATTER, options,
                    [g, output, input, op](OpRun& run) {
                      return g->DoReduceScatter(run, output, input, op);
                    });
}

std::unique_ptr<Work> PeerGroup::AllGather(at::Tensor& output, const at::Tensor& input,
                                           const CollectiveOptions& options) {
  const std::string context =
      absl::StrCat(impl_->Context("allgather"), " [", input.defined() ? input.numel() : 0, " x ",
                   input.defined() ? c10::toString(input.scalar_type()) : "undefined",
                   " per rank]");
  if (absl::Status s = impl_->precheck.AllGather(output, input, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  Impl* g = impl_.get();
  return g->Enqueue(context, v1::EXCHANGE_OP_ALL_GATHER, options,
                    [g, output, input](OpRun& run) {
                      return g->DoAllGather(run, output, input);
                    });
}

std::unique_ptr<Work> PeerGroup::Broadcast(at::Tensor& tensor, int root,
                                           const CollectiveOptions& options) {
  const std::string context = absl::StrCat(
      impl_->Context("broadcast"), " [root ", root, ", ", tensor.defined() ? tensor.numel() : 0,
      " x ", tensor.defined() ? c10::toString(tensor.scalar_type()) : "undefined", "]");
  if (absl::Status s = impl_->precheck.Broadcast(tensor, root, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  Impl* g = impl_.get();
  return g->Enqueue(context, v1::EXCHANGE_OP_BROADCAST, options,
                    [g, tensor, root](OpRun& run) { return g->DoBroadcast(run, tensor, root); });
}

std::unique_ptr<Work> PeerGroup::Send(const at::Tensor& tensor, int dst, int tag,
                                      const CollectiveOptions&) {
  const std::string context = absl::StrCat(impl_->Context("send"), " [to rank ", dst, "]");
  if (absl::Status s = impl_->precheck.Send(tensor, dst, tag, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  return internal::DoneWork(absl::UnimplementedError(
      absl::StrCat(context, ": a peer group has collectives only (no point-to-point)")));
}

std::unique_ptr<Work> PeerGroup::Recv(at::Tensor& tensor, int src, int tag,
                                      const CollectiveOptions&) {
  const std::string context = absl::StrCat(impl_->Context("recv"), " [from rank ", src, "]");
  if (absl::Status s = impl_->precheck.Recv(tensor, src, tag, context); !s.ok()) {
    return internal::DoneWork(s);
  }
  return internal::DoneWork(absl::UnimplementedError(
      absl::StrCat(context, ": a peer group has collectives only (no point-to-point)")));
}

std::unique_ptr<Work> PeerGroup::Barrier(const CollectiveOptions& options) {
  const std::string context = impl_->Context("barrier");
  if (absl::Status s = impl_->precheck.Barrier(); !s.ok()) return internal::DoneWork(s);
  Impl* g = impl_.get();
  return g->Enqueue(context, v1::EXCHANGE_OP_BARRIER, options,
                    [g](OpRun& run) { return g->DoBarrier(run); });
}

// ---- ExchangeServer. ----

namespace {

class ExchangeOnlyService final : public v1::SwarmPeer::Service {
 public:
  ExchangeOnlyService(std::shared_ptr<ExchangeMailbox> mailbox, const std::string& token)
      : mailbox_(std::move(mailbox)), token_(token) {}

  grpc::Status Exchange(grpc::ServerContext* ctx, const v1::ExchangeFrame* frame,
                        v1::ExchangeAck* ack) override {
    if (grpc::Status auth = CheckBearer(*ctx, token_); !auth.ok()) return auth;
    return ToGrpc(mailbox_->Deliver(*frame, ack));
  }

 private:
  std::shared_ptr<ExchangeMailbox> mailbox_;
  const std::string token_;  // empty: no authentication
};

}  // namespace

struct ExchangeServer::Impl {
  std::unique_ptr<ExchangeOnlyService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::mutex mu;
  bool shut_down = false;  // guarded by mu
};

absl::StatusOr<std::unique_ptr<ExchangeServer>> ExchangeServer::Start(
    const ExchangeServerOptions& options, std::shared_ptr<ExchangeMailbox> mailbox) {
  if (mailbox == nullptr) return absl::InvalidArgumentError("exchange server: no mailbox");
  {
    std::string host;
    int port = 0;
    SHOAL_RETURN_IF_ERROR(
        SplitHostPort(options.listen, "the exchange server's listen address", 0, &host, &port));
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "exchange server: TLS needs both a certificate file and a key file");
  }
  if (!IsPrintableAscii(options.token)) {
    return absl::InvalidArgumentError("exchange server: the token must be printable ASCII");
  }
  SHOAL_ASSIGN_OR_RETURN(
      std::shared_ptr<grpc::ServerCredentials> credentials,
      ServerCredentials(options.tls_cert_file, options.tls_key_file, "exchange server"));
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<ExchangeOnlyService>(std::move(mailbox), options.token);
  grpc::ServerBuilder builder;
  // A busy port must be an error, not a port shared with another server.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(options.listen, credentials, &impl->port);
  builder.SetMaxReceiveMessageSize(kMaxExchangeMessageBytes);
  builder.SetMaxSendMessageSize(kMaxExchangeMessageBytes);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("exchange server: cannot listen on ",
                                               options.listen,
                                               " (address in use or not local?)"));
  }
  return std::unique_ptr<ExchangeServer>(new ExchangeServer(std::move(impl)));
}

ExchangeServer::ExchangeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExchangeServer::~ExchangeServer() { Shutdown(); }

int ExchangeServer::port() const { return impl_->port; }

void ExchangeServer::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
  }
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  impl_->server->Wait();
}

}  // namespace shoal::comm
