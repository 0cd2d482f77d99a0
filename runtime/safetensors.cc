#include "runtime/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status.h"

namespace shoal::runtime {
namespace {

// The format stores little-endian bytes and we memcpy them as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

// The reference implementation refuses headers above 100 MB; so do we, before allocating.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeName {
  at::ScalarType type;
  const char* name;
};

constexpr DtypeName kDtypes[] = {
    {at::kDouble, "F64"}, {at::kFloat, "F32"}, {at::kHalf, "F16"}, {at::kBFloat16, "BF16"},
    {at::kLong, "I64"},   {at::kInt, "I32"},   {at::kShort, "I16"}, {at::kChar, "I8"},
    {at::kByte, "U8"},    {at::kBool, "BOOL"},
};

const char* DtypeToName(at::ScalarType type) {
  for (const DtypeName& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  return nullptr;
}

bool NameToDtype(const std::string& name, at::ScalarType* type) {
  for (const DtypeName& d : kDtypes) {
    if (name == d.name) {
      *type = d.type;
      return true;
    }
  }
  return false;
}

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": invalid safetensors file: ", what));
}

// a * b, or false on uint64 overflow.
bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

// Reads one tensor entry {"dtype", "shape", "data_offsets"} of the header and checks it against
// the data region of `data_size` bytes. Offsets are relative to the first byte after the header.
struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

absl::Status ParseEntry(const std::string& path, const std::string& name,
                        const nlohmann::json& value, uint64_t data_size, Entry* entry) {
  const std::string where = absl::StrCat("tensor '", name, "': ");
  if (!value.is_object()) return Corrupt(path, where + "entry is not an object");
  entry->name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end() || !dtype_it->is_string()) {
    return Corrupt(path, where + "missing or non-string \"dtype\"");
  }
  if (!NameToDtype(dtype_it->get<std::string>(), &entry->dtype)) {
    return Corrupt(path, where + "unsupported dtype \"" + dtype_it->get<std::string>() + "\"");
  }

  auto shape_it = value.find("shape");
  if (shape_it == value.end() || !shape_it->is_array()) {
    return Corrupt(path, where + "missing or non-array \"shape\"");
  }
  uint64_t numel = 1;
  for (const nlohmann::json& dim : *shape_it) {
    if (!dim.is_number_unsigned() ||
        dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Corrupt(path, where + "shape entries must be non-negative integers, got " +
                               shape_it->dump());
    }
    const uint64_t d = dim.get<uint64_t>();
    if (MulOverflows(numel, d, &numel)) return Corrupt(path, where + "shape overflows");
    entry->shape.push_back(static_cast<int64_t>(d));
  }

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    return Corrupt(path, where + "\"data_offsets\" must be [begin, end] (non-negative integers)");
  }
  entry->begin = (*offsets_it)[0].get<uint64_t>();
  entry->end = (*offsets_it)[1].get<uint64_t>();
  if (entry->begin > entry->end) {
    return Corrupt(path, absl::StrCat(where, "data_offsets [", entry->begin, ", ", entry->end,
                                      "] are reversed"));
  }
  if (entry->end > data_size) {
    return Corrupt(path, absl::StrCat(where, "data_offsets [", entry->begin, ", ", entry->end,
                                      "] run past the data region of ", data_size, " bytes"));
  }
  uint64_t nbytes = 0;
  if (MulOverflows(numel, at::elementSize(entry->dtype), &nbytes) ||
      entry->end - entry->begin != nbytes) {
    return Corrupt(path, absl::StrCat(where, "data_offsets [", entry->begin, ", ", entry->end,
                                      "] hold ", entry->end - entry->begin, " bytes but shape ",
                                      shape_it->dump(), " of ", dtype_it->get<std::string>(),
                                      " needs ", nbytes));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

struct HeaderEntry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
};

int64_t NumBytes(const HeaderEntry& e) {
  int64_t n = c10::elementSize(e.dtype);
  for (int64_t d : e.shape) n *= d;
  return n;
}

// The 8-byte length and the JSON header for `entries` (data in their order), padded so the data
// starts 8-byte aligned, as the reference writer does. Checks names and dtypes.
absl::StatusOr<std::string> EncodeHeader(const std::string& path,
                                         const std::vector<HeaderEntry>& entries,
                                         const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const HeaderEntry& e : entries) {
    if (e.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": \"__metadata__\" is reserved and cannot name a tensor"));
    }
    if (!names.insert(e.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": duplicate tensor name '", e.name, "'"));
    }
    const char* dtype = DtypeToName(e.dtype);
    if (dtype == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", e.name,
                                                     "' has unsupported dtype ",
                                                     c10::toString(e.dtype)));
    }
    const uint64_t nbytes = static_cast<uint64_t>(NumBytes(e));
    header[e.name] = {{"dtype", dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string header_json;
  try {
    header_json = header.dump();  // throws on names or metadata that are not valid UTF-8
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot encode header: ", e.what()));
  }
  header_json.append((8 - header_json.size() % 8) % 8, ' ');
  std::string head;
  const uint64_t header_len = header_json.size();
  for (int i = 0; i < 8; ++i) head.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  head += header_json;
  return head;
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata) {
  // Header first (it fixes every offset), then the bytes in the same order.
  std::vector<HeaderEntry> entries;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' is undefined"));
    }
    if (!tensor.device().is_cpu()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' is on ",
                                                     tensor.device().str(), ", not the CPU"));
    }
    at::Tensor c = tensor.contiguous();
    entries.push_back({name, c.scalar_type(), c.sizes().vec()});
    contiguous.push_back(std::move(c));
  }
  SHOAL_ASSIGN_OR_RETURN(const std::string head, EncodeHeader(path, entries, metadata));
  // The header, then every tensor's bytes straight from its storage: a checkpoint never needs a
  // second copy of the state in memory.
  std::vector<absl::string_view> parts = {head};
  for (const at::Tensor& c : contiguous) {
    parts.emplace_back(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  return WriteFileSynced(path, parts);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSource>& sources,
                              const std::map<std::string, std::string>& metadata,
                              int64_t buffer_bytes) {
  std::vector<HeaderEntry> entries;
  for (const TensorSource& s : sources) {
    if (!s.read) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", s.name, "' has no reader"));
    }
    for (int64_t d : s.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor '", s.name, "' has a negative dimension"));
      }
    }
    entries.push_back({s.name, s.dtype, s.shape});
  }
  SHOAL_ASSIGN_OR_RETURN(const std::string head, EncodeHeader(path, entries, metadata));
  std::vector<char> buffer(static_cast<size_t>(std::max<int64_t>(buffer_bytes, 1 << 12)));
  // Each piece read fills the buffer, which is then appended: the writer holds one buffer.
  auto pieces = [&](const std::function<absl::Status(absl::string_view)>& write) -> absl::Status {
    SHOAL_RETURN_IF_ERROR(write(head));
    for (size_t i = 0; i < sources.size(); ++i) {
      const int64_t total = NumBytes(entries[i]);
      for (int64_t at = 0; at < total;) {
        const int64_t n = std::min<int64_t>(total - at, static_cast<int64_t>(buffer.size()));
        absl::Status read = sources[i].read(at, n, buffer.data());
        if (!read.ok()) {
          return absl::Status(read.code(), absl::StrCat(path, ": reading tensor '",
                                                        sources[i].name, "': ", read.message()));
        }
        SHOAL_RETURN_IF_ERROR(write(absl::string_view(buffer.data(), n)));
        at += n;
      }
    }
    return absl::OkStatus();
  };
  return WriteFileSyncedStreaming(path, pieces);
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  if (!PathExists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  SHOAL_ASSIGN_OR_RETURN(const std::string bytes, ReadFileToString(path));
  if (bytes.size() < 8) {
    return Corrupt(path, absl::StrCat("file is ", bytes.size(),
                                      " bytes, too short for the 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) {
    header_len |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  }
  if (header_len > kMaxHeaderBytes) {
    return Corrupt(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                      kMaxHeaderBytes, " bytes"));
  }
  if (header_len > bytes.size() - 8) {
    return Corrupt(path, absl::StrCat("header length ", header_len, " runs past the end of the ",
                                      bytes.size(), "-byte file"));
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = bytes.size() - data_start;

  // nlohmann keeps the last of duplicate keys silently; the callback sees every top-level key.
  std::set<std::string> seen;
  std::string duplicate;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 &&
        !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  const nlohmann::json header = nlohmann::json::parse(
      bytes.begin() + 8, bytes.begin() + static_cast<std::ptrdiff_t>(data_start), on_event,
      /*allow_exceptions=*/false);
  if (header.is_discarded()) return Corrupt(path, "header is not valid JSON");
  if (!header.is_object()) return Corrupt(path, "header is not a JSON object");
  if (!duplicate.empty()) return Corrupt(path, "duplicate tensor name '" + duplicate + "'");

  SafetensorsFile result;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (value.is_null()) continue;
      if (!value.is_object()) return Corrupt(path, "\"__metadata__\" is not an object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) {
          return Corrupt(path, "\"__metadata__\" value for '" + key + "' is not a string");
        }
        result.metadata[key] = text.get<std::string>();
      }
      continue;
    }
    Entry entry;
    SHOAL_RETURN_IF_ERROR(ParseEntry(path, name, value, data_size, &entry));
    entries.push_back(std::move(entry));
  }

  // Two tensors may not share bytes. Empty tensors occupy no bytes and overlap nothing.
  std::vector<const Entry*> by_offset;
  for (const Entry& e : entries) {
    if (e.end > e.begin) by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return Corrupt(path, absl::StrCat("tensors '", by_offset[i - 1]->name, "' and '",
                                        by_offset[i]->name, "' overlap"));
    }
  }

  for (const Entry& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype).device(at::kCPU));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), bytes.data() + data_start + e.begin, e.end - e.begin);
    result.tensors.emplace(e.name, std::move(t));
  }
  return result;
}

}  // namespace shoal::runtime
