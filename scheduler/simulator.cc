#include "scheduler/simulator.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "scheduler/clock.h"
#include "scheduler/coordinator_core.h"
#include "scheduler/splitmix.h"
#include "scheduler/validate.h"

namespace shoal::scheduler {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// One kind of machine in the synthetic mix. Rates are what a GEMM benchmark measures (below the
// datasheet peaks); memory and bandwidth per device.
struct MachineKind {
  const char* name;
  v1::DeviceKind kind;
  int devices_per_host;
  double fp32_gflops;
  double bf16_gflops;  // 0: no bf16 GEMM (V100, plain CPUs)
  double gpu_gib;
  double host_gib;  // per device: the host's RAM divided among its devices
  double disk_gib;  // per device, likewise
  double h2d_gbps;
  double host_copy_gbps;
  double net_gbps;  // GB/s to the rest of the cluster
  int cores;        // CPU cores per worker
  double weight;    // share of hosts of this kind
};

// An H100 SXM node (400 Gb/s InfiniBand per GPU), an A100 node, an older V100 node with 4 GPUs
// and 100 Gb/s, and CPU-only hosts on 25 Gb/s Ethernet where the worker uses the whole host.
constexpr MachineKind kKinds[] = {
    {"NVIDIA H100 80GB HBM3", v1::DEVICE_KIND_CUDA, 8, 51000, 750000, 80, 240, 3500 / 8.0, 50, 20,
     50, 16, 0.25},
    {"NVIDIA A100-SXM4-80GB", v1::DEVICE_KIND_CUDA, 8, 19000, 270000, 80, 120, 1900 / 8.0, 25, 16,
     25, 12, 0.35},
    {"Tesla V100-SXM2-32GB", v1::DEVICE_KIND_CUDA, 4, 14000, 0, 32, 90, 1000 / 4.0, 12, 12, 12.5,
     10, 0.2},
    {"AMD EPYC 7763 64-Core Processor (64 cores)", v1::DEVICE_KIND_CPU, 1, 2500, 0, 0, 480, 1800, 0,
     18, 3.1, 64, 0.2},
};

const MachineKind& PickKind(SplitMix& rng) {
  double total = 0;
  for (const MachineKind& k : kKinds) total += k.weight;
  double u = rng.Uniform() * total;
  for (const MachineKind& k : kKinds) {
    if (u < k.weight) return k;
    u -= k.weight;
  }
  return kKinds[0];
}

}  // namespace

std::vector<SolverDevice> SyntheticCluster(int n, uint64_t seed) {
  std::vector<SolverDevice> devices;
  if (n <= 0) return devices;
  devices.reserve(n);
  SplitMix rng(seed ^
               0x73686F616C636C75ull);  // "shoalclu": keeps seed 0 away from the trivial state
  int host_index = 0;
  while (static_cast<int>(devices.size()) < n) {
    const MachineKind& kind = PickKind(rng);
    const std::string host = absl::StrFormat("host-%05d", host_index++);
    for (int d = 0; d < kind.devices_per_host && static_cast<int>(devices.size()) < n; ++d) {
      // Devices of one model differ by a few percent (clocks, cooling, memory left by others).
      const double jitter = 0.92 + 0.16 * rng.Uniform();
      SolverDevice device;
      device.id = absl::StrFormat("dev-%05d", static_cast<int>(devices.size()));
      v1::DeviceProfile& p = device.profile;
      p.set_host(host);
      p.set_kind(kind.kind);
      p.set_device_name(kind.name);
      p.mutable_memory()->set_gpu_bytes(static_cast<int64_t>(kind.gpu_gib * kGiB * 0.95));
      p.mutable_memory()->set_host_bytes(static_cast<int64_t>(kind.host_gib * kGiB));
      p.mutable_memory()->set_disk_bytes(static_cast<int64_t>(kind.disk_gib * kGiB));
      p.set_fp32_gflops(kind.fp32_gflops * jitter);
      p.set_bf16_gflops(kind.bf16_gflops * jitter);
      p.set_h2d_gbps(kind.h2d_gbps);
      p.set_d2h_gbps(kind.h2d_gbps);
      p.set_host_copy_gbps(kind.host_copy_gbps);
      p.set_net_gbps(kind.net_gbps * (0.9 + 0.1 * rng.Uniform()));
      p.set_rtt_ms(0.05 + 0.5 * rng.Uniform());
      p.set_shoal_version("0.1.0");
      p.set_cores(kind.cores);
      p.set_throttle(1.0);
      devices.push_back(std::move(device));
    }
  }
  return devices;
}

// ---------------------------------------------------------------------------------------------
// The devices file.

namespace {

const char* TomlTypeName(toml::node_type type) {
  switch (type) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    default:
      return "a date or time";
  }
}

// " in swarm.toml (line 7)".
std::string Where(const std::string& source, const toml::node& node) {
  if (node.source().begin.line == 0) return absl::StrCat(" in ", source);
  return absl::StrCat(" in ", source, " (line ", node.source().begin.line, ")");
}

// Reads the keys of one table, each checked for type and range; Finish() refuses the keys no
// one asked for (a typo must not silently become a default).
class TableReader {
 public:
  TableReader(const toml::table& table, std::string prefix, const std::string& source)
      : table_(table), prefix_(std::move(prefix)), source_(source) {}

  absl::Status Int(const char* key, int64_t lo, int64_t hi, bool required, int* out) {
    const toml::node* node = Get(key);
    if (node == nullptr) return Missing(key, required);
    if (!node->is_integer()) return WrongType(key, *node, "an integer");
    const int64_t v = node->as_integer()->get();
    if (v < lo || v > hi) {
      return Bad(key, *node, absl::StrCat("must be in [", lo, ", ", hi, "], got ", v));
    }
    *out = static_cast<int>(v);
    return absl::OkStatus();
  }

  // An integer is accepted where a number is expected ("net_gbps = 25").
  absl::Status Number(const char* key, double lo, double hi, bool lo_open, bool required,
                      double* out) {
    const toml::node* node = Get(key);
    if (node == nullptr) return Missing(key, required);
    double v;
    if (node->is_integer()) {
      v = static_cast<double>(node->as_integer()->get());
    } else if (node->is_floating_point()) {
      v = node->as_floating_point()->get();
    } else {
      return WrongType(key, *node, "a number");
    }
    if (!std::isfinite(v) || v < lo || v > hi || (lo_open && v == lo)) {
      return Bad(key, *node,
                 absl::StrCat("must be in ", lo_open ? "(" : "[", lo, ", ", hi, "], got ", v));
    }
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Bool(const char* key, bool* out) {
    const toml::node* node = Get(key);
    if (node == nullptr) return absl::OkStatus();
    if (!node->is_boolean()) return WrongType(key, *node, "true or false");
    *out = node->as_boolean()->get();
    return absl::OkStatus();
  }

  absl::Status String(const char* key, bool required, std::string* out) {
    const toml::node* node = Get(key);
    if (node == nullptr) return Missing(key, required);
    if (!node->is_string()) return WrongType(key, *node, "a string");
    const std::string v = node->as_string()->get();
    if (v.empty() || v.size() > 128) {
      return Bad(key, *node, absl::StrCat("must be 1 to 128 bytes, got ", v.size()));
    }
    for (unsigned char c : v) {
      if (c < 0x20 || c == 0x7f) return Bad(key, *node, "must not contain control characters");
    }
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Finish() const {
    for (auto&& [key, node] : table_) {
      const std::string k(key.str());
      if (known_.count(k) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown key ", prefix_, k, Where(source_, node)));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Bad(const char* key, const toml::node& node, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(prefix_, key, " ", what, Where(source_, node)));
  }

 private:
  const toml::node* Get(const char* key) {
    known_.insert(key);
    return table_.get(key);
  }
  absl::Status Missing(const char* key, bool required) const {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(prefix_, key, " is required", Where(source_, table_)));
  }
  absl::Status WrongType(const char* key, const toml::node& node, const char* want) const {
    return Bad(key, node, absl::StrCat("must be ", want, " (got ", TomlTypeName(node.type()), ")"));
  }

  const toml::table& table_;
  std::string prefix_;
  const std::string& source_;
  std::set<std::string> known_;
};

constexpr double kMaxGib = 1 << 20;  // 1 PiB per tier, as the coordinator's limits

absl::Status ReadJob(const toml::table* table, const std::string& source, v1::JobSpec* job) {
  // Defaults: GPT-2 small in fp32 with AdamW, 512 sequences per step.
  job->set_name("gpt2-small");
  v1::ModelSpec* m = job->mutable_model();
  m->set_n_layer(12);
  m->set_n_head(12);
  m->set_n_embd(768);
  m->set_block_size(1024);
  m->set_vocab_size(50257);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job->set_global_batch(512);
  if (table == nullptr) return absl::OkStatus();
  TableReader r(*table, "job.", source);
  std::string name = job->name();
  int n_layer = m->n_layer(), n_head = m->n_head(), n_embd = m->n_embd();
  int block = m->block_size(), vocab = m->vocab_size(), batch = job->global_batch();
  int max_tp = 0, max_pp = 0, max_mbs = 0;
  double pb = 4, gb = 4, ob = 8;
  SHOAL_RETURN_IF_ERROR(r.String("name", false, &name));
  SHOAL_RETURN_IF_ERROR(r.Int("n_layer", 1, 100000, false, &n_layer));
  SHOAL_RETURN_IF_ERROR(r.Int("n_head", 1, 1 << 16, false, &n_head));
  SHOAL_RETURN_IF_ERROR(r.Int("n_embd", 1, 1 << 20, false, &n_embd));
  SHOAL_RETURN_IF_ERROR(r.Int("block_size", 1, 1 << 24, false, &block));
  SHOAL_RETURN_IF_ERROR(r.Int("vocab_size", 1, 1 << 24, false, &vocab));
  SHOAL_RETURN_IF_ERROR(r.Int("global_batch", 1, 1 << 24, false, &batch));
  SHOAL_RETURN_IF_ERROR(r.Number("param_bytes", 0, 64, true, false, &pb));
  SHOAL_RETURN_IF_ERROR(r.Number("grad_bytes", 0, 64, false, false, &gb));
  SHOAL_RETURN_IF_ERROR(r.Number("optimizer_bytes", 0, 64, false, false, &ob));
  SHOAL_RETURN_IF_ERROR(r.Int("max_tp", 0, 1 << 16, false, &max_tp));
  SHOAL_RETURN_IF_ERROR(r.Int("max_pp", 0, 100000, false, &max_pp));
  SHOAL_RETURN_IF_ERROR(r.Int("max_micro_batch", 0, 1 << 24, false, &max_mbs));
  SHOAL_RETURN_IF_ERROR(r.Finish());
  if (n_embd % n_head != 0) {
    return absl::InvalidArgumentError(absl::StrCat("job.n_embd (", n_embd,
                                                   ") must be a multiple of job.n_head (", n_head,
                                                   ")", Where(source, *table)));
  }
  job->set_name(name);
  m->set_n_layer(n_layer);
  m->set_n_head(n_head);
  m->set_n_embd(n_embd);
  m->set_block_size(block);
  m->set_vocab_size(vocab);
  m->set_param_bytes(pb);
  m->set_grad_bytes(gb);
  m->set_optimizer_bytes(ob);
  job->set_global_batch(batch);
  job->set_max_tp(max_tp);
  job->set_max_pp(max_pp);
  job->set_max_micro_batch(max_mbs);
  return absl::OkStatus();
}

absl::Status ReadSettings(const toml::table* table, const std::string& source,
                          SimulationSettings* s) {
  if (table == nullptr) return absl::OkStatus();
  TableReader r(*table, "simulation.", source);
  SHOAL_RETURN_IF_ERROR(r.Number("lease_s", 0.01, 86400, false, false, &s->lease_s));
  SHOAL_RETURN_IF_ERROR(r.Number("heartbeat_s", 0.01, 86400, false, false, &s->heartbeat_s));
  SHOAL_RETURN_IF_ERROR(r.Number("replace_after_s", 0, 1e7, false, false, &s->replace_after_s));
  SHOAL_RETURN_IF_ERROR(r.Number("restart_s", 0, 1e6, false, false, &s->restart_s));
  SHOAL_RETURN_IF_ERROR(r.Number("round_s", 0, 3600, false, false, &s->round_s));
  SHOAL_RETURN_IF_ERROR(r.Number("relayout_gain", 0, 10, false, false, &s->relayout_gain));
  SHOAL_RETURN_IF_ERROR(r.Number("report_every_s", 1, 1e7, false, false, &s->report_every_s));
  SHOAL_RETURN_IF_ERROR(r.Number("max_hours", 0, 1e5, true, false, &s->max_hours));
  SHOAL_RETURN_IF_ERROR(r.Finish());
  if (s->heartbeat_s >= s->lease_s) {
    return absl::InvalidArgumentError(absl::StrCat("simulation.heartbeat_s (", s->heartbeat_s,
                                                   ") must be shorter than simulation.lease_s (",
                                                   s->lease_s, ")", Where(source, *table)));
  }
  return absl::OkStatus();
}

absl::Status ReadGroup(const toml::table& table, int index, const std::string& source,
                       DeviceGroupSpec* g) {
  TableReader r(table, absl::StrCat("group[", index, "]."), source);
  std::string kind = "";
  SHOAL_RETURN_IF_ERROR(r.String("name", true, &g->name));
  for (char c : g->name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return r.Bad(
          "name", *table.get("name"),
          absl::StrCat("must use letters, digits, '-', '_' or '.', got \"", g->name, "\""));
    }
  }
  SHOAL_RETURN_IF_ERROR(r.Int("count", 1, 1 << 20, true, &g->count));
  SHOAL_RETURN_IF_ERROR(r.Int("devices_per_host", 1, 1024, false, &g->devices_per_host));
  SHOAL_RETURN_IF_ERROR(r.String("kind", true, &kind));
  v1::DeviceProfile& p = g->profile;
  if (kind == "cuda") {
    p.set_kind(v1::DEVICE_KIND_CUDA);
  } else if (kind == "cpu") {
    p.set_kind(v1::DEVICE_KIND_CPU);
  } else {
    return r.Bad("kind", *table.get("kind"),
                 absl::StrCat("must be \"cuda\" or \"cpu\", got \"", kind, "\""));
  }
  const bool cuda = p.kind() == v1::DEVICE_KIND_CUDA;
  std::string device_name = g->name;
  double fp32 = 0, bf16 = 0, gpu = 0, host = 0, disk = 0, net = 0;
  double h2d = cuda ? 12 : 0, copy = 10;
  int cores = 8;
  SHOAL_RETURN_IF_ERROR(r.String("device_name", false, &device_name));
  SHOAL_RETURN_IF_ERROR(r.Number("fp32_gflops", 0, 1e7, true, true, &fp32));
  SHOAL_RETURN_IF_ERROR(r.Number("bf16_gflops", 0, 1e7, false, false, &bf16));
  SHOAL_RETURN_IF_ERROR(r.Number("gpu_memory_gib", 0, kMaxGib, false, cuda, &gpu));
  SHOAL_RETURN_IF_ERROR(r.Number("host_memory_gib", 0, kMaxGib, false, true, &host));
  SHOAL_RETURN_IF_ERROR(r.Number("disk_gib", 0, kMaxGib, false, false, &disk));
  SHOAL_RETURN_IF_ERROR(r.Number("net_gbps", 0, 1e4, false, false, &net));
  SHOAL_RETURN_IF_ERROR(r.Number("h2d_gbps", 0, 1e4, false, false, &h2d));
  SHOAL_RETURN_IF_ERROR(r.Number("host_copy_gbps", 0, 1e4, false, false, &copy));
  SHOAL_RETURN_IF_ERROR(r.Int("cores", 1, 1 << 16, false, &cores));
  SHOAL_RETURN_IF_ERROR(r.Bool("preemptible", &g->preemptible));
  SHOAL_RETURN_IF_ERROR(r.Number("slow_after_s", 0, 1e9, false, false, &g->slow_after_s));
  SHOAL_RETURN_IF_ERROR(r.Number("slow_factor", 1, 1e6, false, false, &g->slow_factor));
  SHOAL_RETURN_IF_ERROR(r.Finish());
  if ((g->slow_after_s >= 0) != (g->slow_factor != 1)) {
    return r.Bad(g->slow_after_s >= 0 ? "slow_after_s" : "slow_factor",
                 *table.get(g->slow_after_s >= 0 ? "slow_after_s" : "slow_factor"),
                 "a straggler needs both slow_after_s and slow_factor (> 1)");
  }
  if (!cuda && gpu > 0) {
    return r.Bad("gpu_memory_gib", *table.get("gpu_memory_gib"),
                 absl::StrCat("must be 0 for kind \"cpu\", got ", gpu));
  }
  if (cuda && gpu <= 0) {
    return r.Bad("gpu_memory_gib", *table.get("gpu_memory_gib"),
                 absl::StrCat("must be > 0 for kind \"cuda\", got ", gpu));
  }
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  p.set_device_name(device_name);
  p.set_fp32_gflops(fp32);
  p.set_bf16_gflops(bf16);
  p.mutable_memory()->set_gpu_bytes(static_cast<int64_t>(gpu * kGiB));
  p.mutable_memory()->set_host_bytes(static_cast<int64_t>(host * kGiB));
  p.mutable_memory()->set_disk_bytes(static_cast<int64_t>(disk * kGiB));
  p.set_net_gbps(net);
  p.set_h2d_gbps(h2d);
  p.set_d2h_gbps(h2d);
  p.set_host_copy_gbps(copy);
  p.set_rtt_ms(0.5);
  p.set_cores(cores);
  p.set_throttle(1.0);
  p.set_shoal_version("simulated");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ClusterSpec> ParseClusterToml(const std::string& text, const std::string& source) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    const toml::source_position& pos = e.source().begin;
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", pos.line, ":", pos.column,
                     ": TOML syntax error: ", std::string(e.description())));
  }
  ClusterSpec spec;
  spec.source = source;
  for (auto&& [key, node] : root) {
    const std::string k(key.str());
    if (k == "job" || k == "simulation") {
      if (!node.is_table()) {
        return absl::InvalidArgumentError(
            absl::StrCat(k, " must be a table ([", k, "])", Where(source, node)));
      }
    } else if (k == "group") {
      if (!node.is_array_of_tables()) {
        return absl::InvalidArgumentError(
            absl::StrCat("group must be an array of tables ([[group]])", Where(source, node)));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown key ", k, " (expected [job], [simulation] and [[group]])", Where(source, node)));
    }
  }
  SHOAL_RETURN_IF_ERROR(ReadJob(root["job"].as_table(), source, &spec.job));
  SHOAL_RETURN_IF_ERROR(ReadSettings(root["simulation"].as_table(), source, &spec.settings));
  const toml::array* groups = root["group"].as_array();
  if (groups == nullptr || groups->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("group: at least one [[group]] of devices is required in ", source));
  }
  std::set<std::string> names;
  int64_t total = 0;
  for (size_t i = 0; i < groups->size(); ++i) {
    DeviceGroupSpec g;
    const toml::table& t = *groups->get(i)->as_table();
    SHOAL_RETURN_IF_ERROR(ReadGroup(t, static_cast<int>(i), source, &g));
    if (!names.insert(g.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group[", i, "].name \"", g.name, "\" is used by an earlier group", Where(source, t)));
    }
    // The profile must pass the coordinator's own checks, which the simulated Join runs too.
    v1::DeviceProfile probe = g.profile;
    probe.set_host(absl::StrCat(g.name, "-h0"));
    const absl::Status valid = ValidateDeviceProfile(probe);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("group[", i, "]: ", valid.message(), Where(source, t)));
    }
    total += g.count;
    spec.groups.push_back(std::move(g));
  }
  if (total > 100000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group: ", total, " devices in all; the simulator takes at most 100000 in ", source));
  }
  const absl::Status job_ok = ValidateJobSpec(spec.job);
  if (!job_ok.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(job_ok.message(), " in ", source));
  }
  return spec;
}

absl::StatusOr<ClusterSpec> LoadClusterFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open the devices file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseClusterToml(ss.str(), path);
}

namespace {

std::string HostName(const DeviceGroupSpec& g, int index) {
  return absl::StrCat(g.name, "-h", index / g.devices_per_host);
}

}  // namespace

std::vector<SolverDevice> ClusterDevices(const ClusterSpec& spec) {
  std::vector<SolverDevice> out;
  for (const DeviceGroupSpec& g : spec.groups) {
    for (int k = 0; k < g.count; ++k) {
      SolverDevice d;
      d.id = absl::StrCat(g.name, "-", k);
      d.profile = g.profile;
      d.profile.set_host(HostName(g, k));
      out.push_back(std::move(d));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The simulation.

namespace {

constexpr int64_t kEpochMs = 1700000000000;  // virtual time 0 (the core keeps Unix times)

enum class EventType { kTick, kFail, kJoin, kReport };

struct Event {
  int64_t ms = 0;
  uint64_t seq = 0;  // ties in time run in the order they were scheduled
  EventType type = EventType::kTick;
  int device = -1;   // kFail: index into the simulation's devices
  int group = -1;    // kJoin
  std::string host;  // kJoin
  bool operator>(const Event& o) const { return ms != o.ms ? ms > o.ms : seq > o.seq; }
};

struct VirtualDevice {
  std::string id;
  int group = 0;
  std::string host;
  bool alive = true;
  bool expired = false;      // the core has declared it dead (after it failed)
  int64_t last_beat_ms = 0;  // its last heartbeat (or join)
};

class Simulation {
 public:
  Simulation(const ClusterSpec& spec, const SimulationOptions& options)
      : spec_(spec),
        options_(options),
        clock_(kEpochMs),
        core_(CoreOptions(spec, options), &clock_),
        rng_(options.seed ^ 0x636875726e726e67ull) {
    tokens_per_step_ = static_cast<double>(spec.job.global_batch()) * spec.job.model().block_size();
    next_index_.assign(spec.groups.size(), 0);
  }

  absl::StatusOr<SimulationResult> Run() {
    // Every device of the file joins at time 0.
    for (size_t g = 0; g < spec_.groups.size(); ++g) {
      for (int k = 0; k < spec_.groups[g].count; ++k) {
        SHOAL_RETURN_IF_ERROR(JoinDevice(static_cast<int>(g), HostName(spec_.groups[g], k)));
      }
    }
    RefreshLayout();
    if (layout_.version() == 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the devices of ", spec_.source, " cannot train the model: ", last_error_));
    }
    AddRow(absl::StrCat("start: ", devices_.size(), " devices joined; ", LayoutEvent()));
    Schedule(HeartbeatMs(), EventType::kTick);
    Schedule(ReportMs(), EventType::kReport);
    const double end_s = spec_.settings.max_hours * 3600;
    bool done = false;
    while (!done && !events_.empty()) {
      Event e = events_.top();
      events_.pop();
      const double t = static_cast<double>(e.ms) / 1000;
      if (t > end_s) {
        done = AdvanceTo(end_s);
        if (!done) AddRow("time limit");
        break;
      }
      if ((done = AdvanceTo(t))) break;
      clock_.SetMs(kEpochMs + e.ms);
      switch (e.type) {
        case EventType::kTick:
          SHOAL_RETURN_IF_ERROR(Tick());
          Schedule(e.ms + HeartbeatMs(), EventType::kTick);
          break;
        case EventType::kReport:
          AddRow("");
          Schedule(e.ms + ReportMs(), EventType::kReport);
          break;
        case EventType::kFail:
          Fail(e.device);
          break;
        case EventType::kJoin:
          SHOAL_RETURN_IF_ERROR(JoinDevice(e.group, e.host));
          RefreshLayout();
          AddRow(absl::StrCat("join ", devices_.back().id, layout_changed_ ? "; " : "",
                              layout_changed_ ? LayoutEvent() : ""));
          break;
      }
    }
    result_.summary.virtual_s = now_s_;
    result_.summary.tokens = tokens_;
    result_.summary.steps = tokens_ / tokens_per_step_;
    result_.summary.mean_tokens_per_s = now_s_ > 0 ? tokens_ / now_s_ : 0;
    result_.summary.idle_s = idle_s_;
    result_.summary.finished = done;
    result_.summary.final_layout = layout_.summary();
    return std::move(result_);
  }

 private:
  static CoordinatorOptions CoreOptions(const ClusterSpec& spec, const SimulationOptions& o) {
    CoordinatorOptions c;
    c.lease_ms = static_cast<int64_t>(std::llround(spec.settings.lease_s * 1000));
    c.heartbeat_interval_ms = static_cast<int64_t>(std::llround(spec.settings.heartbeat_s * 1000));
    c.solver = o.solver;
    c.log_events = false;
    c.relayout_min_gain = spec.settings.relayout_gain;
    return c;
  }

  int64_t HeartbeatMs() const {
    return std::max<int64_t>(1, std::llround(spec_.settings.heartbeat_s * 1000));
  }
  int64_t LeaseMs() const { return std::llround(spec_.settings.lease_s * 1000); }
  int64_t ReportMs() const {
    return std::max<int64_t>(1, std::llround(spec_.settings.report_every_s * 1000));
  }
  int64_t NowMs() const { return clock_.NowUnixMs() - kEpochMs; }

  void Schedule(int64_t ms, EventType type, int device = -1, int group = -1,
                std::string host = "") {
    Event e;
    e.ms = ms;
    e.seq = next_seq_++;
    e.type = type;
    e.device = device;
    e.group = group;
    e.host = std::move(host);
    events_.push(std::move(e));
  }

  absl::Status JoinDevice(int group, const std::string& host) {
    const DeviceGroupSpec& g = spec_.groups[group];
    v1::JoinRequest request;
    request.set_protocol_version(kProtocolVersion);
    *request.mutable_device() = g.profile;
    request.mutable_device()->set_host(host);
    *request.mutable_job() = spec_.job;
    request.set_mesh_rank(-1);
    request.set_name(absl::StrCat(g.name, "-", next_index_[group]++));
    absl::StatusOr<v1::JoinResponse> joined = core_.Join(request);
    if (!joined.ok()) {
      return absl::InternalError(absl::StrCat("simulated join of ", request.name(),
                                              " refused: ", joined.status().message()));
    }
    VirtualDevice d;
    d.id = joined->worker_id();
    d.group = group;
    d.host = host;
    d.last_beat_ms = NowMs();
    devices_.push_back(d);
    ++alive_;
    ++result_.summary.joins;
    if (g.preemptible && options_.churn_per_hour > 0) {
      // Exponential lifetime with mean 1/rate hours; u in (0, 1].
      const double u = (static_cast<double>(rng_.Next() >> 11) + 1) * 0x1.0p-53;
      const double life_s = -std::log(u) / options_.churn_per_hour * 3600;
      const int64_t at = NowMs() + std::max<int64_t>(1, std::llround(life_s * 1000));
      Schedule(at, EventType::kFail, static_cast<int>(devices_.size()) - 1);
    }
    return absl::OkStatus();
  }

  void Fail(int index) {
    VirtualDevice& d = devices_[index];
    if (!d.alive) return;
    d.alive = false;
    --alive_;
    ++result_.summary.failures;
    failed_.insert(d.id);
    const bool was_placed = placed_.count(d.id) > 0;
    if (was_placed) ++placed_failed_;
    const int64_t replace_ms = NowMs() + std::llround(spec_.settings.replace_after_s * 1000);
    Schedule(replace_ms, EventType::kJoin, -1, d.group, d.host);
    AddRow(absl::StrCat("fail ", d.id, was_placed ? " (placed: training stalls)" : " (unused)"));
  }

  absl::Status Tick() {
    // Every live virtual worker renews its lease and reports its replica's progress.
    const bool productive = Rate() > 0;
    const int64_t step = static_cast<int64_t>(tokens_ / tokens_per_step_);
    for (VirtualDevice& d : devices_) {
      if (!d.alive) continue;
      d.last_beat_ms = NowMs();
      v1::HeartbeatRequest request;
      request.set_worker_id(d.id);
      v1::StepStats* stats = request.mutable_stats();
      stats->set_step(step);
      auto it = replica_tokens_.find(d.id);
      if (productive && it != replica_tokens_.end()) {
        stats->set_tokens_per_s(it->second);
        stats->set_step_time_s(layout_.predicted_step_s());
      }
      absl::StatusOr<v1::HeartbeatResponse> r = core_.Heartbeat(request);
      if (!r.ok()) {
        return absl::InternalError(
            absl::StrCat("simulated heartbeat of ", d.id, " refused: ", r.status().message()));
      }
    }
    const int expired = core_.ExpireLeases();
    if (expired > 0) {
      // Which ones: the failed devices whose lease ran out, by the core's own rule.
      std::vector<std::string> ids;
      for (VirtualDevice& d : devices_) {
        if (!d.alive && !d.expired && NowMs() - d.last_beat_ms > LeaseMs()) {
          d.expired = true;
          ids.push_back(d.id);
        }
      }
      RefreshLayout();
      AddRow(absl::StrCat("lease expired: ",
                          static_cast<int>(ids.size()) == expired
                              ? absl::StrJoin(ids, ", ")
                              : absl::StrCat(expired, " devices"),
                          layout_changed_ ? "; " : "", layout_changed_ ? LayoutEvent() : ""));
    }
    return absl::OkStatus();
  }

  // Picks up the core's current layout; a changed placement costs a restart.
  void RefreshLayout() {
    layout_changed_ = false;
    const v1::ClusterStatus status = core_.Status();
    if (!status.layout_error().empty()) last_error_ = status.layout_error();
    if (status.layout().version() == layout_.version()) return;
    const std::string signature = Signature(status.layout());
    layout_ = status.layout();
    layout_changed_ = true;
    ++result_.summary.layouts;
    result_.summary.best_predicted_tokens_per_s =
        std::max(result_.summary.best_predicted_tokens_per_s, layout_.predicted_tokens_per_s());
    placed_.clear();
    placed_failed_ = 0;
    for (const v1::Placement& p : layout_.placements()) {
      placed_.insert(p.worker_id());
      if (failed_.count(p.worker_id())) ++placed_failed_;
    }
    replica_tokens_.clear();
    for (const v1::Pipeline& pipe : layout_.pipelines()) {
      const double tps = pipe.micro_batches() * layout_.micro_batch_size() *
                         static_cast<double>(spec_.job.model().block_size()) /
                         layout_.predicted_step_s();
      for (const v1::Stage& st : pipe.stages()) {
        for (const std::string& w : st.workers()) replica_tokens_[w] = tps;
      }
    }
    if (signature != signature_) {
      signature_ = signature;
      productive_from_s_ = now_s_ + spec_.settings.restart_s;
      restarted_ = true;
    } else {
      restarted_ = false;
    }
  }

  // What the workers run: who holds which blocks with how many micro-batches. Two layouts with
  // the same signature need no restart.
  static std::string Signature(const v1::Layout& l) {
    std::string s = absl::StrCat(l.tp(), "/", l.pp(), "/", l.dp(), "/", l.micro_batch_size());
    for (const v1::Pipeline& p : l.pipelines()) {
      absl::StrAppend(&s, "|", p.micro_batches());
      for (const v1::Stage& st : p.stages()) {
        absl::StrAppend(&s, ":", st.first_layer(), "-", st.end_layer(), "=",
                        absl::StrJoin(st.workers(), ","));
      }
    }
    return s;
  }

  std::string LayoutEvent() const {
    return absl::StrCat("layout v", layout_.version(), " (", layout_.placements_size(), " placed",
                        restarted_ ? absl::StrFormat(", restart %gs", spec_.settings.restart_s)
                                   : ", same placement",
                        ")");
  }

  double Rate() const {
    if (layout_.version() == 0 || placed_failed_ > 0 || now_s_ < productive_from_s_) return 0;
    return layout_.predicted_tokens_per_s();
  }

  // Integrates the throughput up to t (a row where a restart ends inside); true once the steps
  // are done (now_s_ is then that moment).
  bool AdvanceTo(double t) {
    const double target = static_cast<double>(options_.steps) * tokens_per_step_;
    while (now_s_ < t) {
      const bool restart_ends = productive_from_s_ > now_s_ && productive_from_s_ <= t;
      const double seg_end = restart_ends ? productive_from_s_ : t;
      const double rate = Rate();
      if (rate > 0) {
        const double t_done = now_s_ + (target - tokens_) / rate;
        if (t_done <= seg_end) {
          tokens_ = target;
          now_s_ = t_done;
          AddRow(absl::StrCat("done: ", options_.steps, " steps"));
          result_.rows.back().tokens_per_s = 0;
          return true;
        }
      } else {
        idle_s_ += seg_end - now_s_;
      }
      tokens_ += rate * (seg_end - now_s_);
      now_s_ = seg_end;
      if (restart_ends)
        AddRow(placed_failed_ > 0 ? "restart done (still stalled)" : "restart done");
    }
    return false;
  }

  // A row with the state after everything at now_s_; rows at the same time merge.
  void AddRow(const std::string& event) {
    if (result_.rows.empty() || result_.rows.back().time_s != now_s_) {
      result_.rows.emplace_back();
    }
    SimulationRow& row = result_.rows.back();
    row.time_s = now_s_;
    row.alive = alive_;
    row.layout_version = layout_.version();
    row.layout_devices = layout_.placements_size() + layout_.unused_workers_size();
    row.placed = layout_.placements_size();
    row.tp = layout_.tp();
    row.pp = layout_.pp();
    row.dp = layout_.dp();
    row.predicted_tokens_per_s = layout_.predicted_tokens_per_s();
    row.tokens_per_s = Rate();
    row.tokens = tokens_;
    row.steps = tokens_ / tokens_per_step_;
    if (!event.empty()) {
      if (!row.events.empty()) row.events += "; ";
      row.events += event;
    }
  }

  const ClusterSpec& spec_;
  const SimulationOptions& options_;
  ManualClock clock_;
  CoordinatorCore core_;
  SplitMix rng_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t next_seq_ = 0;
  std::vector<VirtualDevice> devices_;
  std::vector<int> next_index_;  // per group: the next device number for names
  int alive_ = 0;
  std::set<std::string> failed_;
  std::set<std::string> placed_;
  int placed_failed_ = 0;  // placed devices of the current layout that have failed
  std::map<std::string, double> replica_tokens_;
  v1::Layout layout_;
  std::string signature_;
  std::string last_error_;
  bool layout_changed_ = false;
  bool restarted_ = false;
  double tokens_per_step_ = 0;
  double now_s_ = 0;
  double productive_from_s_ = 0;
  double tokens_ = 0;
  double idle_s_ = 0;
  SimulationResult result_;
};

std::string Hms(double s) {
  const int64_t total = static_cast<int64_t>(std::floor(s));
  return absl::StrFormat("%d:%02d:%02d", total / 3600, total / 60 % 60, total % 60);
}

std::string Si(double v) {
  if (v >= 1e12) return absl::StrFormat("%.3gT", v / 1e12);
  if (v >= 1e9) return absl::StrFormat("%.3gG", v / 1e9);
  if (v >= 1e6) return absl::StrFormat("%.3gM", v / 1e6);
  if (v >= 1e3) return absl::StrFormat("%.3gk", v / 1e3);
  return absl::StrFormat("%.3g", v);
}

}  // namespace

std::string FormatHms(double seconds) { return Hms(seconds); }
std::string FormatSi(double value) { return Si(value); }

absl::StatusOr<SimulationResult> Simulate(const ClusterSpec& spec,
                                          const SimulationOptions& options) {
  if (!std::isfinite(options.churn_per_hour) || options.churn_per_hour < 0 ||
      options.churn_per_hour > 3600) {
    return absl::InvalidArgumentError(absl::StrCat(
        "churn must be in [0, 3600] failures per device-hour, got ", options.churn_per_hour));
  }
  if (options.steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat("steps must be >= 1, got ", options.steps));
  }
  if (spec.groups.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("group: no devices in ", spec.source));
  }
  for (size_t g = 0; g < spec.groups.size(); ++g) {
    if (spec.groups[g].slow_after_s >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group[", g, "].slow_after_s: stragglers are simulated with --swarm only (", spec.source,
          ")"));
    }
  }
  Simulation sim(spec, options);
  return sim.Run();
}

absl::StatusOr<StaticRestartResult> SimulateStaticRestarts(const StaticRestartOptions& o) {
  auto bad = [](const char* name, double v, const char* want) {
    return absl::InvalidArgumentError(absl::StrCat("static restarts: ", name, " must be ", want,
                                                   ", got ", v));
  };
  if (!(std::isfinite(o.seconds) && o.seconds > 0)) return bad("seconds", o.seconds, "> 0");
  if (!(std::isfinite(o.step_s) && o.step_s > 0)) return bad("step_s", o.step_s, "> 0");
  if (!(std::isfinite(o.start_s) && o.start_s >= 0)) return bad("start_s", o.start_s, ">= 0");
  if (o.checkpoint_every < 1) {
    return bad("checkpoint_every", static_cast<double>(o.checkpoint_every), ">= 1");
  }
  if (!(o.kill_every_s > 0)) return bad("kill_every_s", o.kill_every_s, "> 0");
  if (o.seconds / o.step_s > 1e9) {
    return bad("seconds / step_s", o.seconds / o.step_s, "at most 1e9 steps");
  }
  StaticRestartResult r;
  int64_t step = 0, saved = 0;
  double next_kill = o.kill_every_s;
  double t = o.start_s;  // when the next step begins
  while (true) {
    // A kill before the next step ends (during a start too) stops the job; it starts again
    // from the newest checkpoint. Steps that would end after the run's end are not counted.
    if (next_kill < std::min(t + o.step_s, o.seconds)) {
      ++r.kills;
      r.steps_lost += step - saved;
      step = saved;
      t = next_kill + o.start_s;
      next_kill += o.kill_every_s;
      continue;
    }
    if (t + o.step_s > o.seconds) break;
    t += o.step_s;
    ++step;
    if (step % o.checkpoint_every == 0) saved = step;
    r.steps = std::max(r.steps, step);
  }
  return r;
}

std::string FormatSimulationTable(const SimulationResult& result) {
  std::string out =
      absl::StrFormat("%9s %6s %7s %10s %11s %11s %9s %9s  %s\n", "time", "alive", "layout",
                      "tp/pp/dp", "predicted", "actual", "tokens", "steps", "events");
  absl::StrAppend(&out, absl::StrFormat("%9s %6s %7s %10s %11s %11s %9s %9s\n", "", "", "", "",
                                        "tokens/s", "tokens/s", "", ""));
  for (const SimulationRow& r : result.rows) {
    absl::StrAppend(
        &out,
        absl::StrFormat("%9s %6d %7s %10s %11s %11s %9s %9.1f  %s\n", Hms(r.time_s), r.alive,
                        absl::StrCat("v", r.layout_version),
                        absl::StrCat(r.tp, "/", r.pp, "/", r.dp), Si(r.predicted_tokens_per_s),
                        Si(r.tokens_per_s), Si(r.tokens), r.steps, r.events));
  }
  const SimulationSummary& s = result.summary;
  absl::StrAppend(
      &out,
      absl::StrFormat(
          "\n%s after %s of virtual time: %.1f steps, %s tokens, %s tokens/s on average (best "
          "layout %s tokens/s), idle %.1f%% of the time; %d failures, %d joins, %d layouts\n"
          "final layout: %s\n",
          s.finished ? "finished" : "stopped", Hms(s.virtual_s), s.steps, Si(s.tokens),
          Si(s.mean_tokens_per_s), Si(s.best_predicted_tokens_per_s),
          s.virtual_s > 0 ? 100 * s.idle_s / s.virtual_s : 0.0, s.failures, s.joins, s.layouts,
          s.final_layout));
  return out;
}

std::string FormatSimulationJson(const SimulationResult& result) {
  std::string out;
  for (const SimulationRow& r : result.rows) {
    nlohmann::json j;
    j["type"] = "row";
    j["time_s"] = r.time_s;
    j["alive"] = r.alive;
    j["layout_version"] = r.layout_version;
    j["layout_devices"] = r.layout_devices;
    j["placed"] = r.placed;
    j["tp"] = r.tp;
    j["pp"] = r.pp;
    j["dp"] = r.dp;
    j["predicted_tokens_per_s"] = r.predicted_tokens_per_s;
    j["tokens_per_s"] = r.tokens_per_s;
    j["tokens"] = r.tokens;
    j["steps"] = r.steps;
    j["events"] = r.events;
    absl::StrAppend(&out, j.dump(), "\n");
  }
  const SimulationSummary& s = result.summary;
  nlohmann::json j;
  j["type"] = "summary";
  j["virtual_s"] = s.virtual_s;
  j["tokens"] = s.tokens;
  j["steps"] = s.steps;
  j["mean_tokens_per_s"] = s.mean_tokens_per_s;
  j["best_predicted_tokens_per_s"] = s.best_predicted_tokens_per_s;
  j["idle_s"] = s.idle_s;
  j["failures"] = s.failures;
  j["joins"] = s.joins;
  j["layouts"] = s.layouts;
  j["finished"] = s.finished;
  j["final_layout"] = s.final_layout;
  absl::StrAppend(&out, j.dump(), "\n");
  return out;
}

}  // namespace shoal::scheduler
