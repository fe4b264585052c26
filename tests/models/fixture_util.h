// Helpers shared by the models tests: fixture paths and tensor comparison.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::models::testing {

inline std::string FixturesDir() {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  return std::string(env != nullptr ? env : CROSSDIFF_SOURCE_DIR "/../shared/fixtures");
}
inline std::string HfFixture(const std::string& arch) { return FixturesDir() + "/hf/" + arch; }

inline at::Tensor LoadOrDie(const tensor_io::SafetensorsFile& file, const std::string& name) {
  auto t = tensor_io::LoadTensor(file, name);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : at::Tensor();
}

// allclose(atol, rtol) with a readable failure message (max |diff| and where).
inline ::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected,
                                           double atol = 1e-4, double rtol = 1e-4) {
  if (!actual.defined()) return ::testing::AssertionFailure() << "actual tensor is undefined";
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != " << expected.sizes();
  }
  at::Tensor a = actual.to(at::kCPU, at::kDouble), e = expected.to(at::kCPU, at::kDouble);
  at::Tensor diff = (a - e).abs();
  at::Tensor excess = diff - (atol + rtol * e.abs());
  const double max_diff = diff.max().item<double>();
  if (excess.max().item<double>() > 0 || !std::isfinite(max_diff)) {
    const int64_t where = excess.flatten().argmax().item<int64_t>();
    return ::testing::AssertionFailure()
           << "max |diff| " << max_diff << "; worst flat index " << where << ": actual "
           << a.flatten()[where].item<double>() << " expected "
           << e.flatten()[where].item<double>();
  }
  return ::testing::AssertionSuccess() << "max |diff| " << max_diff;
}

}  // namespace crossdiff::models::testing
