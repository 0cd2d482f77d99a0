#include "parallel/demo.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace shoal::parallel {
namespace {

constexpr char kMagic[4] = {'S', 'D', 'M', '1'};
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;

uint64_t Fnv1a(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= kFnvPrime;
  }
  return h;
}

// Copies `bytes` bytes at `offset` of a payload into a new tensor of `shape` and `dtype`.
at::Tensor ReadBlock(const at::Tensor& payload, int64_t offset, at::IntArrayRef shape,
                     at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), payload.data_ptr<uint8_t>() + offset, out.nbytes());
  return out;
}

void WriteBlock(const at::Tensor& block, int64_t offset, at::Tensor* payload) {
  const at::Tensor c = block.contiguous();
  std::memcpy(payload->data_ptr<uint8_t>() + offset, c.data_ptr(), c.nbytes());
}

class BackendExchange : public DemoExchange {
 public:
  BackendExchange(comm::Backend* backend, comm::CollectiveOptions options)
      : backend_(backend), options_(options) {}

  int rank() const override { return backend_->rank(); }
  int size() const override { return backend_->size(); }

  absl::StatusOr<std::vector<at::Tensor>> AllGather(const at::Tensor& payload) override {
    const int64_t n = payload.numel();
    if (checked_size_ != n) {
      // The first time (and whenever the size changes): every worker must send the same number
      // of bytes, or the all-gather itself would fail obscurely. A worker configured
      // differently is named here, before any payload moves.
      SHOAL_ASSIGN_OR_RETURN(const at::Tensor sizes, Gather(at::full({1}, n, at::kLong)));
      for (int w = 0; w < backend_->size(); ++w) {
        const int64_t theirs = sizes[w].item<int64_t>();
        if (theirs != n) {
          return absl::InvalidArgumentError(absl::StrCat(
              "DeMo payload of worker ", w, " has ", theirs, " bytes, this worker's (", rank(),
              ") ", n, ": the workers run DeMo with different settings (chunk, topk, wire "
              "dtype) or different models"));
        }
      }
      checked_size_ = n;
    }
    SHOAL_ASSIGN_OR_RETURN(const at::Tensor all, Gather(payload));
    std::vector<at::Tensor> out;
    out.reserve(backend_->size());
    for (int w = 0; w < backend_->size(); ++w) out.push_back(all.narrow(0, w * n, n));
    return out;
  }

 private:
  comm::Backend* backend_;
  comm::CollectiveOptions options_;
  int64_t checked_size_ = -1;  // the payload size every worker was seen to agree on

  // Every worker's `input` concatenated in worker order, on the CPU. NCCL moves device memory
  // only, so there the bytes are staged through the current CUDA device.
  absl::StatusOr<at::Tensor> Gather(const at::Tensor& input) {
    const bool device = backend_->name() == "nccl";
    const at::Tensor send = device ? input.to(at::kCUDA) : input;
    at::Tensor all = at::empty({input.numel() * backend_->size()}, send.options());
    SHOAL_RETURN_IF_ERROR(backend_->AllGather(all, send, options_)->Wait());
    return device ? all.cpu() : all;
  }
};

}  // namespace

const char* DemoWireName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    default: return "?";
  }
}

absl::StatusOr<at::ScalarType> DemoWireDtype(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
    if (name == DemoWireName(t)) return t;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("DeMo wire dtype \"", name, "\" is not one of fp32, bf16, fp16"));
}

std::unique_ptr<DemoExchange> MakeBackendExchange(comm::Backend* backend,
                                                  comm::CollectiveOptions options) {
  return std::make_unique<BackendExchange>(backend, options);
}

absl::StatusOr<std::unique_ptr<Demo>> Demo::Create(std::vector<ParamGroup> groups,
                                                   DemoOptions options) {
  if (!(options.decay >= 0 && options.decay < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DeMo: decay must be in [0, 1) (got ", options.decay, ")"));
  }
  if (!std::isfinite(options.weight_decay) || options.weight_decay < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DeMo: weight_decay must be finite and >= 0 (got ", options.weight_decay, ")"));
  }
  std::unique_ptr<Demo> demo(new Demo());
  demo->options_ = options;
  // The fingerprint covers everything that must agree between workers for their payloads to
  // mean the same thing and for their parameters to stay identical.
  std::string layout = absl::StrCat("chunk=", options.codec.chunk, ";topk=", options.codec.topk,
                                    ";wire=", DemoWireName(options.codec.wire_dtype),
                                    ";decay=", options.decay, ";wd=", options.weight_decay);
  int64_t cursor = kDemoHeaderBytes;
  for (size_t g = 0; g < groups.size(); ++g) {
    const ParamGroup& group = groups[g];
    if (group.params == nullptr || group.grads == nullptr || !group.params->allocated() ||
        !group.grads->allocated() || group.params->numel() != group.grads->numel()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DeMo: parameter group ", g, " needs allocated parameter and gradient buffers of one "
          "layout"));
    }
    if (group.params->flat().scalar_type() != at::kFloat) {
      return absl::InvalidArgumentError(
          absl::StrCat("DeMo: parameter group ", g, " is not float32"));
    }
    demo->delta_.push_back(at::zeros_like(group.params->flat()));
    const at::Tensor& delta_flat = demo->delta_.back();
    const auto& entries = group.params->entries();
    for (size_t e = 0; e < entries.size(); ++e) {
      const memory::FlatBuffer::Entry& entry = entries[e];
      if (options.include && !options.include(entry.name)) continue;
      Param p;
      p.name = entry.name;
      p.value = group.params->View(static_cast<int>(e));
      p.grad = group.grads->View(static_cast<int>(e));
      p.delta = delta_flat.narrow(0, entry.offset, entry.numel).view(entry.shape);
      p.weight_decay = group.decay ? options.weight_decay : 0.0;
      auto codec = DemoCodec::Create(entry.shape, options.codec);
      if (!codec.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("DeMo cannot code parameter '", entry.name,
                                                       "': ", codec.status().message()));
      }
      p.codec = std::make_unique<DemoCodec>(std::move(*codec));
      const int64_t picks = p.codec->tiles() * p.codec->k();
      p.index_offset = cursor;
      cursor += picks * 2;
      p.value_offset = cursor;
      cursor += picks * static_cast<int64_t>(c10::elementSize(options.codec.wire_dtype));
      absl::StrAppend(&layout, "|", entry.name, ":", absl::StrJoin(entry.shape, "x"), ":",
                      group.decay ? "decay" : "nodecay");
      demo->params_.push_back(std::move(p));
    }
  }
  demo->payload_bytes_ = cursor;
  const uint64_t h = Fnv1a(layout.data(), layout.size(), kFnvOffset);
  demo->fingerprint_ = static_cast<uint32_t>(h ^ (h >> 32));
  return demo;
}

at::Tensor Demo::Compress(double lr, double grad_scale) {
  at::Tensor payload = at::empty({payload_bytes_}, at::TensorOptions().dtype(at::kByte));
  uint8_t* bytes = payload.data_ptr<uint8_t>();
  const int64_t step = steps_ + 1;
  std::memcpy(bytes, kMagic, 4);
  std::memcpy(bytes + 4, &fingerprint_, 4);
  std::memcpy(bytes + 8, &step, 8);
  // delta ← decay·delta + (lr·grad_scale)·grad: the clipped gradient, scaled by the learning
  // rate, without materialising grad·grad_scale.
  const double scaled_lr = lr * grad_scale;
  for (Param& p : params_) {
    const DemoSelection mine = DemoCompress(*p.codec, scaled_lr, options_.decay, p.grad, &p.delta);
    WriteBlock(mine.indices, p.index_offset, &payload);
    WriteBlock(mine.values, p.value_offset, &payload);
  }
  return payload;
}

absl::Status Demo::Apply(const std::vector<at::Tensor>& payloads, double lr) {
  if (payloads.empty()) return absl::InvalidArgumentError("DeMo: no payloads to apply");
  const int64_t step = steps_ + 1;
  for (size_t w = 0; w < payloads.size(); ++w) {
    const at::Tensor& pl = payloads[w];
    if (!pl.defined() || pl.scalar_type() != at::kByte || pl.dim() != 1 || !pl.is_contiguous() ||
        pl.numel() != payload_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DeMo payload of worker ", w, " has ", pl.defined() ? pl.numel() : 0,
          " bytes (or is not a contiguous byte vector); this worker's layout needs ",
          payload_bytes_));
    }
    const uint8_t* bytes = pl.data_ptr<uint8_t>();
    if (std::memcmp(bytes, kMagic, 4) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("DeMo payload of worker ", w, " does not start with the DeMo magic"));
    }
    uint32_t fingerprint;
    std::memcpy(&fingerprint, bytes + 4, 4);
    if (fingerprint != fingerprint_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "DeMo payload of worker %d has settings fingerprint %08x, this worker %08x: the workers "
          "run DeMo with different settings (chunk, topk, wire dtype, decay, weight decay) or "
          "different parameters",
          w, fingerprint, fingerprint_));
    }
    int64_t their_step;
    std::memcpy(&their_step, bytes + 8, 8);
    if (their_step != step) {
      return absl::FailedPreconditionError(absl::StrCat("DeMo payload of worker ", w,
                                                        " is for step ", their_step,
                                                        ", this worker is at step ", step));
    }
  }
  // Decode every parameter's mean first, so a bad index from any worker changes nothing.
  std::vector<at::Tensor> means;
  means.reserve(params_.size());
  std::vector<DemoSelection> workers(payloads.size());
  for (const Param& p : params_) {
    const int64_t tiles = p.codec->tiles(), k = p.codec->k();
    for (size_t w = 0; w < payloads.size(); ++w) {
      workers[w].indices = ReadBlock(payloads[w], p.index_offset, {tiles, k}, at::kShort);
      workers[w].values =
          ReadBlock(payloads[w], p.value_offset, {tiles, k}, options_.codec.wire_dtype);
    }
    auto mean = p.codec->DecompressMean(workers, p.value.scalar_type());
    if (!mean.ok()) {
      return absl::DataLossError(absl::StrCat("DeMo payload, parameter '", p.name,
                                              "': ", mean.status().message()));
    }
    means.push_back(std::move(*mean));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    DemoApplyMean(*p.codec, means[i], lr, p.weight_decay, &p.value);
    means[i] = at::Tensor();  // release as we go
  }
  steps_ = step;
  last_traffic_.sent = payload_bytes_;
  last_traffic_.received = payload_bytes_ * static_cast<int64_t>(payloads.size());
  return absl::OkStatus();
}

absl::Status Demo::Step(double lr, double grad_scale, DemoExchange* exchange) {
  const at::Tensor payload = Compress(lr, grad_scale);
  SHOAL_ASSIGN_OR_RETURN(std::vector<at::Tensor> all, exchange->AllGather(payload));
  return Apply(all, lr);
}

std::vector<std::pair<std::string, at::Tensor>> Demo::StateDict() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(params_.size() + 1);
  out.emplace_back("demo.step", at::scalar_tensor(steps_, at::kLong));
  for (const Param& p : params_) out.emplace_back("demo.delta." + p.name, p.delta);
  return out;
}

absl::Status Demo::LoadStateDict(const std::vector<std::pair<std::string, at::Tensor>>& state) {
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, t] : state) by_name[name] = &t;
  auto step_it = by_name.find("demo.step");
  if (step_it == by_name.end()) {
    return absl::DataLossError("DeMo state has no 'demo.step' (not a DeMo optimizer state?)");
  }
  const at::Tensor& st = *step_it->second;
  if (st.numel() != 1 || at::isFloatingType(st.scalar_type()) || st.item<int64_t>() < 0) {
    return absl::DataLossError("DeMo state: 'demo.step' must be one non-negative integer");
  }
  for (const Param& p : params_) {
    const std::string name = "demo.delta." + p.name;
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      return absl::DataLossError(absl::StrCat("DeMo state has no '", name, "'"));
    }
    const at::Tensor& t = *it->second;
    if (t.sizes() != p.delta.sizes() || t.scalar_type() != p.delta.scalar_type()) {
      return absl::DataLossError(absl::StrCat("DeMo state: '", name, "' is ",
                                              c10::toString(t.scalar_type()), " ",
                                              c10::str(t.sizes()), ", expected ",
                                              c10::toString(p.delta.scalar_type()), " ",
                                              c10::str(p.delta.sizes())));
    }
  }
  for (Param& p : params_) p.delta.copy_(*by_name.at("demo.delta." + p.name));
  steps_ = st.item<int64_t>();
  return absl::OkStatus();
}

void Demo::ResetDelta() {
  for (at::Tensor& d : delta_) d.zero_();
}

uint64_t HashTensors(const std::vector<at::Tensor>& tensors) {
  uint64_t h = kFnvOffset;
  for (const at::Tensor& t : tensors) {
    const at::Tensor c = t.contiguous();
    h = Fnv1a(c.data_ptr(), c.nbytes(), h);
  }
  return h;
}

absl::Status CheckReplicasAgree(comm::Backend* backend, uint64_t hash, int64_t step,
                                comm::CollectiveOptions options) {
  const int n = backend->size();
  int64_t mine;
  std::memcpy(&mine, &hash, 8);
  at::Tensor in = at::full({1}, mine, at::kLong);
  at::Tensor all = at::empty({n}, at::kLong);
  SHOAL_RETURN_IF_ERROR(backend->AllGather(all, in, options)->Wait());
  const int64_t* v = all.data_ptr<int64_t>();
  for (int r = 1; r < n; ++r) {
    if (v[r] != v[0]) {
      return absl::DataLossError(absl::StrFormat(
          "replicas diverged by step %d: rank %d's parameters hash to %016x, rank 0's to %016x "
          "(DeMo replicas must stay bit-identical; different BLAS builds or CPUs between replicas "
          "can cause this)",
          step, r, static_cast<uint64_t>(v[r]), static_cast<uint64_t>(v[0])));
    }
  }
  return absl::OkStatus();
}

}  // namespace shoal::parallel
