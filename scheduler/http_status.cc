#include "scheduler/http_status.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include <google/protobuf/util/json_util.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/net_util.h"
#include "common/status.h"
#include "common/utf8.h"

namespace shoal::scheduler {
namespace {

using prometheus::Labels;

constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// How long an idle keep-alive connection holds a server thread. httplib only looks at its stop
// flag between requests, so this also bounds how long Stop() waits for open connections: a
// Prometheus scraping us keeps one open all the time.
constexpr time_t kKeepAliveSeconds = 1;

const char* DeviceKindLabel(v1::DeviceKind kind) {
  switch (kind) {
    case v1::DEVICE_KIND_CPU: return "cpu";
    case v1::DEVICE_KIND_CUDA: return "cuda";
    default: return "unspecified";
  }
}

const char* WorkerStateLabel(v1::WorkerState state) {
  switch (state) {
    case v1::WORKER_STATE_ALIVE: return "alive";
    case v1::WORKER_STATE_DRAINING: return "draining";
    case v1::WORKER_STATE_DEAD: return "dead";
    case v1::WORKER_STATE_LEFT: return "left";
    default: return "unspecified";
  }
}

// Label values as valid UTF-8, each malformed byte replaced by U+FFFD. Prometheus drops a whole
// scrape over one invalid label value; protobuf's parser already refuses such strings from the
// wire, so this only guards statuses built in-process.
std::string Utf8Label(const std::string& s) { return ReplaceInvalidUtf8(s); }

// One gauge family per call site; the registry owns it. A fresh registry per scrape means a
// worker that disappears from the snapshot disappears from the exposition too.
prometheus::Family<prometheus::Gauge>& GaugeFamily(prometheus::Registry& registry,
                                                   const std::string& name,
                                                   const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry);
}

// prometheus-cpp 1.0.1 writes counter names as given (it does not append `_total`), so the names
// passed here carry the suffix themselves.
void AddCounter(prometheus::Registry& registry, const std::string& name, const std::string& help,
                int64_t value) {
  prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add({}).Increment(
      static_cast<double>(std::max<int64_t>(value, 0)));
}

void AddTierGauges(prometheus::Family<prometheus::Gauge>& family, const Labels& worker_labels,
                   const v1::MemoryTiers& tiers) {
  const std::pair<const char*, int64_t> by_tier[] = {
      {"gpu", tiers.gpu_bytes()}, {"host", tiers.host_bytes()}, {"disk", tiers.disk_bytes()}};
  for (const auto& [tier, bytes] : by_tier) {
    Labels labels = worker_labels;
    labels["tier"] = tier;
    family.Add(labels).Set(static_cast<double>(bytes));
  }
}

// "HOST:PORT" or "[V6]:PORT" -> host and port; the port is 0..65535.
absl::Status ParseListen(const std::string& listen, std::string* host, int* port) {
  const auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP listen address \"", listen, "\": ", why, " (want HOST:PORT)"));
  };
  SHOAL_RETURN_IF_ERROR(SplitHostPort(listen, "HTTP listen address", 0, host, port));
  for (char c : *host) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_' &&
        c != ':') {
      return bad(absl::StrCat("character '", std::string(1, c), "' in the host"));
    }
  }
  // Resolve here so that a name that does not resolve is the caller's mistake
  // (kInvalidArgument), not a failure to bind.
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* result = nullptr;
  const int rc = ::getaddrinfo(host->c_str(), nullptr, &hints, &result);
  if (rc != 0) return bad(absl::StrCat("cannot resolve host \"", *host, "\": ", gai_strerror(rc)));
  ::freeaddrinfo(result);
  return absl::OkStatus();
}

absl::StatusOr<std::string> StatusJson(const v1::ClusterStatus& status) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string json;
  const auto result = google::protobuf::util::MessageToJsonString(status, &json, options);
  if (!result.ok()) {
    return absl::InternalError(
        absl::StrCat("cluster status to JSON: ", std::string(result.message())));
  }
  return json;
}

// {"error":"<message>"}: still valid JSON, so the dashboard can show what went wrong. Bytes of
// the message that are not UTF-8 become U+FFFD (nlohmann's strict default would throw).
std::string ErrorJson(const absl::Status& error) {
  const nlohmann::json body = {{"error", std::string(error.message())}};
  return body.dump(/*indent=*/-1, /*indent_char=*/' ', /*ensure_ascii=*/false,
                   nlohmann::json::error_handler_t::replace);
}

}  // namespace


// Swarm mode: stages x peers, the step, and the ledger's and membership's counts.
void AddSwarmMetrics(const v1::SwarmRoster& r, prometheus::Registry& registry) {
  auto& peers = GaugeFamily(registry, "shoal_swarm_peers",
                            "Peers per stage and state (SYNCING, SERVING, DRAINING).");
  auto& held = GaugeFamily(registry, "shoal_swarm_peer_accumulated_micro_batches",
                           "Micro-batches a peer holds in the open step.");
  auto& missing = GaugeFamily(registry, "shoal_swarm_stage_missing_micro_batches",
                              "Micro-batches the open step still needs at a stage.");
  for (const v1::SwarmStageEntry& st : r.stages()) {
    const std::string stage = std::to_string(st.index());
    std::map<std::string, int> by_state = {{"SYNCING", 0}, {"SERVING", 0}, {"DRAINING", 0}};
    for (const v1::SwarmPeerEntry& p : st.peers()) {
      ++by_state[p.state()];
      held.Add({{"stage", stage}, {"peer", p.id()}}).Set(static_cast<double>(p.accumulated()));
    }
    for (const auto& [state, n] : by_state) {
      peers.Add({{"stage", stage}, {"state", state}}).Set(n);
    }
    missing.Add({{"stage", stage}}).Set(static_cast<double>(st.missing()));
  }
  GaugeFamily(registry, "shoal_swarm_next_step", "The step the swarm runs or opens next.")
      .Add({})
      .Set(static_cast<double>(r.next_step()));
  GaugeFamily(registry, "shoal_swarm_job",
              "The job's number under this coordinator (the next begins once a job is done and "
              "its workers are gone).")
      .Add({})
      .Set(static_cast<double>(r.job()));
  GaugeFamily(registry, "shoal_swarm_trainers", "Live trainers.")
      .Add({})
      .Set(r.trainers_size());
  const v1::SwarmCounters& c = r.counters();
  AddCounter(registry, "shoal_swarm_joins_total", "Peers that joined the swarm.", c.joins());
  AddCounter(registry, "shoal_swarm_deaths_total", "Peers found dead.", c.deaths());
  AddCounter(registry, "shoal_swarm_fences_total",
             "Peers fenced in a step's ledger (their micro-batches replayed).", c.fences());
  AddCounter(registry, "shoal_swarm_replays_total", "Micro-batches leased again as replays.",
             c.replays());
  AddCounter(registry, "shoal_swarm_duplicates_total",
             "Commits refused as already held (a retried call).", c.duplicates());
  AddCounter(registry, "shoal_swarm_drifts_total", "Peers whose parameters drifted.", c.drifts());
  AddCounter(registry, "shoal_swarm_moves_total", "Peers moved to another stage.", c.moves());
  AddCounter(registry, "shoal_swarm_steps_applied_total", "Steps every stage applied.",
             c.steps_applied());
  GaugeFamily(registry, "shoal_swarm_lost_micro_batches",
              "Micro-batches a step can no longer place (must stay 0).")
      .Add({})
      .Set(static_cast<double>(c.lost()));
}

std::string RenderPrometheus(const v1::ClusterStatus& status) {
  prometheus::Registry registry;

  GaugeFamily(registry, "shoal_build_info", "The coordinator's version; the value is always 1.")
      .Add({{"version", Utf8Label(status.coordinator_version())}})
      .Set(1);

  // Every state is present (0 when empty), so sum/rate queries need no `or vector(0)`.
  auto& workers = GaugeFamily(registry, "shoal_workers", "Workers known to the coordinator.");
  int by_state[5] = {0, 0, 0, 0, 0};
  for (const auto& w : status.workers()) {
    const int s = static_cast<int>(w.state());
    if (s >= 1 && s <= 4) ++by_state[s];
  }
  for (int s = 1; s <= 4; ++s) {
    workers.Add({{"state", WorkerStateLabel(static_cast<v1::WorkerState>(s))}}).Set(by_state[s]);
  }

  // Per worker. Labels: the worker id, its host and device kind, all fixed for a worker's life,
  // so each worker is one series per metric; the device's name goes in the _info metric only.
  auto& info = GaugeFamily(registry, "shoal_worker_info",
                           "A worker's device; the value is always 1.");
  auto& up = GaugeFamily(registry, "shoal_worker_up", "1 while the worker is alive, else 0.");
  auto& tokens = GaugeFamily(registry, "shoal_worker_tokens_per_second",
                             "Tokens per second in the worker's last reported step.");
  auto& step = GaugeFamily(registry, "shoal_worker_step", "The worker's last reported step.");
  auto& age = GaugeFamily(registry, "shoal_worker_heartbeat_age_seconds",
                          "Seconds since the worker's last heartbeat (since it joined, if none).");
  auto& budget = GaugeFamily(registry, "shoal_worker_memory_budget_bytes",
                             "Bytes per memory tier the worker may use.");
  auto& used = GaugeFamily(registry, "shoal_worker_memory_used_bytes",
                           "Bytes per memory tier in use at the worker's last reported step.");
  auto& flops = GaugeFamily(registry, "shoal_worker_device_flops",
                            "The worker's measured dense fp32 rate, FLOP/s.");
  auto& plan_peak = GaugeFamily(registry, "shoal_worker_memory_plan_peak_bytes",
                                "Peak bytes per memory tier the worker's own memory plan predicts.");
  auto& plan_step = GaugeFamily(registry, "shoal_worker_predicted_step_seconds",
                                "Step time the worker's own memory plan predicts.");
  for (const auto& w : status.workers()) {
    const Labels labels = {{"worker", Utf8Label(w.worker_id())},
                           {"host", Utf8Label(w.device().host())},
                           {"device", DeviceKindLabel(w.device().kind())}};
    Labels info_labels = labels;
    info_labels["device_name"] = Utf8Label(w.device().device_name());
    info.Add(info_labels).Set(1);
    up.Add(labels).Set(w.state() == v1::WORKER_STATE_ALIVE ? 1 : 0);
    tokens.Add(labels).Set(w.last_stats().tokens_per_s());
    step.Add(labels).Set(static_cast<double>(w.last_stats().step()));
    const int64_t last =
        w.last_heartbeat_unix_ms() > 0 ? w.last_heartbeat_unix_ms() : w.joined_unix_ms();
    age.Add(labels).Set(
        last > 0 ? static_cast<double>(std::max<int64_t>(status.now_unix_ms() - last, 0)) / 1e3
                 : 0.0);
    AddTierGauges(budget, labels, w.device().memory());
    AddTierGauges(used, labels, w.last_stats().memory_used());
    flops.Add(labels).Set(w.device().fp32_gflops() * 1e9);
    // Only workers whose chunk manager has made a plan: no series rather than a misleading 0.
    if (w.last_stats().predicted_step_s() > 0) {
      AddTierGauges(plan_peak, labels, w.last_stats().memory_plan().peak());
      plan_step.Add(labels).Set(w.last_stats().predicted_step_s());
    }
  }

  const auto& job = status.job_status();
  GaugeFamily(registry, "shoal_job_step", "The job's latest step.").Add({}).Set(
      static_cast<double>(job.step()));
  // No loss before the first step is reported: an absent series, not a misleading 0.
  if (job.step() > 0 || job.history_size() > 0) {
    GaugeFamily(registry, "shoal_job_loss", "Training loss at the job's latest step.")
        .Add({})
        .Set(job.loss());
  }
  GaugeFamily(registry, "shoal_job_tokens_per_second",
              "Tokens per second summed over the data-parallel replicas.")
      .Add({})
      .Set(job.tokens_per_s());

  const auto& layout = status.layout();
  GaugeFamily(registry, "shoal_layout_version", "Version of the current layout (0: none yet).")
      .Add({})
      .Set(static_cast<double>(layout.version()));
  auto& degree = GaugeFamily(registry, "shoal_layout_degree",
                             "Parallel degree of the current layout per dimension.");
  degree.Add({{"dim", "tp"}}).Set(layout.tp());
  degree.Add({{"dim", "pp"}}).Set(layout.pp());
  degree.Add({{"dim", "dp"}}).Set(layout.dp());
  GaugeFamily(registry, "shoal_layout_predicted_step_seconds",
              "The solver's predicted time of one optimizer step.")
      .Add({})
      .Set(layout.predicted_step_s());
  GaugeFamily(registry, "shoal_layout_predicted_tokens_per_second",
              "The solver's predicted throughput of the current layout.")
      .Add({})
      .Set(layout.predicted_tokens_per_s());

  const auto& c = status.counters();
  AddCounter(registry, "shoal_joins_total", "Workers admitted.", c.joins_total());
  AddCounter(registry, "shoal_leaves_total", "Workers that left.", c.leaves_total());
  AddCounter(registry, "shoal_heartbeats_total", "Heartbeats received.", c.heartbeats_total());
  AddCounter(registry, "shoal_lease_expirations_total", "Workers whose lease expired.",
             c.expirations_total());
  AddCounter(registry, "shoal_layouts_total", "Layouts solved.", c.layouts_total());
  AddCounter(registry, "shoal_rejected_requests_total",
             "Requests refused by authentication or validation.", c.rejected_requests_total());

  if (status.has_swarm()) AddSwarmMetrics(status.swarm(), registry);
  return prometheus::TextSerializer().Serialize(registry.Collect());
}

std::string RenderStatusJson(const v1::ClusterStatus& status) {
  auto json = StatusJson(status);
  return json.ok() ? *std::move(json) : ErrorJson(json.status());
}

struct HttpStatusServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::once_flag stopped;
  std::atomic<bool> finished{false};
  int port = 0;
};

HttpStatusServer::HttpStatusServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpStatusServer::~HttpStatusServer() { Stop(); }

int HttpStatusServer::port() const { return impl_->port; }

void HttpStatusServer::Stop() {
  std::call_once(impl_->stopped, [this] {
    // httplib's stop() does nothing until the accept loop has started (it checks is_running),
    // so a Stop() right after Start() waits for the loop before stopping it. The loop then
    // joins its connection threads, each within the keep-alive timeout.
    bool stop_sent = false;
    while (!impl_->finished) {
      if (!stop_sent && impl_->server.is_running()) {
        impl_->server.stop();
        stop_sent = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    impl_->thread.join();
  });
}

absl::StatusOr<std::unique_ptr<HttpStatusServer>> HttpStatusServer::Start(
    const std::string& listen, StatusFn status) {
  std::string host;
  int port = 0;
  if (absl::Status parsed = ParseListen(listen, &host, &port); !parsed.ok()) return parsed;
  if (!status) return absl::InvalidArgumentError("HTTP status server: no status function");

  auto impl = std::make_unique<Impl>();
  httplib::Server& server = impl->server;
  // httplib's default also sets SO_REUSEPORT, which would let a second coordinator bind the same
  // port and split the scrapes between the two; SO_REUSEADDR alone still allows a quick restart.
  server.set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server.set_keep_alive_timeout(kKeepAliveSeconds);
  server.set_default_headers({{"Cache-Control", "no-store"}});

  server.Get("/metrics", [status](const httplib::Request&, httplib::Response& res) {
    res.set_content(RenderPrometheus(status()), kMetricsContentType);
  });
  server.Get("/api/status", [status](const httplib::Request&, httplib::Response& res) {
    auto json = StatusJson(status());
    if (json.ok()) {
      res.set_content(*json, "application/json");
    } else {
      res.status = 500;
      res.set_content(ErrorJson(json.status()), "application/json");
    }
  });
  server.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(DashboardHtml(), "text/html; charset=utf-8");
  });
  server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    const char* hint = res.status == 404 ? " not found (try /, /metrics, /api/status)" : "";
    res.set_content(absl::StrCat(res.status, ": ", req.path, hint, "\n"),
                    "text/plain; charset=utf-8");
  });
  server.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr error) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        SHOAL_LOG(Warning) << "HTTP " << req.path << ": " << what;
        res.status = 500;
        res.set_content(absl::StrCat("500: ", what, "\n"), "text/plain; charset=utf-8");
      });

  errno = 0;
  if (port == 0) {
    port = server.bind_to_any_port(host);  // -1 on failure
  } else if (!server.bind_to_port(host, port)) {
    port = -1;
  }
  if (port < 0) {
    const int error = errno;
    return absl::UnavailableError(absl::StrCat("HTTP status server: cannot listen on ", listen,
                                               error != 0 ? ": " : "",
                                               error != 0 ? std::strerror(error) : ""));
  }
  impl->port = port;
  // The socket listens already (bind_to_port calls listen), so clients may connect from here on;
  // the thread only runs the accept loop.
  impl->thread = std::thread([impl = impl.get()] {
    impl->server.listen_after_bind();
    impl->finished = true;
  });
  SHOAL_LOG(Info) << "HTTP status on http://" << (host.find(':') != std::string::npos ? "[" : "")
                  << host << (host.find(':') != std::string::npos ? "]" : "") << ":" << port
                  << "/ (/metrics, /api/status)";
  return std::unique_ptr<HttpStatusServer>(new HttpStatusServer(std::move(impl)));
}

}  // namespace shoal::scheduler
