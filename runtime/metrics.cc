#include "runtime/metrics.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/progress.h"

namespace shoal::runtime {
namespace {

// 12345.6 -> "12,346"
std::string Thousands(double v) {
  std::string digits = absl::StrFormat("%.0f", v);
  std::string out;
  const int n = static_cast<int>(digits.size());
  for (int i = 0; i < n; ++i) {
    out.push_back(digits[i]);
    if (digits[i] != '-' && (n - 1 - i) % 3 == 0 && i != n - 1) out.push_back(',');
  }
  return out;
}

}  // namespace

std::string FormatTrainLine(const TrainLogRecord& r) {
  const int width = static_cast<int>(std::to_string(r.total_steps).size());
  const std::string net =
      r.bytes_sent < 0 ? ""
                       : absl::StrCat(" | net ", FormatBytes(static_cast<double>(r.bytes_sent)),
                                      " out ", FormatBytes(static_cast<double>(r.bytes_received)),
                                      " in/step");
  return absl::StrFormat(
      "step %*d/%d | loss %.4f | lr %.2e | gnorm %.3f | tok/s %s | MFU %.1f%%%s | elapsed %s | "
      "ETA %s",
      width, r.step, r.total_steps, r.loss, r.lr, r.grad_norm, Thousands(r.tokens_per_s),
      100.0 * r.mfu, net, FormatDuration(r.elapsed_s), FormatDuration(r.eta_s));
}

absl::StatusOr<MetricsFile> MetricsFile::Open(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    return absl::InternalError(absl::StrCat("cannot open metrics file ", path, ": ",
                                            std::strerror(errno)));
  }
  return MetricsFile(path, f);
}

MetricsFile::MetricsFile(MetricsFile&& other) noexcept
    : path_(std::move(other.path_)), file_(other.file_) {
  other.file_ = nullptr;
}

MetricsFile::~MetricsFile() {
  if (file_ != nullptr) std::fclose(file_);
}

void MetricsFile::Write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

}  // namespace shoal::runtime
