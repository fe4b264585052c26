#include "core/tensor_io/torch_tensors.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"

namespace crossdiff::tensor_io {

absl::StatusOr<at::ScalarType> ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return at::kFloat;
    case DType::kF16:
      return at::kHalf;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kF64:
      return at::kDouble;
    case DType::kI64:
      return at::kLong;
    case DType::kI32:
      return at::kInt;
    case DType::kI16:
      return at::kShort;
    case DType::kI8:
      return at::kChar;
    case DType::kU8:
      return at::kByte;
    case DType::kBool:
      return at::kBool;
  }
  return absl::InvalidArgumentError("unknown safetensors dtype");
}

absl::StatusOr<DType> FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kDouble:
      return DType::kF64;
    case at::kLong:
      return DType::kI64;
    case at::kInt:
      return DType::kI32;
    case at::kShort:
      return DType::kI16;
    case at::kChar:
      return DType::kI8;
    case at::kByte:
      return DType::kU8;
    case at::kBool:
      return DType::kBool;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype ", c10::toString(type), " has no safetensors equivalent"));
  }
}

absl::StatusOr<at::Tensor> LoadTensor(const SafetensorsFile& file, const TensorInfo& info) {
  ASSIGN_OR_RETURN(at::ScalarType type, ToScalarType(info.dtype));
  const uint8_t* src = file.data(info);
  if (info.dtype == DType::kBool) {
    // at::kBool must hold 0 or 1; anything else is undefined behaviour downstream.
    for (uint64_t i = 0; i < info.nbytes(); ++i) {
      if (src[i] > 1) {
        return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor '", info.name,
                                                       "': BOOL byte ", i, " holds ",
                                                       static_cast<int>(src[i])));
      }
    }
  }
  return GuardTorch(absl::StrCat(file.path(), ": tensor '", info.name, "'"),
                    [&]() -> absl::StatusOr<at::Tensor> {
                      at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(type));
                      if (info.nbytes() > 0) std::memcpy(t.data_ptr(), src, info.nbytes());
                      return t;
                    });
}

absl::StatusOr<at::Tensor> LoadTensor(const SafetensorsFile& file, std::string_view name) {
  ASSIGN_OR_RETURN(const TensorInfo* info, file.Get(name));
  return LoadTensor(file, *info);
}

absl::StatusOr<at::Tensor> LoadTensor(const Checkpoint& ckpt, std::string_view name) {
  ASSIGN_OR_RETURN(const SafetensorsFile* file, ckpt.FileOf(name));
  ASSIGN_OR_RETURN(const TensorInfo* info, ckpt.Get(name));
  return LoadTensor(*file, *info);
}

absl::StatusOr<at::Tensor> BorrowTensor(const SafetensorsFile& file, const TensorInfo& info) {
  ASSIGN_OR_RETURN(at::ScalarType type, ToScalarType(info.dtype));
  const uint8_t* src = file.data(info);
  const size_t element = c10::elementSize(type);
  if (info.dtype == DType::kBool || info.nbytes() == 0 ||
      reinterpret_cast<uintptr_t>(src) % element != 0) {
    return LoadTensor(file, info);
  }
  return GuardTorch(absl::StrCat(file.path(), ": tensor '", info.name, "'"),
                    [&]() -> absl::StatusOr<at::Tensor> {
                      // from_blob takes a mutable pointer; the tensor is documented read-only.
                      return at::from_blob(const_cast<uint8_t*>(src), info.shape,
                                           at::TensorOptions().dtype(type));
                    });
}

absl::StatusOr<at::Tensor> BorrowTensor(const Checkpoint& ckpt, std::string_view name) {
  ASSIGN_OR_RETURN(const SafetensorsFile* file, ckpt.FileOf(name));
  ASSIGN_OR_RETURN(const TensorInfo* info, ckpt.Get(name));
  return BorrowTensor(*file, *info);
}

absl::Status AddTensor(SafetensorsWriter& writer, const std::string& name, const at::Tensor& t) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is undefined"));
  }
  ASSIGN_OR_RETURN(DType dtype, FromScalarType(t.scalar_type()));
  return GuardTorch(absl::StrCat("tensor '", name, "'"), [&]() -> absl::Status {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
    return writer.Add(name, dtype, std::move(shape), c.data_ptr(),
                      static_cast<size_t>(c.numel()) * c.element_size());
  });
}

}  // namespace crossdiff::tensor_io
