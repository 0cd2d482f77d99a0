// The dashboard in a real browser: headless Chromium loads `/` from a real HttpStatusServer, runs
// its scripts (which fetch /api/status), and the test reads the rendered DOM: one row per worker,
// a loss polyline with one point per history entry drawn to scale, one box per pipeline stage with
// its layer range. A screenshot is kept as a CI artifact ($SHOAL_ARTIFACT_DIR, else
// <build dir>/artifacts/dashboard.png).
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "scheduler/http_status.h"
#include "tests/monitoring_util.h"
#include "tests/scheduler/sample_status.h"
#include "tests/test_util.h"

namespace shoal::scheduler {
namespace {

using ::shoal::testing::BrowserResult;
using ::shoal::testing::Contains;
using ::shoal::testing::HeadlessChromium;
using ::shoal::testing::RequireTool;
using ::shoal::testing::SampleClusterStatus;
using ::shoal::testing::SampleLoss;

// ---- Reading the serialized DOM ------------------------------------------------------------

struct Element {
  std::string tag;
  std::map<std::string, std::string> attrs;
  std::string html;  // from its start tag to its end tag
  std::string text;  // the text inside, tags removed
};

std::string Unescape(std::string s) {
  const std::pair<const char*, const char*> entities[] = {
      {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&#39;", "'"}, {"&nbsp;", " "},
      {"&amp;", "&"}};
  for (const auto& [from, to] : entities) {
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + 1)) {
      s.replace(p, std::strlen(from), to);
    }
  }
  return s;
}

// Every element of `tag` whose attributes include `want` (all of them, by exact value; a "class"
// wanted matches one of the classes). Nested elements of the same tag are balanced.
std::vector<Element> FindAll(const std::string& dom, const std::string& tag,
                             const std::map<std::string, std::string>& want) {
  static const std::regex attr_re(R"re(([A-Za-z_:][-A-Za-z0-9_:.]*)(?:="([^"]*)")?)re");
  std::vector<Element> found;
  const std::string open = "<" + tag, close = "</" + tag + ">";
  for (size_t pos = dom.find(open); pos != std::string::npos; pos = dom.find(open, pos + 1)) {
    const char after = dom[pos + open.size()];
    if (after != ' ' && after != '>') continue;
    const size_t start_end = dom.find('>', pos);
    if (start_end == std::string::npos) break;
    Element e;
    e.tag = tag;
    const std::string attrs = dom.substr(pos + open.size(), start_end - pos - open.size());
    for (auto it = std::sregex_iterator(attrs.begin(), attrs.end(), attr_re);
         it != std::sregex_iterator(); ++it) {
      e.attrs[(*it)[1]] = Unescape((*it)[2]);
    }
    bool match = true;
    for (const auto& [k, v] : want) {
      auto it = e.attrs.find(k);
      if (it == e.attrs.end()) {
        match = false;
      } else if (k == "class") {
        match = match && (" " + it->second + " ").find(" " + v + " ") != std::string::npos;
      } else {
        match = match && it->second == v;
      }
    }
    if (!match) continue;
    // Balance nested same-tag elements to find the end tag.
    int depth = 1;
    size_t cursor = start_end + 1, end = std::string::npos;
    while (depth > 0) {
      const size_t next_open = dom.find(open, cursor), next_close = dom.find(close, cursor);
      if (next_close == std::string::npos) break;
      if (next_open != std::string::npos && next_open < next_close) {
        ++depth;
        cursor = next_open + open.size();
      } else {
        --depth;
        cursor = next_close + close.size();
        end = cursor;
      }
    }
    e.html = dom.substr(pos, (depth == 0 ? end : dom.size()) - pos);
    std::string inner = e.html.substr(start_end + 1 - pos);
    inner = std::regex_replace(inner, std::regex("<[^>]*>"), " ");
    // Tags become spaces; runs of white space collapse to one, trimmed at both ends.
    inner = std::regex_replace(inner, std::regex("\\s+"), " ");
    const size_t first = inner.find_first_not_of(' ');
    inner = first == std::string::npos
                ? ""
                : inner.substr(first, inner.find_last_not_of(' ') - first + 1);
    e.text = Unescape(inner);
    found.push_back(std::move(e));
  }
  return found;
}

std::string TextOfId(const std::string& dom, const std::string& tag, const std::string& id) {
  const auto all = FindAll(dom, tag, {{"id", id}});
  return all.size() == 1 ? all[0].text : "<no unique #" + id + ">";
}

// ---- Fixture: a status server and the browser ----------------------------------------------

class DashboardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string missing = RequireTool(::shoal::testing::kChromiumBinary);
    ASSERT_TRUE(missing.empty()) << missing;
  }

  std::string Serve(const v1::ClusterStatus& status) {
    auto server = HttpStatusServer::Start("127.0.0.1:0", [status] { return status; });
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return "";
    server_ = *std::move(server);
    return "http://127.0.0.1:" + std::to_string(server_->port()) + "/";
  }

  // The DOM after the page's first fetches; fails the test if Chromium did not produce one.
  std::string RenderedDom(const std::string& url) {
    const BrowserResult r = HeadlessChromium().DumpDom(url);
    EXPECT_EQ(r.exit_code, 0) << r.log;
    EXPECT_TRUE(Contains(r.output, "</html>")) << "no DOM; chromium log:\n" << r.log;
    // The page reports each fetch in #conn; it must have reached the server.
    const std::string conn = TextOfId(r.output, "div", "conn");
    EXPECT_EQ(conn.rfind("updated ", 0), 0u) << conn;
    return r.output;
  }

  std::unique_ptr<HttpStatusServer> server_;
};

TEST_F(DashboardTest, RendersWorkersLossCurveAndLayoutFromTheStatus) {
  const v1::ClusterStatus status = SampleClusterStatus();
  const std::string dom = RenderedDom(Serve(status));

  // Header.
  const auto step = FindAll(dom, "span", {{"id", "step"}});
  ASSERT_EQ(step.size(), 1u);
  EXPECT_EQ(step[0].attrs.at("data-step"), "1200");
  EXPECT_EQ(step[0].text, "1200");
  const auto health = FindAll(dom, "span", {{"id", "health"}});
  ASSERT_EQ(health.size(), 1u);
  EXPECT_EQ(health[0].attrs.at("data-health"), "degraded");
  char loss_text[32];
  std::snprintf(loss_text, sizeof(loss_text), "%.4f", SampleLoss(1200));
  EXPECT_EQ(TextOfId(dom, "span", "loss"), loss_text);
  EXPECT_EQ(TextOfId(dom, "span", "layout-degrees"), "1×2×2");
  EXPECT_EQ(TextOfId(dom, "span", "layout-version"), "3");
  EXPECT_EQ(TextOfId(dom, "span", "worker-count"), "4/5");

  // One table row per worker, with its state and host.
  const auto rows = FindAll(dom, "tr", {{"class", "worker-row"}});
  ASSERT_EQ(rows.size(), static_cast<size_t>(status.workers_size()));
  for (const auto& w : status.workers()) {
    const auto row = FindAll(dom, "tr", {{"class", "worker-row"}, {"data-worker", w.worker_id()}});
    ASSERT_EQ(row.size(), 1u) << w.worker_id();
    EXPECT_EQ(row[0].attrs.at("data-state"),
              w.state() == v1::WORKER_STATE_ALIVE ? "alive" : "dead");
    EXPECT_TRUE(Contains(row[0].text, w.device().host())) << row[0].text;
    EXPECT_TRUE(Contains(row[0].text, w.device().device_name())) << row[0].text;
  }
  // rank2's heartbeat is 2.1 s old, rank4's 47 s.
  EXPECT_TRUE(Contains(FindAll(dom, "tr", {{"data-worker", "rank2"}})[0].text, "2.1 s"));
  EXPECT_TRUE(Contains(FindAll(dom, "tr", {{"data-worker", "rank4"}})[0].text, "47.0 s"));

  // One throughput bar per worker carrying its tokens/s.
  for (const auto& w : status.workers()) {
    const auto bar = FindAll(dom, "div", {{"class", "bar"}, {"data-worker", w.worker_id()}});
    ASSERT_EQ(bar.size(), 1u) << w.worker_id();
    EXPECT_DOUBLE_EQ(std::stod(bar[0].attrs.at("data-value")), w.last_stats().tokens_per_s());
  }

  // The loss curve: one vertex per history point, and the vertices are the history mapped by one
  // affine map per axis (x = a + b·step, y = c + d·loss with d < 0: higher loss is higher up).
  const auto line = FindAll(dom, "polyline", {{"id", "loss-line"}});
  ASSERT_EQ(line.size(), 1u);
  EXPECT_EQ(line[0].attrs.at("data-points"),
            std::to_string(::shoal::testing::kSampleHistoryPoints));
  std::vector<std::pair<double, double>> xy;
  std::istringstream points(line[0].attrs.at("points"));
  std::string pair;
  while (points >> pair) {
    const size_t comma = pair.find(',');
    ASSERT_NE(comma, std::string::npos) << pair;
    xy.emplace_back(std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1)));
  }
  ASSERT_EQ(xy.size(), static_cast<size_t>(status.job_status().history_size()));
  const auto& h = status.job_status().history();
  const size_t n = xy.size() - 1;
  const double bx = (xy[n].first - xy[0].first) / static_cast<double>(h[n].step() - h[0].step());
  const double dy = (xy[n].second - xy[0].second) / (h[n].loss() - h[0].loss());
  EXPECT_GT(bx, 0);
  EXPECT_LT(dy, 0);
  for (size_t i = 0; i < xy.size(); ++i) {
    // Coordinates are written with one decimal: allow a rounding error of 0.05 px per end.
    EXPECT_NEAR(xy[i].first, xy[0].first + bx * static_cast<double>(h[i].step() - h[0].step()),
                0.11) << i;
    EXPECT_NEAR(xy[i].second, xy[0].second + dy * (h[i].loss() - h[0].loss()), 0.11) << i;
  }
  // Axes have tick labels.
  EXPECT_GE(FindAll(dom, "text", {{"class", "tick"}}).size(), 4u);

  // The layout: one box per stage, with its layer range, its workers and a width weight equal
  // to its number of blocks.
  EXPECT_EQ(FindAll(dom, "div", {{"class", "replica"}}).size(), 2u);
  const auto stages = FindAll(dom, "div", {{"class", "stage"}});
  ASSERT_EQ(stages.size(), ::shoal::testing::SampleStages().size());
  for (const auto& expect : ::shoal::testing::SampleStages()) {
    const auto box = FindAll(dom, "div",
                             {{"class", "stage"},
                              {"data-replica", std::to_string(expect.replica)},
                              {"data-stage", std::to_string(expect.stage)}});
    ASSERT_EQ(box.size(), 1u) << expect.replica << "/" << expect.stage;
    EXPECT_EQ(box[0].attrs.at("data-first-layer"), std::to_string(expect.first_layer));
    EXPECT_EQ(box[0].attrs.at("data-end-layer"), std::to_string(expect.end_layer));
    EXPECT_TRUE(Contains(box[0].text, "layers " + std::to_string(expect.first_layer) + "–" +
                                          std::to_string(expect.end_layer - 1)))
        << box[0].text;
    EXPECT_TRUE(Contains(box[0].text, expect.worker)) << box[0].text;
    EXPECT_TRUE(Contains(box[0].attrs.at("style"),
                         "flex-grow: " + std::to_string(expect.end_layer - expect.first_layer)))
        << box[0].attrs.at("style");
  }
  EXPECT_TRUE(Contains(TextOfId(dom, "div", "standby"), "rank4"));
  // Error banner hidden when there is no layout error.
  const auto error = FindAll(dom, "div", {{"id", "layout-error"}});
  ASSERT_EQ(error.size(), 1u);
  EXPECT_EQ(error[0].attrs.count("hidden"), 1u);
}

TEST_F(DashboardTest, EmptyClusterShowsWaitingAndTheLayoutError) {
  v1::ClusterStatus status;
  status.set_health("waiting");
  status.set_coordinator_version("0.1.0-test");
  status.set_layout_error("the model fits on no device: needs 12.0 GiB, largest has 8.0 GiB");
  const std::string dom = RenderedDom(Serve(status));

  EXPECT_EQ(FindAll(dom, "span", {{"id", "health"}})[0].attrs.at("data-health"), "waiting");
  EXPECT_EQ(TextOfId(dom, "span", "step"), "0");
  EXPECT_EQ(TextOfId(dom, "span", "layout-degrees"), "waiting");
  EXPECT_TRUE(FindAll(dom, "tr", {{"class", "worker-row"}}).empty());
  EXPECT_TRUE(FindAll(dom, "div", {{"class", "stage"}}).empty());
  EXPECT_TRUE(Contains(TextOfId(dom, "div", "layout"), "waiting for a layout"));
  EXPECT_TRUE(Contains(TextOfId(dom, "div", "throughput"), "waiting for workers"));
  const auto line = FindAll(dom, "polyline", {{"id", "loss-line"}});
  ASSERT_EQ(line.size(), 1u);
  EXPECT_EQ(line[0].attrs.at("data-points"), "0");
  const auto error = FindAll(dom, "div", {{"id", "layout-error"}});
  ASSERT_EQ(error.size(), 1u);
  EXPECT_EQ(error[0].attrs.count("hidden"), 0u);
  EXPECT_TRUE(Contains(error[0].text, status.layout_error())) << error[0].text;
}

TEST_F(DashboardTest, HostileNamesAreShownAsText) {
  v1::ClusterStatus status = SampleClusterStatus();
  status.mutable_workers(0)->mutable_device()->set_host("<img src=x onerror=alert(1)>");
  const std::string dom = RenderedDom(Serve(status));
  // Rendered as text (escaped in the serialized DOM), never as an element.
  EXPECT_TRUE(FindAll(dom, "img", {}).empty());
  EXPECT_TRUE(Contains(FindAll(dom, "tr", {{"data-worker", "rank0"}})[0].text,
                       "<img src=x onerror=alert(1)>"));
}

// The PNG's width and height from its IHDR chunk (bytes 16..23, big-endian).
std::pair<uint32_t, uint32_t> PngSize(const std::string& png) {
  const auto be32 = [&](size_t at) {
    return (static_cast<uint32_t>(static_cast<unsigned char>(png[at])) << 24) |
           (static_cast<uint32_t>(static_cast<unsigned char>(png[at + 1])) << 16) |
           (static_cast<uint32_t>(static_cast<unsigned char>(png[at + 2])) << 8) |
           static_cast<uint32_t>(static_cast<unsigned char>(png[at + 3]));
  };
  return png.size() >= 24 ? std::make_pair(be32(16), be32(20)) : std::make_pair(0u, 0u);
}

TEST_F(DashboardTest, ScreenshotIsKeptAsAnArtifact) {
  const std::string url = Serve(SampleClusterStatus());
  const std::string dir = ::shoal::testing::ArtifactDir();
  const std::string png_path = dir + "/dashboard.png";
  std::remove(png_path.c_str());

  const BrowserResult r = HeadlessChromium().Screenshot(url, png_path, 1280, 900);
  EXPECT_EQ(r.exit_code, 0) << r.log;
  const std::string png = ::shoal::testing::ReadTextFile(png_path);
  ASSERT_GE(png.size(), 8u) << "no screenshot at " << png_path << "; chromium log:\n" << r.log;
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(PngSize(png), std::make_pair(1280u, 900u));
  // A blank 1280x900 page compresses to a few KB; the drawn dashboard is much larger.
  EXPECT_GT(png.size(), 20u * 1024) << png_path;
  std::printf("dashboard screenshot: %s (%zu bytes)\n", png_path.c_str(), png.size());
}

}  // namespace
}  // namespace shoal::scheduler
