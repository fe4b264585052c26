// Conversions between safetensors tensors and at::Tensor.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/tensor_io/safetensors.h"

namespace crossdiff::tensor_io {

absl::StatusOr<at::ScalarType> ToScalarType(DType dtype);
absl::StatusOr<DType> FromScalarType(at::ScalarType type);

// Copies a stored tensor into a new contiguous CPU tensor of its stored dtype.
absl::StatusOr<at::Tensor> LoadTensor(const SafetensorsFile& file, const TensorInfo& info);
absl::StatusOr<at::Tensor> LoadTensor(const SafetensorsFile& file, std::string_view name);
absl::StatusOr<at::Tensor> LoadTensor(const Checkpoint& ckpt, std::string_view name);

// A CPU tensor over the stored bytes themselves (no copy), for callers that convert or copy what
// they keep, such as a model loader that fuses or re-lays out its weights. It is valid only while
// the file (or checkpoint) stays open and it is read-only: the bytes are a PROT_READ mapping, so
// an in-place op on it crashes. Copies instead, like LoadTensor, when the bytes are not aligned to
// the element size and for BOOL (whose bytes LoadTensor validates).
absl::StatusOr<at::Tensor> BorrowTensor(const SafetensorsFile& file, const TensorInfo& info);
absl::StatusOr<at::Tensor> BorrowTensor(const Checkpoint& ckpt, std::string_view name);

// Adds a tensor (any device, made contiguous on CPU) to the writer.
absl::Status AddTensor(SafetensorsWriter& writer, const std::string& name, const at::Tensor& t);

}  // namespace crossdiff::tensor_io
