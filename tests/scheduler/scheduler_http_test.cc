// The coordinator's HTTP port over real sockets: a real HttpStatusServer on 127.0.0.1:0 and plain
// HTTP/1.0 GETs (tests/monitoring_util.h, independent of the server's HTTP library). /metrics is
// checked against the exposition format's rules by a parser written here; /api/status must parse
// back into the snapshot it came from.
#include "scheduler/http_status.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>

#include "gtest/gtest.h"
#include "tests/monitoring_util.h"
#include "tests/scheduler/sample_status.h"

namespace shoal::scheduler {
namespace {

using ::shoal::testing::HttpGet;
using ::shoal::testing::HttpResponse;
using ::shoal::testing::SampleClusterStatus;
using ::shoal::testing::SampleLoss;

// ---- A parser for the Prometheus text format 0.0.4, strict about what we promise. ----------

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct Exposition {
  std::map<std::string, std::string> help, type;
  std::vector<Sample> samples;
  std::vector<std::string> errors;  // every rule broken, with the line

  // The value of the one sample named `name` whose labels include `labels`; NaN if none.
  double Value(const std::string& name, const std::map<std::string, std::string>& labels = {},
               int* matches = nullptr) const {
    double value = std::nan("");
    int n = 0;
    for (const Sample& s : samples) {
      if (s.name != name) continue;
      bool all = true;
      for (const auto& [k, v] : labels) {
        auto it = s.labels.find(k);
        all = all && it != s.labels.end() && it->second == v;
      }
      if (all) {
        value = s.value;
        ++n;
      }
    }
    if (matches != nullptr) *matches = n;
    return n == 1 ? value : std::nan("");
  }
};

const std::regex& MetricNameRe() {
  static const std::regex re("[a-zA-Z_:][a-zA-Z0-9_:]*");
  return re;
}
const std::regex& LabelNameRe() {
  static const std::regex re("[a-zA-Z_][a-zA-Z0-9_]*");
  return re;
}

// Parses `{a="x",b="y\"z"}` starting at text[*pos] == '{'; unescapes \\, \" and \n.
bool ParseLabels(const std::string& text, size_t* pos, std::map<std::string, std::string>* labels,
                 std::string* error) {
  size_t i = *pos + 1;
  while (i < text.size() && text[i] != '}') {
    const size_t eq = text.find('=', i);
    if (eq == std::string::npos) return *error = "label without '='", false;
    const std::string name = text.substr(i, eq - i);
    if (!std::regex_match(name, LabelNameRe())) return *error = "bad label name " + name, false;
    if (eq + 1 >= text.size() || text[eq + 1] != '"') return *error = "unquoted label", false;
    std::string value;
    size_t j = eq + 2;
    for (; j < text.size() && text[j] != '"'; ++j) {
      if (text[j] == '\n') return *error = "raw newline in label value", false;
      if (text[j] != '\\') {
        value += text[j];
        continue;
      }
      if (++j >= text.size()) return *error = "dangling backslash", false;
      switch (text[j]) {
        case '\\': value += '\\'; break;
        case '"': value += '"'; break;
        case 'n': value += '\n'; break;
        default: return *error = std::string("bad escape \\") + text[j], false;
      }
    }
    if (j >= text.size()) return *error = "unterminated label value", false;
    if (!labels->emplace(name, value).second) return *error = "repeated label " + name, false;
    i = j + 1;
    if (i < text.size() && text[i] == ',') ++i;
  }
  if (i >= text.size()) return *error = "unterminated label set", false;
  *pos = i + 1;
  return true;
}

Exposition ParseExposition(const std::string& text) {
  Exposition e;
  if (text.empty() || text.back() != '\n') e.errors.push_back("does not end with a newline");
  std::set<std::string> series;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.empty()) continue;
    const auto fail = [&](const std::string& why) { e.errors.push_back(why + ": " + line); };
    if (line.rfind("# ", 0) == 0) {
      std::istringstream in(line.substr(2));
      std::string keyword, name;
      in >> keyword >> name;
      std::string rest;
      std::getline(in, rest);
      if (!rest.empty() && rest[0] == ' ') rest.erase(0, 1);
      if (keyword == "HELP" || keyword == "TYPE") {
        auto& table = keyword == "HELP" ? e.help : e.type;
        if (!table.emplace(name, rest).second) fail("second # " + keyword);
        if (keyword == "TYPE" && rest != "gauge" && rest != "counter") fail("unexpected type");
      }
      continue;
    }
    Sample s;
    size_t pos = 0;
    while (pos < line.size() && line[pos] != '{' && line[pos] != ' ') ++pos;
    s.name = line.substr(0, pos);
    if (pos < line.size() && line[pos] == '{') {
      std::string error;
      if (!ParseLabels(line, &pos, &s.labels, &error)) {
        fail(error);
        continue;
      }
    }
    if (pos >= line.size() || line[pos] != ' ') {
      fail("no value");
      continue;
    }
    const std::string value = line.substr(pos + 1);
    char* parse_end = nullptr;
    s.value = std::strtod(value.c_str(), &parse_end);
    if (value.empty() || *parse_end != '\0') fail("value is not a plain number");
    if (!std::regex_match(s.name, MetricNameRe())) fail("bad metric name");
    if (s.name.rfind("shoal_", 0) != 0) fail("name without the shoal_ prefix");
    // Gauges and counters have no suffixed samples, so each sample's name is its family's and
    // its # HELP and # TYPE must already have appeared.
    if (e.help.count(s.name) == 0 || e.type.count(s.name) == 0) fail("sample before HELP/TYPE");
    auto type = e.type.find(s.name);
    if (type != e.type.end() && type->second == "counter" &&
        (s.name.size() < 6 || s.name.compare(s.name.size() - 6, 6, "_total") != 0)) {
      fail("counter not ending in _total");
    }
    if (type != e.type.end() && type->second != "counter" && s.name.size() > 6 &&
        s.name.compare(s.name.size() - 6, 6, "_total") == 0) {
      fail("a non-counter ending in _total");
    }
    std::string key = s.name;
    for (const auto& [k, v] : s.labels) key += "|" + k + "=" + v;
    if (!series.insert(key).second) fail("duplicate series");
    e.samples.push_back(std::move(s));
  }
  return e;
}

// The checker must itself catch what it checks for.
TEST(ExpositionParserTest, RejectsBrokenText) {
  const char* broken[] = {
      "shoal_a 1\n",                                                     // no HELP/TYPE
      "# HELP shoal_a a\n# TYPE shoal_a counter\nshoal_a 1\n",           // counter w/o _total
      "# HELP shoal_a_total a\n# TYPE shoal_a_total gauge\nshoal_a_total 1\n",
      "# HELP other a\n# TYPE other gauge\nother 1\n",                 // no shoal_ prefix
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a{h=\"a\"b\"} 1\n",  // unescaped quote
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a{h=\"a\\qb\"} 1\n", // bad escape
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a 1\nshoal_a 2\n",  // duplicate series
      "# HELP shoal_a a\n# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a 1\n",
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a one\n",
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a 1",                // no final newline
  };
  for (const char* text : broken) EXPECT_FALSE(ParseExposition(text).errors.empty()) << text;
  const Exposition ok = ParseExposition(
      "# HELP shoal_a a\n# TYPE shoal_a gauge\nshoal_a{h=\"x\\\\y\\\"z\\n\"} 2.5\n");
  EXPECT_TRUE(ok.errors.empty());
  EXPECT_EQ(ok.Value("shoal_a", {{"h", "x\\y\"z\n"}}), 2.5);
}

// ---- Helpers -------------------------------------------------------------------------------

std::unique_ptr<HttpStatusServer> StartOrDie(StatusFn fn) {
  auto server = HttpStatusServer::Start("127.0.0.1:0", std::move(fn));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

HttpResponse Get(const HttpStatusServer& server, const std::string& path) {
  return HttpGet("127.0.0.1", server.port(), path);
}

constexpr int64_t GiB = int64_t{1} << 30;

// ---- Tests ---------------------------------------------------------------------------------

TEST(HttpStatusTest, MetricsFollowTheExpositionFormatAndCarryTheSnapshot) {
  v1::ClusterStatus status = SampleClusterStatus();
  // A host name that needs every escape the format has.
  const std::string odd_host = "rack\"7\\b\nc";
  status.mutable_workers(2)->mutable_device()->set_host(odd_host);
  auto server = StartOrDie([status] { return status; });
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->port(), 0);

  const HttpResponse r = Get(*server, "/metrics");
  ASSERT_EQ(r.status, 200) << r.error;
  EXPECT_EQ(r.headers.at("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(r.headers.at("cache-control"), "no-store");

  const Exposition e = ParseExposition(r.body);
  for (const std::string& error : e.errors) ADD_FAILURE() << error;

  // Exactly the families the contract lists (plus the per-worker _info), each typed as promised.
  const std::map<std::string, std::string> expected_types = {
      {"shoal_build_info", "gauge"},
      {"shoal_workers", "gauge"},
      {"shoal_worker_info", "gauge"},
      {"shoal_worker_up", "gauge"},
      {"shoal_worker_tokens_per_second", "gauge"},
      {"shoal_worker_step", "gauge"},
      {"shoal_worker_heartbeat_age_seconds", "gauge"},
      {"shoal_worker_memory_budget_bytes", "gauge"},
      {"shoal_worker_memory_used_bytes", "gauge"},
      {"shoal_worker_device_flops", "gauge"},
      {"shoal_worker_memory_plan_peak_bytes", "gauge"},
      {"shoal_worker_predicted_step_seconds", "gauge"},
      {"shoal_job_step", "gauge"},
      {"shoal_job_loss", "gauge"},
      {"shoal_job_tokens_per_second", "gauge"},
      {"shoal_layout_version", "gauge"},
      {"shoal_layout_degree", "gauge"},
      {"shoal_layout_predicted_step_seconds", "gauge"},
      {"shoal_layout_predicted_tokens_per_second", "gauge"},
      {"shoal_joins_total", "counter"},
      {"shoal_leaves_total", "counter"},
      {"shoal_heartbeats_total", "counter"},
      {"shoal_lease_expirations_total", "counter"},
      {"shoal_layouts_total", "counter"},
      {"shoal_rejected_requests_total", "counter"},
  };
  EXPECT_EQ(e.type, expected_types);
  for (const auto& [name, help] : e.help) EXPECT_FALSE(help.empty()) << name;

  EXPECT_EQ(e.Value("shoal_build_info", {{"version", "0.1.0-test"}}), 1);
  // The sample has 4 alive workers and 1 dead; every state is present.
  EXPECT_EQ(e.Value("shoal_workers", {{"state", "alive"}}), 4);
  EXPECT_EQ(e.Value("shoal_workers", {{"state", "dead"}}), 1);
  EXPECT_EQ(e.Value("shoal_workers", {{"state", "draining"}}), 0);
  EXPECT_EQ(e.Value("shoal_workers", {{"state", "left"}}), 0);

  EXPECT_EQ(e.Value("shoal_job_step"), 1200);
  EXPECT_NEAR(e.Value("shoal_job_loss"), SampleLoss(1200), 1e-12);
  EXPECT_EQ(e.Value("shoal_job_tokens_per_second"), 36400);

  // Per worker, with the labels unescaped back to the originals.
  EXPECT_EQ(e.Value("shoal_worker_up", {{"worker", "rank0"}, {"host", "gpu-node-a"},
                                        {"device", "cuda"}}),
            1);
  EXPECT_EQ(e.Value("shoal_worker_up", {{"worker", "rank4"}, {"device", "cpu"}}), 0);
  EXPECT_EQ(e.Value("shoal_worker_up", {{"worker", "rank2"}, {"host", odd_host}}), 1);
  EXPECT_EQ(e.Value("shoal_worker_info",
                    {{"worker", "rank1"}, {"device_name", "NVIDIA A100-SXM4-40GB"}}),
            1);
  EXPECT_EQ(e.Value("shoal_worker_tokens_per_second", {{"worker", "rank1"}}), 26500);
  EXPECT_EQ(e.Value("shoal_worker_step", {{"worker", "rank4"}}), 950);
  EXPECT_EQ(e.Value("shoal_worker_step", {{"worker", "rank3"}}), 1200);
  // Heartbeat ages are now - last heartbeat, in seconds: 0.8 s and 47 s in the sample.
  EXPECT_NEAR(e.Value("shoal_worker_heartbeat_age_seconds", {{"worker", "rank0"}}), 0.8, 1e-12);
  EXPECT_NEAR(e.Value("shoal_worker_heartbeat_age_seconds", {{"worker", "rank4"}}), 47, 1e-12);
  EXPECT_EQ(e.Value("shoal_worker_memory_budget_bytes", {{"worker", "rank0"}, {"tier", "gpu"}}),
            static_cast<double>(80 * GiB));
  EXPECT_EQ(e.Value("shoal_worker_memory_budget_bytes", {{"worker", "rank2"}, {"tier", "host"}}),
            static_cast<double>(512 * GiB));
  EXPECT_EQ(e.Value("shoal_worker_memory_used_bytes", {{"worker", "rank3"}, {"tier", "gpu"}}),
            static_cast<double>(40 * GiB));
  EXPECT_EQ(e.Value("shoal_worker_device_flops", {{"worker", "rank0"}}), 51000e9);
  // The worker's own memory plan: only rank2 (a live CPU worker paging its states) has one.
  EXPECT_EQ(e.Value("shoal_worker_memory_plan_peak_bytes", {{"worker", "rank2"}, {"tier", "host"}}),
            static_cast<double>(9 * GiB));
  EXPECT_EQ(e.Value("shoal_worker_predicted_step_seconds", {{"worker", "rank2"}}), 3.25);
  {
    int plans = 0;
    e.Value("shoal_worker_predicted_step_seconds", {}, &plans);
    EXPECT_EQ(plans, 1);
  }
  // One series per worker and metric: 5 workers, 3 tiers each.
  int n = 0;
  e.Value("shoal_worker_up", {}, &n);
  EXPECT_EQ(n, 5);
  e.Value("shoal_worker_memory_used_bytes", {}, &n);
  EXPECT_EQ(n, 15);

  EXPECT_EQ(e.Value("shoal_layout_version"), 3);
  EXPECT_EQ(e.Value("shoal_layout_degree", {{"dim", "tp"}}), 1);
  EXPECT_EQ(e.Value("shoal_layout_degree", {{"dim", "pp"}}), 2);
  EXPECT_EQ(e.Value("shoal_layout_degree", {{"dim", "dp"}}), 2);
  EXPECT_NEAR(e.Value("shoal_layout_predicted_step_seconds"), 1.62, 1e-12);
  EXPECT_EQ(e.Value("shoal_layout_predicted_tokens_per_second"), 40450);

  EXPECT_EQ(e.Value("shoal_joins_total"), 6);
  EXPECT_EQ(e.Value("shoal_leaves_total"), 1);
  EXPECT_EQ(e.Value("shoal_heartbeats_total"), 98765);
  EXPECT_EQ(e.Value("shoal_lease_expirations_total"), 1);
  EXPECT_EQ(e.Value("shoal_layouts_total"), 3);
  EXPECT_EQ(e.Value("shoal_rejected_requests_total"), 2);
}

TEST(HttpStatusTest, EmptyStatusIsValidWithZeroWorkersAndNoLoss) {
  const Exposition e = ParseExposition(RenderPrometheus(v1::ClusterStatus()));
  for (const std::string& error : e.errors) ADD_FAILURE() << error;
  for (const char* state : {"alive", "draining", "dead", "left"}) {
    EXPECT_EQ(e.Value("shoal_workers", {{"state", state}}), 0) << state;
  }
  EXPECT_EQ(e.Value("shoal_job_step"), 0);
  // No step reported yet: no loss series at all rather than a made-up 0.
  EXPECT_EQ(e.type.count("shoal_job_loss"), 0u);
  EXPECT_EQ(e.type.count("shoal_worker_up"), 0u);
  EXPECT_EQ(e.Value("shoal_layout_version"), 0);
  EXPECT_EQ(e.Value("shoal_joins_total"), 0);
}

TEST(HttpStatusTest, LabelValuesAreAlwaysValidUtf8) {
  v1::ClusterStatus status = SampleClusterStatus();
  // Malformed: a lone continuation byte, a truncated 2-byte sequence, an overlong '/', a UTF-16
  // surrogate. Well-formed non-ASCII (the CJK host) must pass through unchanged.
  status.mutable_workers(0)->mutable_device()->set_host("a\x80" "b\xc3");
  status.mutable_workers(1)->mutable_device()->set_host("\xc0\xaf\xed\xa0\x80");
  status.mutable_workers(2)->mutable_device()->set_host("\xe8\x8a\x82\xe7\x82\xb9-7");
  const Exposition e = ParseExposition(RenderPrometheus(status));
  for (const std::string& error : e.errors) ADD_FAILURE() << error;
  const std::string fffd = "\xef\xbf\xbd";
  const auto up = [&](const char* worker, const std::string& host) {
    return e.Value("shoal_worker_up", {{"worker", worker}, {"host", host}});
  };
  EXPECT_EQ(up("rank0", "a" + fffd + "b" + fffd), 1);
  EXPECT_EQ(up("rank1", fffd + fffd + fffd + fffd + fffd), 1);
  EXPECT_EQ(up("rank2", "\xe8\x8a\x82\xe7\x82\xb9-7"), 1);
}

TEST(HttpStatusTest, EachRequestReadsAFreshSnapshot) {
  std::atomic<int64_t> step{41};
  auto server = StartOrDie([&step] {
    v1::ClusterStatus s;
    s.mutable_job_status()->set_step(step.load());
    return s;
  });
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(ParseExposition(Get(*server, "/metrics").body).Value("shoal_job_step"), 41);
  step = 42;
  EXPECT_EQ(ParseExposition(Get(*server, "/metrics").body).Value("shoal_job_step"), 42);
}

TEST(HttpStatusTest, StatusJsonParsesBackIntoTheSnapshot) {
  const v1::ClusterStatus status = SampleClusterStatus();
  auto server = StartOrDie([status] { return status; });
  ASSERT_NE(server, nullptr);
  const HttpResponse r = Get(*server, "/api/status");
  ASSERT_EQ(r.status, 200) << r.error;
  EXPECT_EQ(r.headers.at("content-type"), "application/json");
  EXPECT_EQ(r.headers.at("cache-control"), "no-store");
  // The proto's own field names, and primitives printed even when zero/empty.
  EXPECT_NE(r.body.find("\"worker_id\":\"rank0\""), std::string::npos);
  EXPECT_NE(r.body.find("\"rejected_requests_total\":\"2\""), std::string::npos);
  EXPECT_NE(r.body.find("\"layout_error\":\"\""), std::string::npos);

  v1::ClusterStatus parsed;
  const auto result = google::protobuf::util::JsonStringToMessage(r.body, &parsed);
  ASSERT_TRUE(result.ok()) << result.ToString();
  std::string diff;
  google::protobuf::util::MessageDifferencer differencer;
  differencer.ReportDifferencesToString(&diff);
  EXPECT_TRUE(differencer.Compare(status, parsed)) << diff;
  EXPECT_EQ(RenderStatusJson(status), r.body);
}

TEST(HttpStatusTest, ServesTheSelfContainedDashboard) {
  auto server = StartOrDie([] { return v1::ClusterStatus(); });
  ASSERT_NE(server, nullptr);
  const HttpResponse r = Get(*server, "/");
  ASSERT_EQ(r.status, 200) << r.error;
  EXPECT_EQ(r.headers.at("content-type"), "text/html; charset=utf-8");
  EXPECT_EQ(r.body, DashboardHtml());
  EXPECT_EQ(r.body.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(r.body.find("id=\"loss-curve\""), std::string::npos);
  EXPECT_NE(r.body.find("/api/status"), std::string::npos);
  // Nothing loaded from elsewhere: the machines may have no internet.
  for (const char* external :
       {"src=\"http", "href=\"http", "src='http", "href='http", "url(http", "@import", "//cdn"}) {
    EXPECT_EQ(r.body.find(external), std::string::npos) << external;
  }
}

TEST(HttpStatusTest, UnknownPathIs404) {
  auto server = StartOrDie([] { return v1::ClusterStatus(); });
  ASSERT_NE(server, nullptr);
  for (const char* path : {"/nope", "/metrics/extra", "/api", "/api/status/x"}) {
    const HttpResponse r = Get(*server, path);
    EXPECT_EQ(r.status, 404) << path << " " << r.error;
    EXPECT_NE(r.body.find("not found"), std::string::npos) << path;
  }
}

TEST(HttpStatusTest, MalformedListenAddressIsInvalidArgument) {
  for (const char* listen :
       {"", "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:http", "127.0.0.1:-1",
        "127.0.0.1:65536", "127.0.0.1:123456", "::1:80", "[::1:80", "[::1]80", "a b:80",
        "127.0.0.1:80 ", "no-such-host.invalid:0"}) {
    auto server = HttpStatusServer::Start(listen, [] { return v1::ClusterStatus(); });
    EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument)
        << "\"" << listen << "\": " << server.status();
    if (!server.ok()) {
      EXPECT_NE(server.status().message().find("listen address"), std::string::npos);
    }
  }
  auto no_fn = HttpStatusServer::Start("127.0.0.1:0", nullptr);
  EXPECT_EQ(no_fn.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HttpStatusTest, TakenPortIsUnavailable) {
  // A plain listening socket holds the port...
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  auto taken = HttpStatusServer::Start("127.0.0.1:" + std::to_string(port),
                                       [] { return v1::ClusterStatus(); });
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kUnavailable) << taken.status();
  ::close(fd);

  // ...and so does another status server (no SO_REUSEPORT sharing between coordinators).
  auto first = StartOrDie([] { return v1::ClusterStatus(); });
  ASSERT_NE(first, nullptr);
  auto second = HttpStatusServer::Start("127.0.0.1:" + std::to_string(first->port()),
                                        [] { return v1::ClusterStatus(); });
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_EQ(Get(*first, "/metrics").status, 200);
}

TEST(HttpStatusTest, StopIsIdempotentAndClosesThePort) {
  auto server = StartOrDie([] { return v1::ClusterStatus(); });
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  EXPECT_EQ(Get(*server, "/metrics").status, 200);
  server->Stop();
  server->Stop();
  EXPECT_EQ(HttpGet("127.0.0.1", port, "/metrics").status, 0);
  // The port is free again for a new server right away.
  auto again = HttpStatusServer::Start("127.0.0.1:" + std::to_string(port),
                                       [] { return v1::ClusterStatus(); });
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(HttpStatusTest, StopRightAfterStartAndWithAnIdleConnectionOpen) {
  // Stop before the accept loop may have started must not hang.
  for (int i = 0; i < 20; ++i) {
    auto server = StartOrDie([] { return v1::ClusterStatus(); });
    ASSERT_NE(server, nullptr);
    server->Stop();
  }
  // A client that connected and sent nothing holds a server thread; Stop still returns (the
  // keep-alive timeout bounds it).
  auto server = StartOrDie([] { return v1::ClusterStatus(); });
  ASSERT_NE(server, nullptr);
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(server->port()));
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  server->Stop();
  ::close(fd);
}

}  // namespace
}  // namespace shoal::scheduler
