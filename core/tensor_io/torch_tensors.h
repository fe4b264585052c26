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

// Adds a tensor (any device, made contiguous on CPU) to the writer.
absl::Status AddTensor(SafetensorsWriter& writer, const std::string& name, const at::Tensor& t);

}  // namespace crossdiff::tensor_io
