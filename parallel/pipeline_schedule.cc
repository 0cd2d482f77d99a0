#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace shoal::parallel {
namespace {

// Beyond this many Forward + Backward actions a schedule is a mistake (a typo in m), not a plan.
constexpr int64_t kMaxComputeActions = int64_t{1} << 24;

bool IsTransfer(ActionKind k) {
  return k == ActionKind::kSendActivation || k == ActionKind::kRecvActivation ||
         k == ActionKind::kSendGrad || k == ActionKind::kRecvGrad;
}

bool IsSend(ActionKind k) { return k == ActionKind::kSendActivation || k == ActionKind::kSendGrad; }

bool IsRecv(ActionKind k) { return k == ActionKind::kRecvActivation || k == ActionKind::kRecvGrad; }

// The model stage on the other end of a transfer made by model stage `j`: activations go to
// j + 1 and come from j - 1; gradients go to j - 1 and come from j + 1.
int OtherModelStage(ActionKind k, int j) {
  return (k == ActionKind::kSendActivation || k == ActionKind::kRecvGrad) ? j + 1 : j - 1;
}

// Identifies one transfer on both ranks: (is gradient, micro-batch, receiving model stage).
using TransferKey = std::tuple<bool, int, int>;

TransferKey KeyOf(const PipelineSchedule& s, int rank, const Action& a) {
  const int j = ModelStage(s, rank, a.chunk);
  const bool grad = a.kind == ActionKind::kSendGrad || a.kind == ActionKind::kRecvGrad;
  const int receiver = IsSend(a.kind) ? OtherModelStage(a.kind, j) : j;
  return {grad, a.micro_batch, receiver};
}

std::string Where(int rank, size_t index, const Action& a) {
  return absl::StrCat("rank ", rank, " action ", index, " (", ToString(a), ")");
}

// Checks what both Validate and Simulate need before they can index by micro-batch, chunk and
// model stage: the dimensions, every field in range, transfers only towards an existing
// neighbour and with the right peer.
absl::Status CheckShape(const PipelineSchedule& s) {
  if (s.stages < 1) return absl::InvalidArgumentError(absl::StrCat("stages ", s.stages, " < 1"));
  if (s.micro_batches < 1) {
    return absl::InvalidArgumentError(absl::StrCat("micro_batches ", s.micro_batches, " < 1"));
  }
  if (s.virtual_stages < 1) {
    return absl::InvalidArgumentError(absl::StrCat("virtual_stages ", s.virtual_stages, " < 1"));
  }
  if (2 * int64_t{s.stages} * s.micro_batches * s.virtual_stages > kMaxComputeActions) {
    return absl::InvalidArgumentError(absl::StrCat("stages ", s.stages, " x micro_batches ",
                                                   s.micro_batches, " x virtual_stages ",
                                                   s.virtual_stages, " is too large a schedule"));
  }
  if (static_cast<int64_t>(s.per_rank.size()) != s.stages) {
    return absl::InvalidArgumentError(
        absl::StrCat("per_rank has ", s.per_rank.size(), " entries for ", s.stages, " stages"));
  }
  const int last_stage = s.stages * s.virtual_stages - 1;
  for (int rank = 0; rank < s.stages; ++rank) {
    const std::vector<Action>& actions = s.per_rank[rank];
    for (size_t i = 0; i < actions.size(); ++i) {
      const Action& a = actions[i];
      const int k = static_cast<int>(a.kind);
      if (k < static_cast<int>(ActionKind::kForward) ||
          k > static_cast<int>(ActionKind::kOptimizerStep)) {
        return absl::InvalidArgumentError(
            absl::StrCat("rank ", rank, " action ", i, ": unknown kind ", k));
      }
      if (a.kind == ActionKind::kReduceGrads || a.kind == ActionKind::kOptimizerStep) continue;
      if (a.micro_batch < 0 || a.micro_batch >= s.micro_batches) {
        return absl::InvalidArgumentError(absl::StrCat(Where(rank, i, a), ": micro_batch ",
                                                       a.micro_batch, " outside [0, ",
                                                       s.micro_batches, ")"));
      }
      if (a.chunk < 0 || a.chunk >= s.virtual_stages) {
        return absl::InvalidArgumentError(absl::StrCat(Where(rank, i, a), ": chunk ", a.chunk,
                                                       " outside [0, ", s.virtual_stages, ")"));
      }
      if (!IsTransfer(a.kind)) continue;
      const int other = OtherModelStage(a.kind, ModelStage(s, rank, a.chunk));
      if (other < 0 || other > last_stage) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(rank, i, a), ": model stage ", ModelStage(s, rank, a.chunk),
                         " has no neighbour in that direction (model stages 0..", last_stage, ")"));
      }
      if (a.peer != other % s.stages) {
        return absl::InvalidArgumentError(absl::StrCat(Where(rank, i, a), ": peer ", a.peer,
                                                       ", but model stage ", other,
                                                       " lives on rank ", other % s.stages));
      }
    }
  }
  return absl::OkStatus();
}

// One Forward or Backward in a rank's compute order; Emit adds the transfers around it.
struct Compute {
  bool forward;
  int micro_batch;
  int chunk;
};

// Turns a rank's compute order into its action list: the input is received right before the
// computation that needs it and the output sent right after it, so a send never waits on
// anything but its own computation. The receiving rank blocks, the sender does not.
std::vector<Action> Emit(int stages, int virtual_stages, int rank,
                         const std::vector<Compute>& order) {
  const int last_stage = stages * virtual_stages - 1;
  std::vector<Action> out;
  out.reserve(order.size() * 3 + 2);
  for (const Compute& c : order) {
    const int j = c.chunk * stages + rank;
    const int prev_rank = (j - 1 + stages) % stages;
    const int next_rank = (j + 1) % stages;
    if (c.forward) {
      if (j > 0) out.push_back({ActionKind::kRecvActivation, c.micro_batch, c.chunk, prev_rank});
      out.push_back({ActionKind::kForward, c.micro_batch, c.chunk, -1});
      if (j < last_stage) {
        out.push_back({ActionKind::kSendActivation, c.micro_batch, c.chunk, next_rank});
      }
    } else {
      if (j < last_stage) out.push_back({ActionKind::kRecvGrad, c.micro_batch, c.chunk, next_rank});
      out.push_back({ActionKind::kBackward, c.micro_batch, c.chunk, -1});
      if (j > 0) out.push_back({ActionKind::kSendGrad, c.micro_batch, c.chunk, prev_rank});
    }
  }
  out.push_back({ActionKind::kReduceGrads, -1, 0, -1});
  out.push_back({ActionKind::kOptimizerStep, -1, 0, -1});
  return out;
}

std::vector<Compute> GPipeOrder(int micro_batches) {
  std::vector<Compute> order;
  for (int mb = 0; mb < micro_batches; ++mb) order.push_back({true, mb, 0});
  for (int mb = micro_batches - 1; mb >= 0; --mb) order.push_back({false, mb, 0});
  return order;
}

// Rank s first fills the pipeline below it (p - s - 1 forwards: the last rank none), then each
// forward is followed by the oldest pending backward, so at most p - s micro-batches are live.
std::vector<Compute> OneFOneBOrder(int stages, int micro_batches, int rank) {
  const int warmup = std::min(stages - rank - 1, micro_batches);
  std::vector<Compute> order;
  for (int mb = 0; mb < warmup; ++mb) order.push_back({true, mb, 0});
  for (int i = 0; i < micro_batches - warmup; ++i) {
    order.push_back({true, warmup + i, 0});
    order.push_back({false, i, 0});
  }
  for (int mb = micro_batches - warmup; mb < micro_batches; ++mb) order.push_back({false, mb, 0});
  return order;
}

// Megatron's interleaved order. The k-th forward of a rank (k = 0 .. m v - 1) works on a group
// of p consecutive micro-batches at a time and moves through the chunks: with p = 2, v = 2 the
// forwards are (mb 0, c0) (1, c0) (0, c1) (1, c1) (2, c0) (3, c0) (2, c1) ...; backwards go
// through the chunks in reverse. The warm-up is longer than 1F1B's: 2 (p - s - 1) forwards to
// cover the round trip to the last rank and back, plus (v - 1) p to reach the last chunk.
std::vector<Compute> InterleavedOrder(int stages, int micro_batches, int virtual_stages, int rank) {
  const int total = micro_batches * virtual_stages;
  const int group = stages * virtual_stages;
  auto nth = [&](int k, bool forward) {
    const int chunk_in_order = (k % group) / stages;
    const int chunk = forward ? chunk_in_order : virtual_stages - 1 - chunk_in_order;
    return Compute{forward, (k / group) * stages + k % stages, chunk};
  };
  const int warmup = std::min(2 * (stages - rank - 1) + (virtual_stages - 1) * stages, total);
  std::vector<Compute> order;
  for (int k = 0; k < warmup; ++k) order.push_back(nth(k, true));
  for (int i = 0; i < total - warmup; ++i) {
    order.push_back(nth(warmup + i, true));
    order.push_back(nth(i, false));
  }
  for (int k = total - warmup; k < total; ++k) order.push_back(nth(k, false));
  return order;
}

}  // namespace

absl::StatusOr<PipelineSchedule> MakeSchedule(ScheduleKind kind, int stages, int micro_batches,
                                              int virtual_stages) {
  if (kind != ScheduleKind::kGPipe && kind != ScheduleKind::k1F1B &&
      kind != ScheduleKind::kInterleaved1F1B) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown schedule kind ", static_cast<int>(kind)));
  }
  const std::string name = ToString(kind);
  if (stages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": stages must be >= 1, got ", stages));
  }
  if (micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": micro_batches must be >= 1, got ", micro_batches));
  }
  if (kind == ScheduleKind::kInterleaved1F1B) {
    if (stages < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": stages must be >= 2 to interleave, got ", stages));
    }
    if (virtual_stages < 2) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": virtual_stages must be >= 2, got ",
                                                     virtual_stages, " (use 1F1B for 1)"));
    }
    if (micro_batches % stages != 0) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": micro_batches (", micro_batches,
                                                     ") must be a multiple of stages (", stages,
                                                     ")"));
    }
  } else if (virtual_stages != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": virtual_stages must be 1, got ", virtual_stages));
  }
  if (2 * int64_t{stages} * micro_batches * virtual_stages > kMaxComputeActions) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": stages ", stages, " x micro_batches ",
                                                   micro_batches, " x virtual_stages ",
                                                   virtual_stages, " is too large a schedule"));
  }

  PipelineSchedule s;
  s.kind = kind;
  s.stages = stages;
  s.micro_batches = micro_batches;
  s.virtual_stages = virtual_stages;
  s.per_rank.reserve(stages);
  for (int rank = 0; rank < stages; ++rank) {
    std::vector<Compute> order;
    switch (kind) {
      case ScheduleKind::kGPipe:
        order = GPipeOrder(micro_batches);
        break;
      case ScheduleKind::k1F1B:
        order = OneFOneBOrder(stages, micro_batches, rank);
        break;
      case ScheduleKind::kInterleaved1F1B:
        order = InterleavedOrder(stages, micro_batches, virtual_stages, rank);
        break;
    }
    s.per_rank.push_back(Emit(stages, virtual_stages, rank, order));
  }
  return s;
}

int PeerChunk(const PipelineSchedule& s, int rank, const Action& action) {
  return OtherModelStage(action.kind, ModelStage(s, rank, action.chunk)) / s.stages;
}

absl::Status Validate(const PipelineSchedule& s) {
  SHOAL_RETURN_IF_ERROR(CheckShape(s));
  const int last_stage = s.stages * s.virtual_stages - 1;

  // Every transfer once on each side. Sends and recvs are collected by key with where they are.
  struct Ends {
    std::vector<std::pair<int, size_t>> sends, recvs;  // (rank, action index)
  };
  std::map<TransferKey, Ends> transfers;
  for (int rank = 0; rank < s.stages; ++rank) {
    for (size_t i = 0; i < s.per_rank[rank].size(); ++i) {
      const Action& a = s.per_rank[rank][i];
      if (!IsTransfer(a.kind)) continue;
      Ends& ends = transfers[KeyOf(s, rank, a)];
      (IsSend(a.kind) ? ends.sends : ends.recvs).push_back({rank, i});
    }
  }
  for (const auto& [key, ends] : transfers) {
    const auto& some = ends.sends.empty() ? ends.recvs.front() : ends.sends.front();
    const std::string where = Where(some.first, some.second, s.per_rank[some.first][some.second]);
    if (ends.sends.size() > 1 || ends.recvs.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": transfer appears ",
                                                     ends.sends.size(), " times as send and ",
                                                     ends.recvs.size(), " times as recv"));
    }
    if (ends.recvs.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": send without a matching recv"));
    }
    if (ends.sends.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": recv without a matching send"));
    }
  }

  // Per rank, the position of each kind of action for each (chunk, micro-batch).
  constexpr int kKinds = static_cast<int>(ActionKind::kOptimizerStep) + 1;
  const size_t cells = static_cast<size_t>(s.virtual_stages) * s.micro_batches;
  for (int rank = 0; rank < s.stages; ++rank) {
    const std::vector<Action>& actions = s.per_rank[rank];
    std::vector<std::vector<int64_t>> pos(kKinds, std::vector<int64_t>(cells, -1));
    int64_t reduce = -1, step = -1, last_backward = -1;
    for (size_t i = 0; i < actions.size(); ++i) {
      const Action& a = actions[i];
      if (a.kind == ActionKind::kReduceGrads || a.kind == ActionKind::kOptimizerStep) {
        int64_t& seen = a.kind == ActionKind::kReduceGrads ? reduce : step;
        if (seen >= 0) {
          return absl::InvalidArgumentError(absl::StrCat(Where(rank, i, a), ": repeated"));
        }
        seen = static_cast<int64_t>(i);
        continue;
      }
      int64_t& p = pos[static_cast<int>(a.kind)]
                      [static_cast<size_t>(a.chunk) * s.micro_batches + a.micro_batch];
      if (p >= 0) {
        return absl::InvalidArgumentError(absl::StrCat(Where(rank, i, a), ": repeats action ", p));
      }
      p = static_cast<int64_t>(i);
      if (a.kind == ActionKind::kBackward) last_backward = static_cast<int64_t>(i);
    }
    auto at = [&](ActionKind k, size_t cell) { return pos[static_cast<int>(k)][cell]; };
    for (int chunk = 0; chunk < s.virtual_stages; ++chunk) {
      const int j = ModelStage(s, rank, chunk);
      for (int mb = 0; mb < s.micro_batches; ++mb) {
        const size_t cell = static_cast<size_t>(chunk) * s.micro_batches + mb;
        const std::string what = absl::StrCat("rank ", rank, " chunk ", chunk, " micro-batch ", mb);
        const int64_t f = at(ActionKind::kForward, cell), b = at(ActionKind::kBackward, cell);
        if (f < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": no Forward"));
        if (b < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": no Backward"));
        if (b < f) {
          return absl::InvalidArgumentError(
              absl::StrCat(what, ": Backward (action ", b, ") before Forward (action ", f, ")"));
        }
        // The transfers this model stage needs, and on which side of its computation.
        struct Need {
          ActionKind kind;
          bool needed;
          int64_t compute;
          bool before;
        };
        const Need needs[] = {
            {ActionKind::kRecvActivation, j > 0, f, true},
            {ActionKind::kSendActivation, j < last_stage, f, false},
            {ActionKind::kRecvGrad, j < last_stage, b, true},
            {ActionKind::kSendGrad, j > 0, b, false},
        };
        for (const Need& n : needs) {
          const int64_t t = at(n.kind, cell);
          if (!n.needed) continue;  // CheckShape already rejected transfers with no neighbour
          if (t < 0) {
            return absl::InvalidArgumentError(absl::StrCat(what, ": no ", ToString(n.kind)));
          }
          if (n.before ? t > n.compute : t < n.compute) {
            return absl::InvalidArgumentError(absl::StrCat(
                what, ": ", ToString(n.kind), " (action ", t, ") ", n.before ? "after" : "before",
                " the computation it belongs to (action ", n.compute, ")"));
          }
        }
      }
    }
    if (reduce < 0) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": no ReduceGrads"));
    }
    if (reduce < last_backward) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": ReduceGrads (action ",
                                                     reduce, ") before the last Backward (action ",
                                                     last_backward, ")"));
    }
    if (step != static_cast<int64_t>(actions.size()) - 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank ", rank, ": OptimizerStep must be the last action (", actions.size(),
                       " actions, OptimizerStep at ", step, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ScheduleSimulation> Simulate(const PipelineSchedule& s, const StageCosts& costs) {
  SHOAL_RETURN_IF_ERROR(CheckShape(s));
  const size_t model_stages = static_cast<size_t>(s.stages) * s.virtual_stages;
  using Named = std::pair<const char*, const std::vector<double>*>;
  for (const auto& [name, v] :
       {Named{"forward", &costs.forward}, Named{"backward", &costs.backward}}) {
    if (v->size() != model_stages) {
      return absl::InvalidArgumentError(absl::StrCat("costs.", name, " has ", v->size(),
                                                     " entries, want one per model stage (",
                                                     model_stages, ")"));
    }
    for (size_t j = 0; j < v->size(); ++j) {
      if (!std::isfinite((*v)[j]) || (*v)[j] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("costs.", name, "[", j, "] = ", (*v)[j], " is not a finite cost >= 0"));
      }
    }
  }
  if (!std::isfinite(costs.p2p_latency) || costs.p2p_latency < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("costs.p2p_latency = ", costs.p2p_latency, " is not finite and >= 0"));
  }

  const int p = s.stages;
  std::vector<size_t> next(p, 0);
  std::vector<double> clock(p, 0.0);
  std::vector<int> live(p, 0);
  ScheduleSimulation sim;
  sim.busy.assign(p, 0.0);
  sim.peak_in_flight.assign(p, 0);
  // Send times not yet consumed, per transfer. A queue so that an unvalidated schedule with a
  // repeated transfer still simulates deterministically.
  std::map<TransferKey, std::deque<double>> sent;

  // Each rank runs until it blocks on a recv whose send has not happened; rounds repeat while
  // any rank moves. A rank's times depend only on its own clock and the send times it
  // consumes, which are final once recorded, so the order of the sweep does not change them.
  bool moved = true;
  while (moved) {
    moved = false;
    for (int rank = 0; rank < p; ++rank) {
      const std::vector<Action>& actions = s.per_rank[rank];
      while (next[rank] < actions.size()) {
        const Action& a = actions[next[rank]];
        const int j = ModelStage(s, rank, a.chunk);  // the cost index of Forward / Backward
        if (IsRecv(a.kind)) {
          auto it = sent.find(KeyOf(s, rank, a));
          if (it == sent.end() || it->second.empty()) break;
          clock[rank] = std::max(clock[rank], it->second.front() + costs.p2p_latency);
          it->second.pop_front();
        } else if (IsSend(a.kind)) {
          sent[KeyOf(s, rank, a)].push_back(clock[rank]);
        } else if (a.kind == ActionKind::kForward) {
          clock[rank] += costs.forward[j];
          sim.busy[rank] += costs.forward[j];
          sim.peak_in_flight[rank] = std::max(sim.peak_in_flight[rank], ++live[rank]);
        } else if (a.kind == ActionKind::kBackward) {
          clock[rank] += costs.backward[j];
          sim.busy[rank] += costs.backward[j];
          --live[rank];
        }
        ++next[rank];
        moved = true;
      }
    }
  }

  std::vector<std::string> stuck;
  for (int rank = 0; rank < p; ++rank) {
    if (next[rank] < s.per_rank[rank].size()) {
      stuck.push_back(
          absl::StrCat(Where(rank, next[rank], s.per_rank[rank][next[rank]]), " waits"));
    }
  }
  if (!stuck.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("pipeline deadlock: ", absl::StrJoin(stuck, "; ")));
  }
  double total_busy = 0.0;
  for (int rank = 0; rank < p; ++rank) {
    sim.makespan = std::max(sim.makespan, clock[rank]);
    total_busy += sim.busy[rank];
  }
  // Idle time over capacity, rather than 1 - busy / capacity: the subtraction of two large,
  // nearly equal times is exact when they are, and a small bubble keeps its relative precision.
  const double capacity = p * sim.makespan;
  sim.bubble_fraction = capacity > 0 ? (capacity - total_busy) / capacity : 0.0;
  return sim;
}

double BubbleFraction1F1B(int stages, int micro_batches) {
  return static_cast<double>(stages - 1) / (micro_batches + stages - 1);
}

int PeakInFlightBound(ScheduleKind kind, int stages, int micro_batches, int rank,
                      int virtual_stages) {
  switch (kind) {
    case ScheduleKind::kGPipe:
      return micro_batches;
    case ScheduleKind::k1F1B:
      return std::min(stages - rank, micro_batches);
    case ScheduleKind::kInterleaved1F1B:
      return std::min(2 * (stages - rank - 1) + (virtual_stages - 1) * stages + 1,
                      micro_batches * virtual_stages);
  }
  return micro_batches * virtual_stages;
}

std::string ToString(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kGPipe:
      return "GPipe";
    case ScheduleKind::k1F1B:
      return "1F1B";
    case ScheduleKind::kInterleaved1F1B:
      return "interleaved 1F1B";
  }
  return absl::StrCat("ScheduleKind(", static_cast<int>(kind), ")");
}

std::string ToString(ActionKind kind) {
  switch (kind) {
    case ActionKind::kForward:
      return "Forward";
    case ActionKind::kBackward:
      return "Backward";
    case ActionKind::kSendActivation:
      return "SendActivation";
    case ActionKind::kRecvActivation:
      return "RecvActivation";
    case ActionKind::kSendGrad:
      return "SendGrad";
    case ActionKind::kRecvGrad:
      return "RecvGrad";
    case ActionKind::kReduceGrads:
      return "ReduceGrads";
    case ActionKind::kOptimizerStep:
      return "OptimizerStep";
  }
  return absl::StrCat("ActionKind(", static_cast<int>(kind), ")");
}

std::string ToString(const Action& a) {
  const char* prefix = "";
  switch (a.kind) {
    case ActionKind::kReduceGrads:
      return "Reduce";
    case ActionKind::kOptimizerStep:
      return "Step";
    case ActionKind::kForward:
      prefix = "F";
      break;
    case ActionKind::kBackward:
      prefix = "B";
      break;
    case ActionKind::kSendActivation:
      prefix = "SA";
      break;
    case ActionKind::kRecvActivation:
      prefix = "RA";
      break;
    case ActionKind::kSendGrad:
      prefix = "SG";
      break;
    case ActionKind::kRecvGrad:
      prefix = "RG";
      break;
    default:
      return ToString(a.kind);
  }
  std::string out = absl::StrCat(prefix, a.micro_batch);
  if (a.chunk != 0) absl::StrAppend(&out, ".c", a.chunk);
  if (IsSend(a.kind)) absl::StrAppend(&out, ">", a.peer);
  if (IsRecv(a.kind)) absl::StrAppend(&out, "<", a.peer);
  return out;
}

std::string ToString(const PipelineSchedule& s) {
  std::string out = absl::StrCat(ToString(s.kind), ": stages ", s.stages, ", micro_batches ",
                                 s.micro_batches, ", virtual_stages ", s.virtual_stages, "\n");
  for (size_t rank = 0; rank < s.per_rank.size(); ++rank) {
    absl::StrAppend(&out, "rank ", rank, ":");
    for (const Action& a : s.per_rank[rank]) absl::StrAppend(&out, " ", ToString(a));
    absl::StrAppend(&out, "\n");
  }
  return out;
}

}  // namespace shoal::parallel
