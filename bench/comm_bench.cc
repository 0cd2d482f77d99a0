#include "bench/comm_bench.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_runs.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "common/file_util.h"
#include "common/status.h"

namespace shoal::bench {
namespace {

using ::shoal::comm::Backend;
using ::shoal::comm::BackendOptions;
using ::shoal::comm::CreateBackend;
using ::shoal::comm::MakePrefixStore;
using ::shoal::comm::MakeTcpStore;
using ::shoal::comm::ReduceOp;
using ::shoal::comm::Store;
using ::shoal::comm::TcpStoreOptions;
using ::shoal::comm::Work;

// ---- Raw TCP over 127.0.0.1: the yardstick for what a backend gets out of the loopback. ----

class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  ScopedFd& operator=(ScopedFd&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

absl::Status SocketError(absl::string_view what) {
  return absl::UnavailableError(
      absl::StrCat("comm bench: loopback tcp: ", what, ": ", std::strerror(errno)));
}

// Waits until `fd` is readable (or writable), at most `timeout`.
absl::Status PollFor(int fd, short events, absl::Duration timeout, absl::string_view what) {
  pollfd p{fd, events, 0};
  const int rc = ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  if (rc < 0) return SocketError(what);
  if (rc == 0) {
    return absl::DeadlineExceededError(absl::StrCat("comm bench: loopback tcp: ", what,
                                                    ": nothing within ",
                                                    absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

void SetTimeouts(int fd, absl::Duration timeout) {
  timeval tv = absl::ToTimeval(timeout);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// A listening socket on 127.0.0.1 and a free port chosen by the kernel.
absl::Status Listen(ScopedFd* fd, int* port) {
  *fd = ScopedFd(::socket(AF_INET, SOCK_STREAM, 0));
  if (fd->get() < 0) return SocketError("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(fd->get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return SocketError("bind 127.0.0.1:0");
  }
  if (::listen(fd->get(), 1) != 0) return SocketError("listen");
  socklen_t len = sizeof(addr);
  if (::getsockname(fd->get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return SocketError("getsockname");
  }
  *port = ntohs(addr.sin_port);
  return absl::OkStatus();
}

constexpr size_t kChunk = size_t{4} << 20;  // bytes per send()/recv() call

// Accepts one connection, reads `bytes`, answers one byte.
absl::Status Receive(int listen_fd, int64_t bytes, absl::Duration timeout) {
  SHOAL_RETURN_IF_ERROR(PollFor(listen_fd, POLLIN, timeout, "accept"));
  ScopedFd conn(::accept(listen_fd, nullptr, nullptr));
  if (conn.get() < 0) return SocketError("accept");
  SetTimeouts(conn.get(), timeout);
  std::vector<char> buffer(kChunk);
  int64_t left = bytes;
  while (left > 0) {
    const ssize_t n = ::recv(conn.get(), buffer.data(),
                             static_cast<size_t>(std::min<int64_t>(left, kChunk)), 0);
    if (n <= 0) return n == 0 ? absl::UnavailableError("comm bench: loopback tcp: sender closed early")
                              : SocketError("recv");
    left -= n;
  }
  const char ack = 1;
  if (::send(conn.get(), &ack, 1, MSG_NOSIGNAL) != 1) return SocketError("send ack");
  return absl::OkStatus();
}

// Connects to 127.0.0.1:port, streams `bytes`, waits for the one-byte answer; the seconds taken.
absl::StatusOr<double> Stream(int port, int64_t bytes, absl::Duration timeout) {
  ScopedFd fd(::socket(AF_INET, SOCK_STREAM, 0));
  if (fd.get() < 0) return SocketError("socket");
  SetTimeouts(fd.get(), timeout);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return SocketError(absl::StrCat("connect 127.0.0.1:", port));
  }
  std::vector<char> buffer(kChunk, 'x');
  const auto start = std::chrono::steady_clock::now();
  int64_t left = bytes;
  while (left > 0) {
    const ssize_t n = ::send(fd.get(), buffer.data(),
                             static_cast<size_t>(std::min<int64_t>(left, kChunk)), MSG_NOSIGNAL);
    if (n <= 0) return SocketError("send");
    left -= n;
  }
  char ack = 0;
  if (::recv(fd.get(), &ack, 1, 0) != 1) return SocketError("recv ack");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Both ends in this process: a receiving thread and this one sending.
absl::StatusOr<double> StreamInProcess(int64_t bytes, absl::Duration timeout) {
  ScopedFd listener;
  int port = 0;
  SHOAL_RETURN_IF_ERROR(Listen(&listener, &port));
  absl::Status received;
  std::thread receiver([&] { received = Receive(listener.get(), bytes, timeout); });
  absl::StatusOr<double> seconds = Stream(port, bytes, timeout);
  receiver.join();
  if (!received.ok()) return received;
  return seconds;
}

// ---- The all-reduce sweep. ----

std::string HumanBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%g GiB", bytes / double(1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%g MiB", bytes / double(1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%g KiB", bytes / double(1 << 10));
  return absl::StrFormat("%d B", bytes);
}

absl::Status WaitOn(std::unique_ptr<Work> work) { return work->Wait(); }

// The largest of every rank's `value`.
absl::StatusOr<double> MaxOverRanks(Backend& backend, double value) {
  at::Tensor t = at::full({1}, value, at::kDouble);
  SHOAL_RETURN_IF_ERROR(WaitOn(backend.AllReduce(t, ReduceOp::kMax)));
  return t.item<double>();
}

int64_t HostId() {
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  return static_cast<int64_t>(std::hash<std::string>{}(name) & 0x7fffffffffffffff);
}

// The raw loopback bandwidth in GB/s (rank 0's answer; other ranks get nullopt), or a failure
// rank 0 reports and the bench survives. Collective.
absl::StatusOr<std::optional<double>> MeasureLoopback(Backend& backend,
                                                      const CommBenchOptions& o) {
  const int n = backend.size();
  const int rank = backend.rank();
  bool two_processes = false;
  if (n >= 2) {
    at::Tensor mine = at::full({1}, HostId(), at::kLong);
    at::Tensor all = at::empty({n}, at::kLong);
    SHOAL_RETURN_IF_ERROR(WaitOn(backend.AllGather(all, mine)));
    two_processes = all[0].item<int64_t>() == all[1].item<int64_t>();
  }
  absl::StatusOr<double> seconds = absl::UnknownError("not measured");
  if (two_processes) {
    // Rank 1 listens and tells everyone its port (-1: it could not listen).
    ScopedFd listener;
    int port = -1;
    absl::Status listened = absl::OkStatus();
    if (rank == 1) {
      listened = Listen(&listener, &port);
      if (!listened.ok()) port = -1;
    }
    at::Tensor port_tensor = at::full({1}, int64_t{port}, at::kLong);
    SHOAL_RETURN_IF_ERROR(WaitOn(backend.Broadcast(port_tensor, 1)));
    port = static_cast<int>(port_tensor.item<int64_t>());
    if (rank == 1 && listened.ok()) {
      // A failure here shows on rank 0 too (its stream or answer fails), which reports it.
      Receive(listener.get(), o.loopback_bytes, o.timeout).IgnoreError();
    }
    if (rank == 0) {
      seconds = port < 0 ? absl::UnavailableError("comm bench: rank 1 could not listen on 127.0.0.1")
                         : Stream(port, o.loopback_bytes, o.timeout);
    }
  } else if (rank == 0) {
    seconds = StreamInProcess(o.loopback_bytes, o.timeout);
  }
  if (rank != 0) return std::optional<double>();
  if (!seconds.ok()) return seconds.status();
  return std::optional<double>(static_cast<double>(o.loopback_bytes) / *seconds / 1e9);
}

struct SizeResult {
  int64_t bytes;
  double seconds;  // per all-reduce, slowest rank
};

absl::Status Sweep(Backend& backend, const CommBenchOptions& o, std::ostream& out) {
  const int n = backend.size();
  const bool report = backend.rank() == 0;
  const double bus_factor = n > 1 ? 2.0 * (n - 1) / n : 0.0;
  if (report) {
    out << absl::StrFormat("comm bench: %s, %d rank%s, float32 allreduce (sum), %d iterations\n",
                           backend.name(), n, n == 1 ? "" : "s", o.iterations);
  }

  absl::StatusOr<std::optional<double>> loopback = std::optional<double>();
  if (o.loopback_bytes > 0) loopback = MeasureLoopback(backend, o);
  if (report && o.loopback_bytes > 0) {
    if (loopback.ok()) {
      out << absl::StrFormat("tcp loopback 127.0.0.1: %s in one stream: %.2f GB/s\n",
                             HumanBytes(o.loopback_bytes), **loopback);
    } else {
      out << "tcp loopback 127.0.0.1: failed: " << loopback.status().message() << "\n";
    }
  }

  std::vector<SizeResult> results;
  for (int64_t bytes = o.min_bytes; bytes <= o.max_bytes; bytes *= 4) {
    at::Tensor t = at::ones({bytes / 4}, at::kFloat);
    for (int i = 0; i < o.warmup; ++i) {
      SHOAL_RETURN_IF_ERROR(WaitOn(backend.AllReduce(t, ReduceOp::kSum)));
      if (i == 0 && t[0].item<float>() != static_cast<float>(n)) {
        return absl::InternalError(absl::StrCat("comm bench: allreduce of ", HumanBytes(bytes),
                                                " gave ", t[0].item<float>(), ", expected ", n));
      }
    }
    SHOAL_RETURN_IF_ERROR(WaitOn(backend.Barrier()));
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < o.iterations; ++i) {
      SHOAL_RETURN_IF_ERROR(WaitOn(backend.AllReduce(t, ReduceOp::kSum)));
    }
    const double mine =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
        o.iterations;
    SHOAL_ASSIGN_OR_RETURN(const double seconds, MaxOverRanks(backend, mine));
    results.push_back({bytes, seconds});
    if (report) {
      out << absl::StrFormat("allreduce %9s  time %10.3f ms  algbw %7.3f GB/s  busbw %7.3f GB/s\n",
                             HumanBytes(bytes), seconds * 1e3, bytes / seconds / 1e9,
                             bus_factor * bytes / seconds / 1e9)
          << std::flush;
    }
  }

  if (report) {
    std::vector<std::string> rows;
    for (const SizeResult& r : results) {
      rows.push_back(absl::StrFormat(
          R"({"bytes":%d,"time_ms":%.6g,"algbw_gbps":%.6g,"busbw_gbps":%.6g})", r.bytes,
          r.seconds * 1e3, r.bytes / r.seconds / 1e9, bus_factor * r.bytes / r.seconds / 1e9));
    }
    const std::string loopback_json =
        loopback.ok() && loopback->has_value() ? absl::StrFormat("%.6g", **loopback) : "null";
    out << absl::StrFormat(
               R"({"bench":"comm","backend":"%s","world_size":%d,"op":"allreduce","dtype":"float32","iterations":%d,"tcp_loopback_gbps":%s,"results":[%s]})",
               backend.name(), n, o.iterations, loopback_json, absl::StrJoin(rows, ","))
        << "\n"
        << std::flush;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunCommBench(const CommBenchOptions& options) {
  if (options.min_bytes < 4 || options.min_bytes % 4 != 0 ||
      options.max_bytes < options.min_bytes || options.iterations < 1 || options.warmup < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "comm bench: need 4 <= min_bytes (a multiple of 4) <= max_bytes, iterations >= 1 and "
        "warmup >= 1; got min_bytes ", options.min_bytes, ", max_bytes ", options.max_bytes,
        ", iterations ", options.iterations, ", warmup ", options.warmup));
  }
  BackendOptions b;
  b.kind = options.backend;
  b.rank = options.rank;
  b.world_size = options.world_size;
  b.timeout = options.timeout;
  b.gloo_hostname = options.gloo_hostname;
  if (options.backend != "mpi") {
    std::shared_ptr<Store> store = options.store;
    if (store == nullptr) {
      TcpStoreOptions s;
      s.host = options.master_addr;
      s.port = options.master_port;
      s.is_server = options.rank == 0;
      s.world_size = options.world_size;
      s.timeout = options.timeout;
      SHOAL_ASSIGN_OR_RETURN(store, MakeTcpStore(s));
    }
    b.store = MakePrefixStore("comm_bench", store);
  }
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(b));
  return Sweep(*backend, options, options.out != nullptr ? *options.out : std::cout);
}

}  // namespace shoal::bench

namespace shoal::bench {

// `shoal bench comm`: inside a rank, run the benchmark; outside, start the ranks first.
int CommBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{"All-reduce time and bus bandwidth, 4 KB .. 256 MB, beside raw loopback TCP"};
  app.name("shoal bench comm");
  std::string backend = "gloo";
  int ranks = 2;
  int64_t max_mb = 256;
  int iterations = 10;
  app.add_option("--backend", backend, "gloo or mpi")
      ->check(CLI::IsMember({"gloo", "mpi", "nccl"}))
      ->capture_default_str();
  app.add_option("--ranks", ranks, "Ranks to start (when not already in a job)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-mb", max_mb, "Largest message (MB)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--iterations", iterations, "Timed all-reduces per size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  absl::StatusOr<RankEnv> env = host.detect_rank();
  if (!env.ok()) return ReportFailure(host, env.status());
  if (env->world_size == 1 && ranks > 1) {
    // Every rank runs this same command line and finds itself inside the job.
    std::string args = " 'bench'";
    for (int i = 0; i < argc; ++i) args += std::string(" '") + argv[i] + "'";
    const std::string self = SelfExecutablePath();
    const std::string cmd =
        backend == "mpi"
            ? absl::StrCat("mpirun --allow-run-as-root --oversubscribe -np ", ranks, " ", self,
                           args)
            : absl::StrCat(self, " run --standalone --nproc-per-node ", ranks, " --", args);
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  }
  CommBenchOptions o;
  o.backend = backend;
  o.rank = env->rank;
  o.world_size = env->world_size;
  o.master_addr = env->master_addr;
  o.master_port = env->master_port;
  o.max_bytes = max_mb << 20;
  o.iterations = iterations;
  const absl::Status s = RunCommBench(o);
  return s.ok() ? 0 : ReportFailure(host, s);
}

}  // namespace shoal::bench
