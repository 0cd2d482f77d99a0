// A one-line progress bar on stderr for long work (data preparation, checksums):
//   "tokenizing  [#########.........]  48%  2.1 MB/4.4 MB  12.3 MB/s  ETA 0:02"
// Redraws at most 10 times a second; prints plain periodic lines when stderr is not a TTY.
// Not thread-safe: one thread calls Update.
#ifndef SHOAL_COMMON_PROGRESS_H_
#define SHOAL_COMMON_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>

namespace shoal {

// "1:02:03" or "2:03" for a number of seconds; "?" for negative or non-finite.
std::string FormatDuration(double seconds);
// "4.4 MB", "812 kB", "17 B".
std::string FormatBytes(double bytes);

class ProgressBar {
 public:
  // `total` units of work; `bytes` says whether units are bytes (for the rate display).
  ProgressBar(std::string label, uint64_t total, bool bytes);
  ~ProgressBar();
  void Update(uint64_t done);
  void Finish();

 private:
  void Draw(bool final);

  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0;
  bool bytes_;
  bool tty_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace shoal

#endif  // SHOAL_COMMON_PROGRESS_H_
