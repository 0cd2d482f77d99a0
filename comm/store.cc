#include "comm/store.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <exception>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/c10d_status.h"

namespace shoal::comm {
namespace {

using internal::StatusFromException;

std::vector<uint8_t> ToBytes(const std::string& s) { return {s.begin(), s.end()}; }

// Every store kind is a c10d store underneath; this class turns its exceptions into statuses.
class C10dBackedStore final : public Store {
 public:
  // `description` names the store in messages: "tcp store 127.0.0.1:29500".
  C10dBackedStore(c10::intrusive_ptr<c10d::Store> store, std::string description, int port,
                  std::shared_ptr<Store> base = nullptr)
      : store_(std::move(store)),
        description_(std::move(description)),
        port_(port),
        base_(std::move(base)) {}

  absl::Status Set(const std::string& key, const std::string& value) override {
    try {
      store_->set(key, ToBytes(value));
      return absl::OkStatus();
    } catch (...) {
      return StatusFromException(std::current_exception(),
                                 absl::StrCat(description_, ": set '", key, "'"),
                                 absl::StatusCode::kUnavailable);
    }
  }

  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override {
    if (absl::Status s = Wait({key}, timeout); !s.ok()) return s;
    try {
      const std::vector<uint8_t> value = store_->get(key);
      return std::string(value.begin(), value.end());
    } catch (...) {
      return StatusFromException(std::current_exception(),
                                 absl::StrCat(description_, ": get '", key, "'"),
                                 absl::StatusCode::kUnavailable);
    }
  }

  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) override {
    try {
      return store_->add(key, delta);
    } catch (...) {
      return StatusFromException(std::current_exception(),
                                 absl::StrCat(description_, ": add to '", key, "'"),
                                 absl::StatusCode::kUnavailable);
    }
  }

  // Polls check() rather than calling c10d's wait(keys, timeout): in LibTorch 1.13 a TCPStore
  // wait that times out leaves the server's late "stop waiting" reply in the socket, where the
  // next command would read it as its own answer. Polling keeps the connection in step. The
  // interval grows from 1 ms to 20 ms, so a key set right away costs about a millisecond.
  absl::Status Wait(const std::vector<std::string>& keys, absl::Duration timeout) override {
    const absl::Time deadline = absl::Now() + timeout;
    auto interval = std::chrono::milliseconds(1);
    while (true) {
      try {
        if (store_->check(keys)) return absl::OkStatus();
      } catch (...) {
        return StatusFromException(
            std::current_exception(),
            absl::StrCat(description_, ": check for '", absl::StrJoin(keys, "', '"), "'"),
            absl::StatusCode::kUnavailable);
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat(description_, ": key '", absl::StrJoin(keys, "', '"),
                         "' not set within ", absl::FormatDuration(timeout)));
      }
      std::this_thread::sleep_for(interval);
      interval = std::min(interval * 2, std::chrono::milliseconds(20));
    }
  }

  int port() const override { return port_; }
  c10d::Store* c10d_store() override { return store_.get(); }
  const std::string& description() const { return description_; }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  std::string description_;
  int port_;
  std::shared_ptr<Store> base_;  // a prefix store keeps its base (and so the TCP server) alive
};

}  // namespace

absl::StatusOr<std::shared_ptr<Store>> MakeTcpStore(const TcpStoreOptions& options) {
  const std::string where = absl::StrCat(options.host, ":", options.port);
  if (options.port < 0 || options.port > 65535 || (options.port == 0 && !options.is_server)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tcp store ", where, ": port must be in [1, 65535] (or 0 for a server to pick one)"));
  }
  if (options.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tcp store ", where, ": world_size ", options.world_size, " < 1"));
  }
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(options.port);  // 0: c10d's server binds a free port
  o.isServer = options.is_server;
  o.numWorkers = static_cast<size_t>(options.world_size);
  // Not waiting for the workers lets a server on port 0 publish its port before anyone joins;
  // the backends rendezvous themselves (with their own timeout).
  o.waitWorkers = false;
  o.timeout = absl::ToChronoMilliseconds(options.timeout);
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(options.host, o);
    const int port = store->getPort();
    return std::shared_ptr<Store>(std::make_shared<C10dBackedStore>(
        std::move(store), absl::StrCat("tcp store ", options.host, ":", port), port));
  } catch (...) {
    // Whatever c10d says (refused, timed out while connecting, address in use), the store is
    // not reachable: that is kUnavailable, whose message says what happened.
    absl::Status s = StatusFromException(
        std::current_exception(),
        absl::StrCat("tcp store ", where, options.is_server ? ": cannot serve" : ": cannot connect",
                     " within ", absl::FormatDuration(options.timeout)),
        absl::StatusCode::kUnavailable);
    return absl::UnavailableError(s.message());
  }
}

absl::StatusOr<std::shared_ptr<Store>> MakeFileStore(const std::string& path, int world_size,
                                                     absl::Duration timeout) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("file store ", path, ": world_size ", world_size, " < 1"));
  }
  // c10d opens the file only on the first operation; find out now, with a useful code.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
  if (fd < 0) {
    const int err = errno;
    const std::string message =
        absl::StrCat("file store ", path, ": cannot open: ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
    return absl::UnavailableError(message);
  }
  ::close(fd);
  try {
    auto store = c10::make_intrusive<c10d::FileStore>(path, world_size);
    store->setTimeout(absl::ToChronoMilliseconds(timeout));
    return std::shared_ptr<Store>(
        std::make_shared<C10dBackedStore>(std::move(store), absl::StrCat("file store ", path), 0));
  } catch (...) {
    return StatusFromException(std::current_exception(), absl::StrCat("file store ", path),
                               absl::StatusCode::kUnavailable);
  }
}

std::shared_ptr<Store> MakePrefixStore(const std::string& prefix, std::shared_ptr<Store> base) {
  auto underlying = c10::intrusive_ptr<c10d::Store>::reclaim_copy(base->c10d_store());
  auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, std::move(underlying));
  const int port = base->port();
  const auto* named = dynamic_cast<const C10dBackedStore*>(base.get());
  std::string description =
      absl::StrCat(named != nullptr ? named->description() : std::string("store"), " (prefix '",
                   prefix, "/')");
  return std::make_shared<C10dBackedStore>(std::move(store), std::move(description), port,
                                           std::move(base));
}

}  // namespace shoal::comm
