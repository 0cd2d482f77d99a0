#include "common/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_format.h"

namespace shoal {

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

std::string FormatBytes(double bytes) {
  if (bytes >= 1e9) return absl::StrFormat("%.1f GB", bytes / 1e9);
  if (bytes >= 1e6) return absl::StrFormat("%.1f MB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.0f kB", bytes / 1e3);
  return absl::StrFormat("%.0f B", bytes);
}

ProgressBar::ProgressBar(std::string label, uint64_t total, bool bytes)
    : label_(std::move(label)),
      total_(total),
      bytes_(bytes),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

ProgressBar::~ProgressBar() { Finish(); }

void ProgressBar::Update(uint64_t done) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_draw_).count();
  if (since < (tty_ ? 0.1 : 2.0)) return;
  last_draw_ = now;
  Draw(false);
}

void ProgressBar::Finish() {
  if (finished_) return;
  finished_ = true;
  done_ = total_;
  Draw(true);
}

void ProgressBar::Draw(bool final) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ ? static_cast<double>(done_) / total_ : 1.0;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(filled, '#');
  bar.append(kWidth - filled, '.');
  const double rate = elapsed > 0 ? done_ / elapsed : 0;
  const double eta = rate > 0 ? (total_ - done_) / rate : -1;
  std::string amount = bytes_ ? absl::StrFormat("%s/%s  %s/s", FormatBytes(done_),
                                                FormatBytes(total_), FormatBytes(rate))
                              : absl::StrFormat("%d/%d", done_, total_);
  std::string line = absl::StrFormat("%-12s [%s] %3.0f%%  %s  %s %s", label_, bar, 100 * frac,
                                     amount, final ? "took" : "ETA",
                                     FormatDuration(final ? elapsed : eta));
  std::fprintf(stderr, tty_ ? "\r%s%s" : "%s%s", line.c_str(), (final || !tty_) ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace shoal
