// Store: the key/value service ranks use to find each other (rendezvous) and to agree on small
// facts (a config hash, a restart generation). Two kinds:
//   - TCP: rank 0 (is_server) serves on host:port, every rank connects (LibTorch's c10d TCPStore);
//   - file: a shared file, for tests and single-host runs (c10d FileStore).
// Every call is bounded by a timeout and returns a status: kDeadlineExceeded when a key does not
// appear in time, kUnavailable when the server cannot be reached. Messages name the key and the
// store ("tcp store 127.0.0.1:29500", "file store /tmp/x"). Thread-safe.
//
// Lifetime: the TCP server runs inside the Store object of the rank that made it with is_server;
// keep that object alive until every rank is done with the store (in practice: as long as the
// backends built on it). Backends keep a reference to the store they were built on.
#ifndef SHOAL_COMM_STORE_H_
#define SHOAL_COMM_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace c10d {
class Store;
}

namespace shoal::comm {

class Store {
 public:
  virtual ~Store() = default;
  // Sets key to value (overwrites).
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Waits up to `timeout` for key to exist, then returns its value.
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) = 0;
  // Atomically adds delta to the integer at key (0 if absent); returns the new value.
  virtual absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) = 0;
  // Waits up to `timeout` for every key to exist.
  virtual absl::Status Wait(const std::vector<std::string>& keys, absl::Duration timeout) = 0;
  // The TCP port the store serves or connects to: the port actually bound when the server was
  // asked for port 0. 0 for a file store; a prefix store reports its base store's port.
  virtual int port() const = 0;
  // The LibTorch store underneath, for backends built on c10d (Gloo). Never null; owned by this
  // object.
  virtual c10d::Store* c10d_store() = 0;
};

struct TcpStoreOptions {
  std::string host = "127.0.0.1";  // where rank 0 serves
  int port = 29500;                // 0 with is_server: bind a free port (read it with port())
  bool is_server = false;          // rank 0 serves
  int world_size = 1;              // ranks expected to connect
  absl::Duration timeout = absl::Seconds(60);  // connect and per-call timeout
};

// Serves (is_server: binds host's port, then connects to itself) or connects to a server. Returns
// as soon as this rank is connected: it does not wait for the other ranks (rendezvous is the
// backend's job), so a server on port 0 can publish port() before anyone joins. A client retries
// while the server is not up yet. kUnavailable naming host:port when it cannot connect or bind
// within options.timeout; kInvalidArgument for a port outside [0, 65535] (0 only with is_server)
// or world_size < 1.
absl::StatusOr<std::shared_ptr<Store>> MakeTcpStore(const TcpStoreOptions& options);

// A store in the file `path` shared by `world_size` ranks on one host (the directory must exist;
// the file is created if absent and removed when the last of the world_size stores that opened
// it is destroyed). `timeout` bounds the waits of backends built on it. kInvalidArgument for
// world_size < 1; kNotFound (no such directory), kPermissionDenied or kUnavailable, naming the
// path, when the file cannot be opened.
absl::StatusOr<std::shared_ptr<Store>> MakeFileStore(const std::string& path, int world_size,
                                                     absl::Duration timeout);

// A view of `base` with every key prefixed by `prefix` + "/" (one namespace per group/restart).
// Keeps `base` alive. REQUIRES: base != nullptr.
std::shared_ptr<Store> MakePrefixStore(const std::string& prefix, std::shared_ptr<Store> base);

}  // namespace shoal::comm

#endif  // SHOAL_COMM_STORE_H_
