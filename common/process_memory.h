// The process's own memory, read from /proc (Linux): what memory budgets are checked against and
// what the logs report. 0 where /proc cannot be read.
#ifndef SHOAL_COMMON_PROCESS_MEMORY_H_
#define SHOAL_COMMON_PROCESS_MEMORY_H_

#include <cstdint>

namespace shoal {

// Resident set size now (/proc/self/statm), in bytes.
int64_t ResidentBytes();
// The most ever resident (VmHWM of /proc/self/status), in bytes.
int64_t PeakResidentBytes();

}  // namespace shoal

#endif  // SHOAL_COMMON_PROCESS_MEMORY_H_
