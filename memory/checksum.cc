#include "memory/checksum.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SHOAL_CRC32C_X86 1
#include <nmmintrin.h>
#endif

namespace shoal::memory {
namespace {

// CRC32C's polynomial 0x1EDC6F41, bit-reversed: the reflected (LSB-first) form, which is the bit
// order the SSE4.2 instruction and every published CRC32C value use.
constexpr uint32_t kPolyReflected = 0x82F63B78u;

// Slicing-by-8: table[k][b] is the CRC contribution of byte b followed by k zero bytes, so eight
// input bytes are folded with eight independent lookups instead of eight dependent ones.
struct Tables {
  uint32_t t[8][256];
};

constexpr Tables MakeTables() {
  Tables tables{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) ? kPolyReflected : 0u);
    tables.t[0][b] = crc;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) {
      const uint32_t prev = tables.t[k - 1][b];
      tables.t[k][b] = (prev >> 8) ^ tables.t[0][prev & 0xFFu];
    }
  }
  return tables;
}

constexpr Tables kTables = MakeTables();

inline uint32_t ByteStep(uint32_t crc, uint8_t byte) {
  return kTables.t[0][(crc ^ byte) & 0xFFu] ^ (crc >> 8);
}

#if defined(SHOAL_CRC32C_X86)
__attribute__((target("sse4.2"))) uint32_t Sse42Crc(const uint8_t* p, size_t n, uint32_t crc) {
  uint32_t c = ~crc;
  // Unaligned 8-byte loads are fine on x86 but cross cache lines; aligning first is cheap.
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = _mm_crc32_u8(c, *p++);
    --n;
  }
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c64 = _mm_crc32_u64(c64, word);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n > 0) {
    c = _mm_crc32_u8(c, *p++);
    --n;
  }
  return ~c;
}
#endif

bool DetectHardware() {
#if defined(SHOAL_CRC32C_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

}  // namespace

uint32_t Crc32cPortable(const void* data, size_t size, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  while (size > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = ByteStep(c, *p++);
    --size;
  }
  // The 8-byte word is read little-endian: its low byte is the first byte of the stream, and the
  // running CRC is folded into the first four bytes (the reflected form shifts right).
  while (size >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = kTables.t[7][w & 0xFF] ^ kTables.t[6][(w >> 8) & 0xFF] ^ kTables.t[5][(w >> 16) & 0xFF] ^
        kTables.t[4][(w >> 24) & 0xFF] ^ kTables.t[3][(w >> 32) & 0xFF] ^
        kTables.t[2][(w >> 40) & 0xFF] ^ kTables.t[1][(w >> 48) & 0xFF] ^
        kTables.t[0][(w >> 56) & 0xFF];
    p += 8;
    size -= 8;
  }
#endif
  while (size > 0) {
    c = ByteStep(c, *p++);
    --size;
  }
  return ~c;
}

uint32_t Crc32cHardware(const void* data, size_t size, uint32_t crc) {
#if defined(SHOAL_CRC32C_X86)
  return Sse42Crc(static_cast<const uint8_t*>(data), size, crc);
#else
  return Crc32cPortable(data, size, crc);
#endif
}

bool Crc32cHardwareAvailable() {
  static const bool available = DetectHardware();
  return available;
}

uint32_t Crc32c(const void* data, size_t size, uint32_t crc) {
  return Crc32cHardwareAvailable() ? Crc32cHardware(data, size, crc)
                                   : Crc32cPortable(data, size, crc);
}

}  // namespace shoal::memory
