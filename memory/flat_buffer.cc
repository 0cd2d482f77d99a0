#include "memory/flat_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace shoal::memory {
namespace {
constexpr int64_t kAlignElements = 16;  // 64 bytes of float32

// Zeroed float32 storage of `n` elements in an anonymous mapping of whole pages.
at::Tensor MapZeros(int64_t n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = std::max<size_t>((static_cast<size_t>(n) * sizeof(float) + page - 1) /
                                            page * page,
                                        page);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "FlatBuffer: mmap of ", bytes, " bytes failed: ",
              std::strerror(errno));
  return at::from_blob(
      p, {n}, [bytes](void* q) { munmap(q, bytes); }, at::TensorOptions().dtype(at::kFloat));
}
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

void FlatBuffer::AllocateMapped(int64_t pad_multiple) {
  TORCH_CHECK(!allocated(), "FlatBuffer allocated twice");
  TORCH_CHECK(pad_multiple >= 1, "FlatBuffer pad_multiple must be >= 1");
  size_ = (size_ + pad_multiple - 1) / pad_multiple * pad_multiple;
  flat_ = MapZeros(size_);
  mapped_ = true;
}

absl::Status FlatBuffer::ApplyChunkLayout(const ChunkLayout& layout) {
  TORCH_CHECK(!allocated(), "FlatBuffer::ApplyChunkLayout after Allocate");
  std::map<std::string, int64_t> offsets;
  for (const ChunkLayout::Placement& t : layout.tensors()) {
    const int i = Find(t.name);
    if (i < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk layout: tensor ", t.name, " is not in the flat buffer"));
    }
    if (entries_[i].numel != t.numel) {
      return absl::InvalidArgumentError(absl::StrCat("chunk layout: tensor ", t.name, " has ",
                                                     t.numel, " elements, the buffer's ",
                                                     entries_[i].numel));
    }
    offsets[t.name] = t.chunk * layout.capacity() + t.offset;
  }
  for (const Entry& e : entries_) {
    if (!offsets.count(e.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk layout: tensor ", e.name, " has no place in it"));
    }
  }
  for (Entry& e : entries_) e.offset = offsets[e.name];
  size_ = static_cast<int64_t>(layout.num_chunks()) * layout.capacity();
  return absl::OkStatus();
}

FlatBuffer FlatBuffer::MakeLike() const {
  TORCH_CHECK(allocated(), "FlatBuffer::MakeLike before Allocate");
  FlatBuffer out;
  out.entries_ = entries_;
  out.size_ = size_;
  out.mapped_ = mapped_;
  out.flat_ = mapped_ ? MapZeros(size_) : at::zeros({size_}, at::kFloat);
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
