// Streaming per-latent statistics over a store: activation frequency, maximum activation, top
// activating rows, FVU and L0, latent scaling (Minder et al. 2025) and per-category activation
// mass. Memory is O(F * top_k + S * M + C * F) whatever the number of rows (F latents, S latents
// with latent scaling, M models, C categories).
//
// Everything works in the crosscoder's normalised space: `x` are the normalised activations, `xhat`
// the crosscoder's reconstruction of them. Accumulators are double precision.
//
// Thread-compatible: one thread calls Add.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::analysis {

// The two regression targets of latent scaling for latent j with decoder direction d_j (the decoder
// vector of the model in which the latent is larger):
//   error:          y_n^m = x_n^m - xhat_n^m + f_j(x_n) d_j^m   (what latent j and the error
//   explain) reconstruction: y_n^m = xhat_n^m - f_j(x_n) d_j^m           (what the other latents
//   explain) beta_j^m = sum_n f_j <d_j, y_n^m> / (||d_j||^2 sum_n f_j^2),  nu = beta_j^base /
//   beta_j^ft.
struct LatentScalingResult {
  at::Tensor latents;              // I64 [S]: the latents it was computed for
  at::Tensor beta_error;           // F64 [M, S]
  at::Tensor beta_reconstruction;  // F64 [M, S]
  at::Tensor sum_f2;               // F64 [S]; 0 means the latent never fired (betas undefined)
};

struct LatentStatistics {
  int64_t rows = 0;
  at::Tensor active_count;  // I64 [F]
  at::Tensor max_act;       // F32 [F]
  at::Tensor top_values;    // F32 [K, F], strongest first; 0 where fewer than K rows fired
  at::Tensor top_rows;      // I64 [K, F], global rows; -1 where unused
  std::vector<double> fvu;  // per model
  double l0 = 0;            // mean active latents per row
  LatentScalingResult scaling;
  at::Tensor category_tokens;       // F64 [C]
  at::Tensor category_latent_mass;  // F64 [C, F]: sum over the category's rows of f_j
};

class LatentStatisticsAccumulator {
 public:
  struct Options {
    int64_t top_k = 10;
    // Latents to compute latent scaling for (I64 [S]); undefined or empty: none.
    at::Tensor scaling_latents;
    int64_t num_categories = 0;
  };

  // `decoder` is W_dec [M, F, d] (normalised space, copied to float32 on the CPU). INVALID_ARGUMENT
  // on a bad shape, out-of-range scaling latents or top_k < 1.
  static absl::StatusOr<LatentStatisticsAccumulator> Create(const at::Tensor& decoder,
                                                            Options options);

  // Adds rows [first_row, first_row + B): x and xhat [B, M, d], f [B, F] (non-negative latent
  // activations), category_mask [B, C] (bool or float; undefined when num_categories == 0).
  // INVALID_ARGUMENT on mismatched shapes.
  absl::Status Add(const at::Tensor& x, const at::Tensor& xhat, const at::Tensor& f,
                   int64_t first_row, const at::Tensor& category_mask = at::Tensor());

  LatentStatistics Finish() const;

  // nu for position s of `scaling.latents`; nullopt when undefined (never fired, beta_ft == 0).
  static std::optional<double> Nu(const at::Tensor& beta, int64_t s);

 private:
  LatentStatisticsAccumulator() = default;

  Options opts_;
  int64_t num_models_ = 0, num_latents_ = 0, d_model_ = 0;
  int64_t rows_ = 0;
  at::Tensor active_count_, max_act_, top_values_, top_rows_;
  at::Tensor sse_, sum_x_, sum_x2_;  // F64 [M], [M, d], [M]
  double active_total_ = 0;
  // Latent scaling state.
  at::Tensor scaling_dirs_;                    // F32 [S, d]: d_j
  at::Tensor scaling_dots_;                    // F32 [M, S]: <d_j, d_j^m>
  at::Tensor scaling_norm2_;                   // F64 [S]: ||d_j||^2
  at::Tensor num_error_, num_recon_, sum_f2_;  // F64 [M, S], [M, S], [S]
  at::Tensor category_tokens_, category_mass_;
};

}  // namespace crossdiff::analysis
