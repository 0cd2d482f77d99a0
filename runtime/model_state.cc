#include "runtime/model_state.h"

#include <ATen/ATen.h>

#include <map>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "parallel/adamw.h"

namespace shoal::runtime {
namespace {

// Tags on the world group: the gather is the only point-to-point traffic there.
constexpr int kHeaderSizeTag = 0x5a000001;
constexpr int kHeaderTag = 0x5a000002;
constexpr int kTensorTagBase = 0x5a100000;

// One line per tensor: name, dtype (f or l), dim, parts, offset, length, full shape.
std::string DescribeTensors(const std::vector<ShardedTensor>& tensors) {
  std::string out;
  for (const ShardedTensor& t : tensors) {
    absl::StrAppend(&out, t.name, "\t", t.local.scalar_type() == at::kLong ? "l" : "f", "\t",
                    t.spec.dim, "\t", t.spec.parts, "\t", t.spec.offset, "\t", t.spec.length, "\t",
                    absl::StrJoin(t.spec.full_shape, ","), "\n");
  }
  return out;
}

struct Described {
  std::string name;
  at::ScalarType dtype;
  ShardSpec spec;
  std::vector<int64_t> local_shape;
};

bool ParseInt(absl::string_view s, int64_t* v) {
  if (s.empty() || s.size() > 18) return false;
  size_t i = s[0] == '-' ? 1 : 0;
  if (i == s.size()) return false;
  for (size_t k = i; k < s.size(); ++k) {
    if (s[k] < '0' || s[k] > '9') return false;
  }
  *v = std::stoll(std::string(s));
  return true;
}

absl::StatusOr<std::vector<Described>> ParseDescription(const std::string& text, int from) {
  std::vector<Described> out;
  auto bad = [&](const std::string& line, const std::string& why) {
    return absl::DataLossError(absl::StrCat("model-wide gather: rank ", from,
                                            " described a tensor badly (", why, "): '", line, "'"));
  };
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    std::vector<absl::string_view> f = absl::StrSplit(line, '\t');
    if (f.size() != 7) return bad(std::string(line), "expected 7 fields");
    Described d;
    d.name = std::string(f[0]);
    if (d.name.empty()) return bad(std::string(line), "empty name");
    if (f[1] != "f" && f[1] != "l") return bad(std::string(line), "dtype");
    d.dtype = f[1] == "l" ? at::kLong : at::kFloat;
    int64_t dim, parts, offset, length;
    if (!ParseInt(f[2], &dim) || !ParseInt(f[3], &parts) || !ParseInt(f[4], &offset) ||
        !ParseInt(f[5], &length)) {
      return bad(std::string(line), "numbers");
    }
    for (absl::string_view s : absl::StrSplit(f[6], ',', absl::SkipEmpty())) {
      int64_t v;
      if (!ParseInt(s, &v) || v < 0) return bad(std::string(line), "shape");
      d.spec.full_shape.push_back(v);
    }
    d.spec.dim = static_cast<int>(dim);
    d.spec.parts = static_cast<int>(parts);
    d.spec.offset = offset;
    d.spec.length = length;
    const int64_t rank = static_cast<int64_t>(d.spec.full_shape.size());
    if (dim < -1 || dim >= rank) return bad(std::string(line), "dim out of range");
    if (dim >= 0) {
      const int64_t extent = d.spec.full_shape[dim];
      if (parts < 1 || extent % parts != 0 || offset < 0 || length < 0 ||
          offset + length > extent / parts) {
        return bad(std::string(line), "shard outside the tensor");
      }
    }
    d.local_shape = ShardShape(d.spec);
    out.push_back(std::move(d));
  }
  return out;
}

absl::Status Place(std::map<std::string, at::Tensor>& full, const std::string& name,
                   at::ScalarType dtype, const ShardSpec& spec, const at::Tensor& local) {
  auto it = full.find(name);
  if (it == full.end()) {
    it = full.emplace(name, at::zeros(spec.full_shape, at::TensorOptions().dtype(dtype))).first;
  } else if (it->second.sizes() != at::IntArrayRef(spec.full_shape) ||
             it->second.scalar_type() != dtype) {
    return absl::DataLossError(absl::StrCat("model-wide gather: shards of ", name,
                                            " disagree on the full shape or dtype"));
  }
  PlaceShard(local, spec, it->second);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<NamedTensors> GatherModelWide(comm::Backend* world, bool contributes,
                                             const std::vector<ShardedTensor>& mine,
                                             const comm::CollectiveOptions& options) {
  const int rank = world != nullptr ? world->rank() : 0;
  const int size = world != nullptr ? world->size() : 1;
  // Who contributes: everyone learns it, so rank 0 knows whom to receive from.
  std::vector<int64_t> who(size, 0);
  if (size > 1) {
    at::Tensor flag = at::full({1}, contributes ? 1 : 0, at::kLong);
    at::Tensor all = at::empty({size}, at::kLong);
    SHOAL_RETURN_IF_ERROR(world->AllGather(all, flag, options)->Wait());
    for (int r = 0; r < size; ++r) who[r] = all[r].item<int64_t>();
  } else {
    who[0] = contributes ? 1 : 0;
  }
  if (rank != 0) {
    if (!contributes) return NamedTensors{};
    const std::string header = DescribeTensors(mine);
    at::Tensor bytes = at::empty({static_cast<int64_t>(header.size())}, at::kByte);
    std::memcpy(bytes.data_ptr<uint8_t>(), header.data(), header.size());
    at::Tensor n = at::full({1}, static_cast<int64_t>(header.size()), at::kLong);
    SHOAL_RETURN_IF_ERROR(world->Send(n, 0, kHeaderSizeTag, options)->Wait());
    if (!header.empty()) SHOAL_RETURN_IF_ERROR(world->Send(bytes, 0, kHeaderTag, options)->Wait());
    for (size_t i = 0; i < mine.size(); ++i) {
      at::Tensor t = mine[i].local.contiguous();
      SHOAL_RETURN_IF_ERROR(
          world->Send(t, 0, kTensorTagBase + static_cast<int>(i), options)->Wait());
    }
    return NamedTensors{};
  }
  std::map<std::string, at::Tensor> full;
  if (contributes) {
    for (const ShardedTensor& t : mine) {
      SHOAL_RETURN_IF_ERROR(Place(full, t.name, t.local.scalar_type(), t.spec, t.local));
    }
  }
  for (int r = 1; r < size; ++r) {
    if (who[r] == 0) continue;
    at::Tensor n = at::empty({1}, at::kLong);
    SHOAL_RETURN_IF_ERROR(world->Recv(n, r, kHeaderSizeTag, options)->Wait());
    const int64_t len = n.item<int64_t>();
    if (len < 0 || len > (int64_t{1} << 30)) {
      return absl::DataLossError(
          absl::StrCat("model-wide gather: rank ", r, " announced a header of ", len, " bytes"));
    }
    std::string header(static_cast<size_t>(len), '\0');
    if (len > 0) {
      at::Tensor bytes = at::empty({len}, at::kByte);
      SHOAL_RETURN_IF_ERROR(world->Recv(bytes, r, kHeaderTag, options)->Wait());
      std::memcpy(header.data(), bytes.data_ptr<uint8_t>(), header.size());
    }
    SHOAL_ASSIGN_OR_RETURN(std::vector<Described> described, ParseDescription(header, r));
    if (described.size() > static_cast<size_t>(0x5a0fffff - kTensorTagBase)) {
      return absl::DataLossError(absl::StrCat("model-wide gather: rank ", r, " announced ",
                                              described.size(), " tensors"));
    }
    for (size_t i = 0; i < described.size(); ++i) {
      const Described& d = described[i];
      at::Tensor local = at::empty(d.local_shape, at::TensorOptions().dtype(d.dtype));
      SHOAL_RETURN_IF_ERROR(
          world->Recv(local, r, kTensorTagBase + static_cast<int>(i), options)->Wait());
      SHOAL_RETURN_IF_ERROR(Place(full, d.name, d.dtype, d.spec, local));
    }
  }
  return NamedTensors(full.begin(), full.end());
}

namespace {

// Every parameter of the chunks with its shard spec, in chunk order.
std::vector<std::pair<std::string, std::pair<at::Tensor, ShardSpec>>> ChunkParameters(
    const std::vector<const Gpt*>& chunks) {
  std::vector<std::pair<std::string, std::pair<at::Tensor, ShardSpec>>> out;
  for (const Gpt* chunk : chunks) {
    const std::vector<ShardSpec> specs = chunk->ShardSpecs();
    const auto named = chunk->NamedParameters();
    for (size_t i = 0; i < named.size(); ++i) {
      out.push_back({named[i].first, {named[i].second, specs[i]}});
    }
  }
  return out;
}

}  // namespace

std::vector<ShardedTensor> ShardedParameters(const std::vector<const Gpt*>& chunks) {
  std::vector<ShardedTensor> out;
  for (auto& [name, p] : ChunkParameters(chunks)) out.push_back({name, p.first, p.second});
  return out;
}

std::vector<ShardedTensor> ShardedOptimizerState(const std::vector<const Gpt*>& chunks,
                                                 const NamedTensors& state) {
  std::map<std::string, ShardSpec> spec_of;
  for (auto& [name, p] : ChunkParameters(chunks)) spec_of[name] = p.second;
  std::vector<ShardedTensor> out;
  for (const auto& [name, t] : state) {
    ShardSpec spec;
    const size_t dot = name.find('.');
    auto it = dot == std::string::npos ? spec_of.end() : spec_of.find(name.substr(dot + 1));
    if (it != spec_of.end()) {
      spec = it->second;
    } else {
      spec.full_shape = t.sizes().vec();  // "step" and anything else: replicated
    }
    out.push_back({name, t, spec});
  }
  return out;
}

absl::StatusOr<NamedTensors> SliceOptimizerState(const std::vector<const Gpt*>& chunks,
                                                 const NamedTensors& full) {
  std::map<std::string, at::Tensor> by_name(full.begin(), full.end());
  NamedTensors out;
  auto step = by_name.find("step");
  if (step == by_name.end()) return absl::DataLossError("optimizer state: missing 'step'");
  out.emplace_back("step", step->second);
  for (auto& [param, p] : ChunkParameters(chunks)) {
    const ShardSpec& spec = p.second;
    for (bool second : {false, true}) {
      const std::string name = parallel::MomentName(second, param);
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return absl::DataLossError(absl::StrCat("optimizer state: missing tensor ", name));
      }
      if (it->second.sizes() != at::IntArrayRef(spec.full_shape) ||
          it->second.scalar_type() != at::kFloat) {
        return absl::DataLossError(absl::StrCat(
            "optimizer state: tensor ", name, " has shape ", c10::str(it->second.sizes()),
            "; the model-wide shape is ", c10::str(at::IntArrayRef(spec.full_shape)),
            " float32"));
      }
      out.emplace_back(name, SliceShard(it->second, spec));
    }
  }
  return out;
}

}  // namespace shoal::runtime
