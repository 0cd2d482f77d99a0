// The coordinator's HTTP port: `/metrics` (Prometheus text format 0.0.4, built with
// prometheus-cpp's registry and serializer; names `shoal_*`, base units, `_total` counters),
// `/api/status` (the ClusterStatus as JSON, proto3 mapping with the proto's field names) and `/`
// (a self-contained dashboard page: the live loss curve, throughput per worker and the layout as
// a picture, drawn from /api/status by the browser). Read-only; binds 127.0.0.1 unless told.
#ifndef SHOAL_SCHEDULER_HTTP_STATUS_H_
#define SHOAL_SCHEDULER_HTTP_STATUS_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/coordinator.pb.h"

namespace shoal::scheduler {

using StatusFn = std::function<v1::ClusterStatus()>;

// The exposition text for one status snapshot.
std::string RenderPrometheus(const v1::ClusterStatus& status);
// The JSON served at /api/status.
std::string RenderStatusJson(const v1::ClusterStatus& status);
// The dashboard page.
const std::string& DashboardHtml();

class HttpStatusServer {
 public:
  // `listen`: HOST:PORT, port 0 picks a free one. kInvalidArgument for a malformed address,
  // kUnavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpStatusServer>> Start(const std::string& listen,
                                                                 StatusFn status);
  ~HttpStatusServer();  // stops
  int port() const;
  void Stop();

  struct Impl;
 private:
  explicit HttpStatusServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_HTTP_STATUS_H_
