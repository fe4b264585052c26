#include "core/models/rope.h"

#include <cmath>

namespace crossdiff::models {

at::Tensor RopeInverseFrequencies(const ModelConfig& config) {
  const int64_t dim = config.head_dim;
  // Same float32 arithmetic as transformers: theta ** (arange(0, d, 2).float() / d), reciprocal.
  at::Tensor exponent =
      at::arange(0, dim, 2, at::kLong).to(at::kFloat).div_(static_cast<double>(dim));
  at::Tensor inv_freq = at::pow(config.rope_theta, exponent).reciprocal_();
  const RopeScaling& s = config.rope_scaling;
  switch (s.type) {
    case RopeScaling::Type::kDefault:
      return inv_freq;
    case RopeScaling::Type::kLinear:
      return inv_freq.div_(s.factor);
    case RopeScaling::Type::kLlama3: {
      const double old_len = static_cast<double>(s.original_max_position_embeddings);
      const double low_freq_wavelen = old_len / s.low_freq_factor;
      const double high_freq_wavelen = old_len / s.high_freq_factor;
      at::Tensor wavelen = at::reciprocal(inv_freq).mul_(2 * M_PI);
      // Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept.
      at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq);
      // The band between is interpolated: smooth = (old_len / wavelen - low) / (high - low).
      at::Tensor smooth =
          (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
      at::Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
      return at::where(medium, smoothed, scaled);
    }
  }
  return inv_freq;
}

RopeTables MakeRopeTables(const at::Tensor& inv_freq, int64_t seq_len, at::ScalarType dtype,
                          at::Device device) {
  at::Tensor positions = at::arange(seq_len, at::kLong).to(at::kFloat);
  at::Tensor angle = at::outer(positions, inv_freq.to(at::kFloat));  // [T, D/2], float32
  RopeTables t;
  t.cos = at::cat({angle, angle}, -1).cos_().to(device, dtype);
  t.sin = angle.sin().to(device, dtype);
  return t;
}

at::Tensor ApplyRopeToHeadsFirst(const at::Tensor& x, const RopeTables& tables) {
  const int64_t d = x.size(3);
  const int64_t half = d / 2;
  at::Tensor xt = x.permute({0, 2, 1, 3});  // [B, H, T, D] view
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(1), d}, x.options());
  at::mul_out(out, xt, tables.cos);
  // rotate_half(x) = cat(-x2, x1): first half gets -x2*sin, second half +x1*sin.
  out.narrow(3, 0, half).addcmul_(xt.narrow(3, half, half), tables.sin, -1);
  out.narrow(3, half, half).addcmul_(xt.narrow(3, 0, half), tables.sin, 1);
  return out;
}

}  // namespace crossdiff::models
