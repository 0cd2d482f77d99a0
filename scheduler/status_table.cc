#include "scheduler/status_table.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace shoal::scheduler {
namespace {

// 1536 -> "1.5K", 3.2e9 -> "3.0G": binary units, as `free -h` prints them.
std::string Bytes(int64_t b) {
  if (b <= 0) return "0";
  const char* units[] = {"B", "K", "M", "G", "T", "P"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrCat(b, "B") : absl::StrFormat("%.1f%s", v, units[u]);
}

// Integers with thousands separators, which is how people read throughput.
std::string Grouped(double v) {
  const int64_t n = static_cast<int64_t>(v + 0.5);
  std::string digits = absl::StrCat(n < 0 ? -n : n);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string Duration(int64_t ms) {
  const int64_t s = std::max<int64_t>(0, ms / 1000);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
}

const char* StateName(v1::WorkerState s) {
  switch (s) {
    case v1::WORKER_STATE_ALIVE: return "ALIVE";
    case v1::WORKER_STATE_DRAINING: return "DRAINING";
    case v1::WORKER_STATE_DEAD: return "DEAD";
    case v1::WORKER_STATE_LEFT: return "LEFT";
    default: return "?";
  }
}

std::string Clip(const std::string& s, size_t n) {
  return s.size() <= n ? s : s.substr(0, n - 1) + "~";
}

}  // namespace

// Appends `rows` with every column as wide as its widest cell.
void AppendTable(const std::vector<std::vector<std::string>>& rows, std::string* out) {
  if (rows.empty()) return;
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], r[c].size());
    }
  }
  for (const auto& r : rows) {
    std::string line;
    for (size_t c = 0; c < r.size(); ++c) {
      line += r[c];
      if (c + 1 < r.size()) line += std::string(width[c] - r[c].size() + 2, ' ');
    }
    *out += line + "\n";
  }
}

std::string FormatStatusTable(const v1::ClusterStatus& status) {
  std::string out;
  const v1::Layout& layout = status.layout();
  const v1::JobStatus& js = status.job_status();
  int alive = 0, draining = 0, dead = 0, left = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    alive += w.state() == v1::WORKER_STATE_ALIVE;
    draining += w.state() == v1::WORKER_STATE_DRAINING;
    dead += w.state() == v1::WORKER_STATE_DEAD;
    left += w.state() == v1::WORKER_STATE_LEFT;
  }
  absl::StrAppend(&out, "coordinator ", status.coordinator_version(), "  health: ",
                  status.health().empty() ? "?" : status.health(), "  up ",
                  Duration(status.now_unix_ms() - status.started_unix_ms()), "  workers: ", alive,
                  " alive");
  if (draining > 0) absl::StrAppend(&out, ", ", draining, " draining");
  if (dead > 0) absl::StrAppend(&out, ", ", dead, " dead");
  if (left > 0) absl::StrAppend(&out, ", ", left, " left");
  if (status.job().expected_workers() > 0) {
    absl::StrAppend(&out, " (expects ", status.job().expected_workers(), ")");
  }
  out += "\n";
  absl::StrAppend(&out, "job ", status.job().name().empty() ? "-" : status.job().name(),
                  ": step ", js.step(), "  loss ", absl::StrFormat("%.4f", js.loss()),
                  "  tokens/s ", Grouped(js.tokens_per_s()), "\n");
  if (status.has_swarm()) {
    const v1::SwarmRoster& r = status.swarm();
    const v1::SwarmCounters& c = r.counters();
    absl::StrAppend(&out, "swarm: ", r.stages_size(), " stages, ", r.micro_batches(),
                    " micro-batches a step; ",
                    r.finished() ? absl::StrCat("finished (", r.total_steps(), " steps)")
                    : r.step_open() ? absl::StrCat("step ", r.open_step(), " of ", r.total_steps(),
                                                   " open")
                                    : absl::StrCat("waiting: ", r.waiting()),
                    r.job() > 1 ? absl::StrCat(" (job ", r.job(), " of this coordinator)") : "",
                    "\n");
    if (!r.rollback().empty()) absl::StrAppend(&out, "rollback needed: ", r.rollback(), "\n");
    absl::StrAppend(&out, "  joins ", c.joins(), "  leaves ", c.leaves(), "  deaths ", c.deaths(),
                    "  fences ", c.fences(), "  replays ", c.replays(), "  duplicates ",
                    c.duplicates(), "  lost ", c.lost(), "  drifts ", c.drifts(), "  evictions ",
                    c.evictions(), "  moves ", c.moves(), "  trainers ", r.trainers_size(), "\n");
    std::vector<std::vector<std::string>> rows;
    rows.push_back({"STAGE", "LAYERS", "PHASE", "PEER", "STATE", "ADDRESS", "HELD", "TPUT"});
    for (const v1::SwarmStageEntry& st : r.stages()) {
      const std::string layers = absl::StrCat(st.first_layer(), "-", st.end_layer());
      const std::string phase =
          st.phase().empty() ? "-" : absl::StrCat(st.phase(), st.missing() > 0
                                                      ? absl::StrCat(" (", st.missing(),
                                                                     " missing)")
                                                      : "");
      if (st.peers().empty()) {
        rows.push_back({absl::StrCat(st.index()), layers, phase, "(none)", "-", "-", "-", "-"});
      }
      for (const v1::SwarmPeerEntry& p : st.peers()) {
        const std::string state =
            p.state() == "DRAINING" && p.moving_to() >= 0
                ? absl::StrCat("MOVING->", p.moving_to())
                : p.state();
        rows.push_back({absl::StrCat(st.index()), layers, phase, Clip(p.id(), 24), state,
                        p.address(), absl::StrCat(p.accumulated()),
                        absl::StrFormat("%.1f", p.throughput())});
      }
    }
    AppendTable(rows, &out);
  } else if (layout.version() == 0) {
    out += "layout: none yet\n";
  } else {
    absl::StrAppend(&out, "layout v", layout.version(), ": tp=", layout.tp(), " pp=", layout.pp(),
                    " dp=", layout.dp(), " micro-batch ", layout.micro_batch_size(),
                    absl::StrFormat("  predicted %.3f s/step, %s tokens/s",
                                    layout.predicted_step_s(),
                                    Grouped(layout.predicted_tokens_per_s())),
                    "\n");
  }
  if (!status.layout_error().empty()) {
    absl::StrAppend(&out, "layout error: ", status.layout_error(), "\n");
  }

  // Rows first, then every column as wide as its widest cell.
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"WORKER", "HOST", "DEVICE", "ROLE", "LAYERS", "TOK/S", "GPU", "HOST_MEM",
                  "DISK", "HB_AGO", "STATE"});
  for (const v1::WorkerStatus& w : status.workers()) {
    const v1::Assignment& a = w.assignment();
    std::string role = "standby";
    std::string layers = "-";
    if (status.has_swarm() && (w.state() == v1::WORKER_STATE_ALIVE ||
                               w.state() == v1::WORKER_STATE_DRAINING)) {
      role = a.placed() ? absl::StrCat("peer/s", a.stage()) : "trainer";
      if (a.placed()) layers = absl::StrCat(a.first_layer(), "-", a.end_layer());
    } else if (w.state() == v1::WORKER_STATE_DRAINING || a.drain()) {
      role = "draining";
    } else if (w.state() == v1::WORKER_STATE_DEAD || w.state() == v1::WORKER_STATE_LEFT) {
      role = "-";
    } else if (a.placed()) {
      role = absl::StrCat("r", a.replica(), "/s", a.stage(), "/t", a.tp_rank());
      layers = absl::StrCat(a.first_layer(), "-", a.end_layer());
      if (a.has_embedding()) layers = "E" + layers;
      if (a.has_head()) layers += "H";
    }
    const v1::MemoryTiers& m = w.last_stats().memory_used();
    const double ago_s = (status.now_unix_ms() - w.last_heartbeat_unix_ms()) / 1000.0;
    rows.push_back({Clip(w.worker_id(), 24), Clip(w.device().host(), 20),
                    Clip(w.device().device_name(), 28), role, layers,
                    Grouped(w.last_stats().tokens_per_s()), Bytes(m.gpu_bytes()),
                    Bytes(m.host_bytes()), Bytes(m.disk_bytes()),
                    absl::StrFormat("%.1f", std::max(0.0, ago_s)), StateName(w.state())});
  }
  AppendTable(rows, &out);
  if (status.workers().empty()) out += "(no workers have joined)\n";
  return out;
}

}  // namespace shoal::scheduler
