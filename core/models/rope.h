// Rotary position embeddings as Hugging Face computes them (rotate-half / "NeoX" layout).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "core/models/model_config.h"

namespace crossdiff::models {

// inv_freq[k] = theta^(-2k/d), k = 0..d/2-1, then rope_scaling applied:
//   linear: inv_freq / factor;
//   llama3: wavelengths above original_max/low_freq_factor are divided by factor, those below
//           original_max/high_freq_factor are kept, the band between is interpolated smoothly.
// Returns a float32 CPU tensor [head_dim / 2], computed in float32 exactly as HF 4.45 does.
at::Tensor RopeInverseFrequencies(const ModelConfig& config);

// cos/sin tables for positions 0..seq_len-1: [seq_len, head_dim] with the angle duplicated over
// both halves (cat(angle, angle)), computed in float32 then cast to `dtype` on `device`.
struct RopeTables {
  at::Tensor cos;  // [T, head_dim]
  at::Tensor sin;  // [T, head_dim / 2] (both halves are equal; the half is enough)
};
RopeTables MakeRopeTables(const at::Tensor& inv_freq, int64_t seq_len, at::ScalarType dtype,
                          at::Device device);

// Applies the rotation to x [B, T, H, D] (any strides) and returns a new contiguous tensor laid out
// [B, H, T, D]: x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]).
at::Tensor ApplyRopeToHeadsFirst(const at::Tensor& x, const RopeTables& tables);

}  // namespace crossdiff::models
