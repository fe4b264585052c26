// The earlier forms of two kernels of core/crosscoder/sparse_kernels.cc, kept for
// sparse_backward_bench to time the current ones against on the same data.
#pragma once

#include <cstdint>

#include "core/crosscoder/sparse_kernels.h"

namespace crossdiff::crosscoder::reference {

// SparseBackward as one sweep (single-threaded): each entry's encoder-row update right after its
// g_pre, the row norms from the rows while in L1.
void OneSweepBackward(const kernels::LatentEntries& le, const float* x, const float* g_main,
                      const float* g_aux, const float* dec, int64_t F, int64_t Md, float* g_enc,
                      float* g_dec, float* g_benc, double* row_sq, kernels::RowMap x_rows);

// SparseDecode row by row: a random read of a decoder row per entry.
void RowByRowDecode(const kernels::SparseCodes& c, const float* dec, int64_t Md, const float* bias,
                    float* out);

}  // namespace crossdiff::crosscoder::reference
