#include "memory/flat_buffer.h"

#include <ATen/ATen.h>

#include "common/logging.h"

namespace shoal::memory {
namespace {
constexpr int64_t kAlignElements = 16;  // 64 bytes of float32
}  // namespace

int FlatBuffer::Add(std::string name, std::vector<int64_t> shape) {
  TORCH_CHECK(!allocated(), "FlatBuffer::Add after Allocate (", name, ")");
  TORCH_CHECK(Find(name) < 0, "FlatBuffer: duplicate tensor name ", name);
  Entry e;
  e.name = std::move(name);
  e.shape = std::move(shape);
  e.numel = 1;
  for (int64_t d : e.shape) e.numel *= d;
  e.offset = size_;
  size_ += (e.numel + kAlignElements - 1) / kAlignElements * kAlignElements;
  entries_.push_back(std::move(e));
  return static_cast<int>(entries_.size()) - 1;
}

void FlatBuffer::Allocate(int64_t pad_multiple) {
  TORCH_CHECK(!allocated(), "FlatBuffer allocated twice");
  TORCH_CHECK(pad_multiple >= 1, "FlatBuffer pad_multiple must be >= 1");
  size_ = (size_ + pad_multiple - 1) / pad_multiple * pad_multiple;
  flat_ = at::zeros({size_}, at::kFloat);
}

FlatBuffer FlatBuffer::MakeLike() const {
  TORCH_CHECK(allocated(), "FlatBuffer::MakeLike before Allocate");
  FlatBuffer out;
  out.entries_ = entries_;
  out.size_ = size_;
  out.flat_ = at::zeros({size_}, at::kFloat);
  return out;
}

at::Tensor FlatBuffer::View(int index) const {
  TORCH_CHECK(allocated(), "FlatBuffer::View before Allocate");
  const Entry& e = entries_.at(index);
  return flat_.narrow(0, e.offset, e.numel).view(e.shape);
}

int FlatBuffer::Find(const std::string& name) const {
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace shoal::memory
