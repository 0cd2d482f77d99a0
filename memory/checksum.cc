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
// Three streams at once. The crc32 instruction has a latency of 3 cycles and a throughput of one
// per cycle, so one dependent chain runs at a third of what the core can do: 8 bytes every 3
// cycles. Three independent chains over three adjacent blocks, joined by shifting the earlier
// blocks' CRCs over the later blocks' length (a linear map over GF(2), applied with four table
// lookups), keep the unit busy (Mark Adler's crc32c.c). Issue 13 measured the single chain at
// 6 % of the paged training step's CPU samples on the 2-core AMD EPYC VM: every chunk moved is
// checksummed once, on write or on read.
constexpr size_t kLongBlock = 8192;  // bytes per stream in the main loop
constexpr size_t kShortBlock = 256;  // and for what is left

// Multiplies the 32x32 GF(2) matrix `mat` (one column per bit) by `vec`.
uint32_t Gf2Times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec != 0; vec >>= 1, ++mat) {
    if (vec & 1u) sum ^= *mat;
  }
  return sum;
}

void Gf2Square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = Gf2Times(mat, mat[n]);
}

// The operator that appends `len` zero bytes (a power of two) to a CRC.
void ZerosOperator(uint32_t* even, size_t len) {
  uint32_t odd[32];
  odd[0] = kPolyReflected;  // one zero bit
  uint32_t row = 1;
  for (int n = 1; n < 32; ++n) {
    odd[n] = row;
    row <<= 1;
  }
  Gf2Square(even, odd);  // two zero bits
  Gf2Square(odd, even);  // four
  // The first square in the loop gives one zero byte in `even`, the next two bytes in `odd`, and
  // so on until `len` is used up.
  do {
    Gf2Square(even, odd);
    len >>= 1;
    if (len == 0) return;
    Gf2Square(odd, even);
    len >>= 1;
  } while (len != 0);
  for (int n = 0; n < 32; ++n) even[n] = odd[n];
}

// The zeros operator for one length as four byte-indexed tables.
struct ShiftTables {
  uint32_t t[4][256];
  explicit ShiftTables(size_t len) {
    uint32_t op[32];
    ZerosOperator(op, len);
    for (uint32_t n = 0; n < 256; ++n) {
      for (int k = 0; k < 4; ++k) t[k][n] = Gf2Times(op, n << (8 * k));
    }
  }
  uint32_t Shift(uint32_t crc) const {
    return t[0][crc & 0xFFu] ^ t[1][(crc >> 8) & 0xFFu] ^ t[2][(crc >> 16) & 0xFFu] ^
           t[3][crc >> 24];
  }
};

const ShiftTables& LongShift() {
  static const ShiftTables* tables = new ShiftTables(kLongBlock);
  return *tables;
}
const ShiftTables& ShortShift() {
  static const ShiftTables* tables = new ShiftTables(kShortBlock);
  return *tables;
}

inline uint64_t Load64(const uint8_t* p) {
  uint64_t word;
  std::memcpy(&word, p, 8);
  return word;
}

// `n` bytes per stream at p, p + n, p + 2n, starting from `c0` for the first; returns the CRC
// (pre- and post-inversion left to the caller) of all 3n bytes.
__attribute__((target("sse4.2"))) inline uint64_t ThreeStreams(const uint8_t* p, size_t n,
                                                               uint64_t c0,
                                                               const ShiftTables& shift) {
  uint64_t c1 = 0, c2 = 0;
  const uint8_t* const end = p + n;
  for (; p < end; p += 8) {
    c0 = _mm_crc32_u64(c0, Load64(p));
    c1 = _mm_crc32_u64(c1, Load64(p + n));
    c2 = _mm_crc32_u64(c2, Load64(p + 2 * n));
  }
  c0 = shift.Shift(static_cast<uint32_t>(c0)) ^ c1;
  return shift.Shift(static_cast<uint32_t>(c0)) ^ c2;
}

__attribute__((target("sse4.2"))) uint32_t Sse42Crc(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = static_cast<uint32_t>(~crc);
  // Unaligned 8-byte loads are fine on x86 but cross cache lines; aligning first is cheap.
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  if (n >= 3 * kLongBlock) {
    const ShiftTables& shift = LongShift();
    for (; n >= 3 * kLongBlock; p += 3 * kLongBlock, n -= 3 * kLongBlock) {
      c = ThreeStreams(p, kLongBlock, c, shift);
    }
  }
  if (n >= 3 * kShortBlock) {
    const ShiftTables& shift = ShortShift();
    for (; n >= 3 * kShortBlock; p += 3 * kShortBlock, n -= 3 * kShortBlock) {
      c = ThreeStreams(p, kShortBlock, c, shift);
    }
  }
  for (; n >= 8; p += 8, n -= 8) c = _mm_crc32_u64(c, Load64(p));
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n > 0) {
    c32 = _mm_crc32_u8(c32, *p++);
    --n;
  }
  return ~c32;
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
