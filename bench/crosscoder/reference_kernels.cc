#include "bench/crosscoder/reference_kernels.h"

#include <cstring>

#include "core/crosscoder/vector_clones.h"

// Compiled as sparse_kernels.cc is (crossdiff_vector_kernel_sources), with the same AVX2 clone, so
// that the comparison is between the algorithms.
namespace crossdiff::crosscoder::reference {

CROSSDIFF_VECTOR_CLONES
void OneSweepBackward(const kernels::LatentEntries& le, const float* x, const float* g_main,
                      const float* g_aux, const float* dec, int64_t F, int64_t Md, float* g_enc,
                      float* g_dec, float* g_benc, double* row_sq, kernels::RowMap x_rows) {
  for (int64_t i = 0; i < F; ++i) {
    float* __restrict gd = g_dec + i * Md;
    float* __restrict ge = g_enc + i * Md;
    const float* __restrict di = dec + i * Md;
    std::memset(gd, 0, sizeof(float) * Md);
    std::memset(ge, 0, sizeof(float) * Md);
    float gb = 0.f;
    for (int64_t e = le.ptr[i]; e < le.ptr[i + 1]; ++e) {
      const int64_t b = le.token[e];
      const float* __restrict gs = (le.source[e] ? g_aux : g_main) + b * Md;
      const float* __restrict xb = x + x_rows(b) * Md;
      const float a = le.value[e];
      float gp = 0.f;
#pragma omp simd reduction(+ : gp)
      for (int64_t j = 0; j < Md; ++j) {
        gd[j] += a * gs[j];
        gp += gs[j] * di[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < Md; ++j) ge[j] += gp * xb[j];
      gb += gp;
    }
    g_benc[i] = gb;
    double sq = static_cast<double>(gb) * gb;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < Md; ++j) {
      sq += static_cast<double>(gd[j]) * gd[j] + static_cast<double>(ge[j]) * ge[j];
    }
    row_sq[i] = sq;
  }
}

CROSSDIFF_VECTOR_CLONES
void RowByRowDecode(const kernels::SparseCodes& c, const float* dec, int64_t Md, const float* bias,
                    float* out) {
  const int64_t B = static_cast<int64_t>(c.row_ptr.size()) - 1;
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict y = out + b * Md;
    std::memcpy(y, bias, sizeof(float) * Md);
    for (int64_t e = c.row_ptr[b]; e < c.row_ptr[b + 1]; ++e) {
      const float* __restrict r = dec + static_cast<int64_t>(c.latent[e]) * Md;
      const float a = c.value[e];
#pragma omp simd
      for (int64_t j = 0; j < Md; ++j) y[j] += a * r[j];
    }
  }
}

}  // namespace crossdiff::crosscoder::reference
