// Training metrics: the human log line and a machine-readable JSONL file (one JSON object per
// line, flushed as written, so `tail -f` and crash post-mortems see every record).
// Not thread-safe.
#ifndef SHOAL_RUNTIME_METRICS_H_
#define SHOAL_RUNTIME_METRICS_H_

#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

namespace shoal::runtime {

struct TrainLogRecord {
  int64_t step = 0;        // optimizer steps completed
  int64_t total_steps = 0;
  double loss = 0;         // mean training loss over the logging interval
  double lr = 0;
  double grad_norm = 0;    // before clipping
  double tokens_per_s = 0;
  double mfu = 0;          // 0..1
  double elapsed_s = 0;
  double eta_s = 0;
  // Bytes this rank's gradient/optimizer exchange sent and received in the last step; shown
  // when >= 0 (multi-rank runs).
  int64_t bytes_sent = -1;
  int64_t bytes_received = -1;
};

// "step   10/200 | loss 2.9812 | lr 6.00e-04 | gnorm 1.234 | tok/s 12,345 | MFU 41.2% |
//  elapsed 0:12 | ETA 3:45", with " | net 1.2 MB out 1.2 MB in/step" before "elapsed" when
//  bytes_sent >= 0.
std::string FormatTrainLine(const TrainLogRecord& r);

class MetricsFile {
 public:
  // Opens `path` for appending (a resumed run continues the same file). kInternal on failure.
  static absl::StatusOr<MetricsFile> Open(const std::string& path);
  MetricsFile(MetricsFile&& other) noexcept;
  MetricsFile& operator=(MetricsFile&&) = delete;
  ~MetricsFile();

  // Appends one record and flushes.
  void Write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  MetricsFile(std::string path, FILE* f) : path_(std::move(path)), file_(f) {}
  std::string path_;
  FILE* file_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_METRICS_H_
