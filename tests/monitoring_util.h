// Test helpers for the monitoring side of shoal: a plain HTTP/1.0 GET over a socket (independent
// of the server's HTTP library), a real Prometheus server scraping a target, and headless Chromium
// rendering a page (DOM after its scripts ran, and a screenshot).
//
// The tools are Debian packages that `scripts/setup --with-test` installs; a test that needs one
// calls RequireTool() and fails (not skips) with that hint when it is missing.
//
// Every call is bounded: sockets have timeouts, Prometheus is stopped with SIGTERM then SIGKILL,
// Chromium runs under `timeout`. Not thread-safe per object.
#ifndef SHOAL_TESTS_MONITORING_UTIL_H_
#define SHOAL_TESTS_MONITORING_UTIL_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

extern char** environ;

namespace shoal::testing {

inline constexpr char kPrometheusBinary[] = "/usr/bin/prometheus";
inline constexpr char kChromiumBinary[] = "/usr/bin/chromium";

// "" when `path` is an executable file, else a message saying how to install it.
// Where tests keep files for people to look at after a CI run (dashboard screenshots):
// $SHOAL_ARTIFACT_DIR, else <build dir>/artifacts. Created if missing.
inline std::string ArtifactDir() {
  std::string dir;
  if (const char* env = std::getenv("SHOAL_ARTIFACT_DIR"); env != nullptr && *env != '\0') {
    dir = env;
  } else {
    const std::string binary = SHOAL_BINARY;  // the build directory holds the binary
    dir = binary.substr(0, binary.rfind('/')) + "/artifacts";
  }
  RunCommand("mkdir -p '" + dir + "'");
  return dir;
}

inline std::string RequireTool(const std::string& path) {
  if (::access(path.c_str(), X_OK) == 0) return "";
  return path + " is not installed; `scripts/setup --with-test` installs the tools the tests need";
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct HttpResponse {
  int status = 0;                              // 0: no response (see `error`)
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  std::string error;
};

// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
inline std::string UrlEncode(const std::string& text) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// One GET to http://host:port/path as HTTP/1.0 (so the body is never chunked and ends when the
// server closes), with `timeout_s` on connect, send and every read.
inline HttpResponse HttpGet(const std::string& host, int port, const std::string& path,
                            int timeout_s = 10) {
  HttpResponse r;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addrs = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &addrs) != 0) {
    r.error = "cannot resolve " + host;
    return r;
  }
  int fd = -1;
  for (addrinfo* a = addrs; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    timeval tv{timeout_s, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(addrs);
  if (fd < 0) {
    r.error = "cannot connect to " + host + ":" + std::to_string(port) + ": " +
              std::strerror(errno);
    return r;
  }
  const std::string request =
      "GET " + path + " HTTP/1.0\r\nHost: " + host + ":" + std::to_string(port) +
      "\r\nUser-Agent: shoal-test\r\nAccept: */*\r\n\r\n";
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      r.error = std::string("send: ") + std::strerror(errno);
      ::close(fd);
      return r;
    }
    sent += static_cast<size_t>(n);
  }
  std::string raw;
  char buf[16384];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      r.error = std::string("recv: ") + std::strerror(errno);
      ::close(fd);
      return r;
    }
    raw.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.compare(0, 5, "HTTP/") != 0) {
    r.error = "malformed response: " + raw.substr(0, 200);
    return r;
  }
  const std::string head = raw.substr(0, head_end);
  r.body = raw.substr(head_end + 4);
  size_t line_end = head.find("\r\n");
  const std::string status_line = head.substr(0, line_end);
  const size_t sp = status_line.find(' ');
  r.status = sp == std::string::npos ? 0 : std::atoi(status_line.c_str() + sp + 1);
  while (line_end != std::string::npos) {
    const size_t start = line_end + 2;
    line_end = head.find("\r\n", start);
    const std::string line = head.substr(start, line_end == std::string::npos ? std::string::npos
                                                                              : line_end - start);
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    size_t v = colon + 1;
    while (v < line.size() && line[v] == ' ') ++v;
    r.headers[name] = line.substr(v);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Processes

// Starts `argv` with stdout and stderr appended to `log_path`. Returns the pid, or -1.
inline pid_t SpawnLogged(const std::vector<std::string>& argv, const std::string& log_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

// SIGTERM, then SIGKILL if `pid` has not exited after `grace`. Returns its wait status, or -1.
inline int TerminateProcess(pid_t pid, std::chrono::milliseconds grace) {
  if (pid <= 0) return -1;
  ::kill(pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + grace;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGKILL);
  return ::waitpid(pid, &status, 0) == pid ? status : -1;
}

// ---------------------------------------------------------------------------------------------
// Prometheus

// A real Prometheus server on 127.0.0.1 with its storage in a temporary directory, scraping
// each target ("127.0.0.1:PORT", path /metrics) every second as job `job`. Stopped (SIGTERM, then
// SIGKILL after 10 s) by Stop() or the destructor.
class PrometheusServer {
 public:
  // nullptr and `*error` set when the binary is missing or the server does not become ready
  // within `ready_timeout`.
  static std::unique_ptr<PrometheusServer> Start(
      const std::vector<std::string>& targets, const std::string& job, std::string* error,
      std::chrono::seconds ready_timeout = std::chrono::seconds(30)) {
    if (std::string missing = RequireTool(kPrometheusBinary); !missing.empty()) {
      *error = missing;
      return nullptr;
    }
    std::unique_ptr<PrometheusServer> p(new PrometheusServer());
    std::string target_list;
    for (const auto& t : targets) target_list += (target_list.empty() ? "'" : ", '") + t + "'";
    WriteTextFile(p->dir_ / "prometheus.yml",
                  "global:\n"
                  "  scrape_interval: 1s\n"
                  "  scrape_timeout: 1s\n"
                  "  evaluation_interval: 1s\n"
                  "scrape_configs:\n"
                  "  - job_name: '" + job + "'\n"
                  "    metrics_path: /metrics\n"
                  "    static_configs:\n"
                  "      - targets: [" + target_list + "]\n");
    // The port is free a moment before Prometheus binds it; a lost race shows as "not ready"
    // with "address already in use" in the log, so retry with another port a few times.
    const auto deadline = std::chrono::steady_clock::now() + ready_timeout;
    for (int attempt = 0; attempt < 3; ++attempt) {
      p->port_ = FreePort();
      p->pid_ = SpawnLogged(
          {kPrometheusBinary, "--config.file=" + (p->dir_ / "prometheus.yml"),
           "--storage.tsdb.path=" + (p->dir_ / "data"),
           "--web.listen-address=127.0.0.1:" + std::to_string(p->port_),
           "--storage.tsdb.retention.time=1h", "--log.level=warn"},
          p->log_path());
      if (p->pid_ < 0) {
        *error = "cannot start " + std::string(kPrometheusBinary);
        return nullptr;
      }
      while (std::chrono::steady_clock::now() < deadline) {
        if (HttpGet("127.0.0.1", p->port_, "/-/ready", 2).status == 200) return p;
        int status = 0;
        if (::waitpid(p->pid_, &status, WNOHANG) == p->pid_) {
          p->pid_ = -1;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      if (p->pid_ > 0) break;  // running but never ready: do not retry
    }
    *error = "prometheus did not become ready; its log:\n" + p->log();
    return nullptr;
  }

  ~PrometheusServer() { Stop(); }

  int port() const { return port_; }
  std::string log_path() const { return dir_ / "prometheus.log"; }
  std::string log() const { return ReadTextFile(log_path()); }

  // GET /api/v1/query?query=<promql>: the JSON body (see `status` and `error` on failure).
  HttpResponse Query(const std::string& promql) const {
    return HttpGet("127.0.0.1", port_, "/api/v1/query?query=" + UrlEncode(promql));
  }
  HttpResponse Get(const std::string& path) const { return HttpGet("127.0.0.1", port_, path); }

  // Returns Prometheus's exit status (-1 if it was not running).
  int Stop() {
    const int status = TerminateProcess(pid_, std::chrono::seconds(10));
    pid_ = -1;
    return status;
  }

 private:
  PrometheusServer() = default;
  TempDir dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Chromium

struct BrowserResult {
  int exit_code = -1;
  std::string output;  // stdout: the DOM for DumpDom
  std::string log;     // stderr
};

// Headless Chromium on `url` with a fresh profile. `virtual_time_ms` lets the page's timers and
// fetches run that long (in virtual time) before the DOM is dumped or the screenshot taken.
// `timeout_s` bounds the whole run.
class HeadlessChromium {
 public:
  BrowserResult DumpDom(const std::string& url, int virtual_time_ms = 5000,
                        int timeout_s = 60) const {
    return Run({"--dump-dom", url}, virtual_time_ms, timeout_s, 1280, 900);
  }

  BrowserResult Screenshot(const std::string& url, const std::string& png_path, int width = 1280,
                           int height = 900, int virtual_time_ms = 5000,
                           int timeout_s = 60) const {
    return Run({"--screenshot=" + png_path, "--hide-scrollbars", url}, virtual_time_ms, timeout_s,
               width, height);
  }

 private:
  static std::string Quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  }

  BrowserResult Run(const std::vector<std::string>& extra, int virtual_time_ms, int timeout_s,
                    int width, int height) const {
    BrowserResult r;
    if (std::string missing = RequireTool(kChromiumBinary); !missing.empty()) {
      r.log = missing;
      return r;
    }
    TempDir profile;
    // --headless is the new headless mode in current Chromium; no sandbox (tests may run as
    // root), no GPU (none here), /tmp instead of a small /dev/shm in containers; no first-run,
    // sync or update noise from a fresh profile.
    std::string command = "timeout -k 5 " + std::to_string(timeout_s) + " " +
                          std::string(kChromiumBinary) +
                          " --headless --no-sandbox --disable-gpu --disable-dev-shm-usage"
                          " --no-first-run --no-default-browser-check --disable-extensions"
                          " --disable-background-networking --disable-sync --mute-audio"
                          " --user-data-dir=" + Quote(profile.path()) +
                          " --window-size=" + std::to_string(width) + "," +
                          std::to_string(height) +
                          " --virtual-time-budget=" + std::to_string(virtual_time_ms);
    for (const auto& a : extra) command += " " + Quote(a);
    // stderr to a file (Chromium logs D-Bus complaints there), stdout captured.
    const std::string log = profile / "chromium.log";
    command = "{ " + command + " 2>" + Quote(log) + "; }";
    FILE* p = ::popen(command.c_str(), "r");
    if (p == nullptr) {
      r.log = "popen failed";
      return r;
    }
    char buf[16384];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.output.append(buf, n);
    const int status = ::pclose(p);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.log = ReadTextFile(log);
    return r;
  }
};

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_MONITORING_UTIL_H_
