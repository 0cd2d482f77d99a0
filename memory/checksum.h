// CRC32C (the Castagnoli polynomial, as in iSCSI and ext4 metadata): the checksum the disk tier
// stores with every chunk slot so that a torn or stale write is detected on read.
//
// Chosen over SHA-256 (common/sha256.h) because a chunk is read back on the training hot path:
// x86-64 CPUs with SSE4.2 compute CRC32C in hardware, here as three independent instruction
// streams joined by shift tables (issue 13: 6.1 GB/s against 3.5 GB/s for one stream, on one core
// of the 2-core AMD EPYC VM while it was loaded by compiles), and the portable slicing-by-8 table
// version still runs at about 1.9 GB/s there. The hardware path is picked at run time
// (cpuid), so one binary runs everywhere. Not a cryptographic hash: it detects accidents (torn
// writes, bit rot, a stale slot), not tampering. All functions are pure and thread-safe.
#ifndef SHOAL_MEMORY_CHECKSUM_H_
#define SHOAL_MEMORY_CHECKSUM_H_

#include <cstddef>
#include <cstdint>

namespace shoal::memory {

// CRC32C of `size` bytes at `data`, continuing from `crc` (the value returned for the bytes
// before; 0 to start). Chaining is exact: Crc32c(b, nb, Crc32c(a, na)) == Crc32c(a ++ b).
// Uses the SSE4.2 instruction where the CPU has it, the table version otherwise.
uint32_t Crc32c(const void* data, size_t size, uint32_t crc = 0);

// The two implementations, exposed so that tests can check they agree.
uint32_t Crc32cPortable(const void* data, size_t size, uint32_t crc = 0);
// REQUIRES: Crc32cHardwareAvailable().
uint32_t Crc32cHardware(const void* data, size_t size, uint32_t crc = 0);

// True where this CPU has the SSE4.2 crc32 instruction (and the binary was built for x86-64).
bool Crc32cHardwareAvailable();

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_CHECKSUM_H_
