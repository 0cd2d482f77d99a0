// Minimal leveled logging to stderr: "I1126 23:15:02.123 file.cc:42] message".
// Thread-safe (one write per line). Verbosity is set once by launch/ from SHOAL_LOG_LEVEL.
#ifndef SHOAL_COMMON_LOGGING_H_
#define SHOAL_COMMON_LOGGING_H_

#include <sstream>

namespace shoal {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below `level` are dropped. Default kInfo.
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();

namespace internal {
class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace shoal

#define SHOAL_LOG(level)                                                        \
  if (::shoal::LogLevel::k##level < ::shoal::GetLogLevel()) {                   \
  } else                                                                        \
    ::shoal::internal::LogLine(::shoal::LogLevel::k##level, __FILE__, __LINE__) \
        .stream()

#endif  // SHOAL_COMMON_LOGGING_H_
