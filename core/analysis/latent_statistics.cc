#include "core/analysis/latent_statistics.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/common/torch_status.h"

namespace crossdiff::analysis {
namespace {

std::string ShapeText(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) absl::StrAppend(&s, i ? ", " : "", t.size(i));
  return s + "]";
}

}  // namespace

absl::StatusOr<LatentStatisticsAccumulator> LatentStatisticsAccumulator::Create(
    const at::Tensor& decoder, Options options) {
  if (!decoder.defined() || decoder.dim() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("decoder must be [models, latents, d_model], got ", ShapeText(decoder)));
  }
  if (options.top_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 1, got ", options.top_k));
  }
  if (options.num_categories < 0) {
    return absl::InvalidArgumentError("num_categories must be >= 0");
  }
  return GuardTorch("latent statistics", [&]() -> absl::StatusOr<LatentStatisticsAccumulator> {
    LatentStatisticsAccumulator acc;
    const at::Tensor dec = decoder.detach().to(at::kCPU, at::kFloat).contiguous();
    acc.num_models_ = dec.size(0);
    acc.num_latents_ = dec.size(1);
    acc.d_model_ = dec.size(2);
    const int64_t M = acc.num_models_, F = acc.num_latents_, D = acc.d_model_;
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    acc.active_count_ = at::zeros({F}, at::kLong);
    acc.max_act_ = at::zeros({F}, at::kFloat);
    acc.top_values_ = at::zeros({options.top_k, F}, at::kFloat);
    acc.top_rows_ = at::full({options.top_k, F}, -1, at::kLong);
    acc.sse_ = at::zeros({M}, f64);
    acc.sum_x_ = at::zeros({M, D}, f64);
    acc.sum_x2_ = at::zeros({M}, f64);

    at::Tensor sel = options.scaling_latents.defined()
                         ? options.scaling_latents.to(at::kCPU, at::kLong).reshape({-1})
                         : at::zeros({0}, at::kLong);
    if (sel.numel() > 0 && (sel.min().item<int64_t>() < 0 || sel.max().item<int64_t>() >= F)) {
      return absl::InvalidArgumentError(
          absl::StrCat("latent scaling: latent index out of range [0, ", F, ")"));
    }
    options.scaling_latents = sel;
    const int64_t S = sel.numel();
    // d_j: the decoder vector of the model where latent j is largest.
    at::Tensor dec_sel = dec.index_select(1, sel);                              // [M, S, D]
    at::Tensor norms = dec_sel.norm(2, /*dim=*/2);                              // [M, S]
    at::Tensor dominant = S > 0 ? norms.argmax(0) : at::zeros({0}, at::kLong);  // [S]
    acc.scaling_dirs_ = S > 0 ? dec_sel.permute({1, 0, 2})
                                    .gather(1, dominant.view({S, 1, 1}).expand({S, 1, D}))
                                    .squeeze(1)
                                    .contiguous()
                              : at::zeros({0, D}, at::kFloat);              // [S, D]
    acc.scaling_dots_ = (dec_sel * acc.scaling_dirs_.unsqueeze(0)).sum(2);  // [M, S]
    acc.scaling_norm2_ = acc.scaling_dirs_.to(at::kDouble).pow(2).sum(1);   // [S]
    acc.num_error_ = at::zeros({M, S}, f64);
    acc.num_recon_ = at::zeros({M, S}, f64);
    acc.sum_f2_ = at::zeros({S}, f64);
    acc.category_tokens_ = at::zeros({options.num_categories}, f64);
    acc.category_mass_ = at::zeros({options.num_categories, F}, f64);
    acc.opts_ = std::move(options);
    return acc;
  });
}

absl::Status LatentStatisticsAccumulator::Add(const at::Tensor& x_in, const at::Tensor& xhat_in,
                                              const at::Tensor& f_in, int64_t first_row,
                                              const at::Tensor& category_mask) {
  const int64_t M = num_models_, F = num_latents_, D = d_model_;
  if (!x_in.defined() || x_in.dim() != 3 || x_in.size(1) != M || x_in.size(2) != D) {
    return absl::InvalidArgumentError(
        absl::StrCat("activations must be [rows, ", M, ", ", D, "], got ", ShapeText(x_in)));
  }
  const int64_t B = x_in.size(0);
  if (!xhat_in.defined() || !xhat_in.sizes().equals(x_in.sizes())) {
    return absl::InvalidArgumentError(absl::StrCat("reconstruction must match the activations ",
                                                   ShapeText(x_in), ", got ", ShapeText(xhat_in)));
  }
  if (!f_in.defined() || f_in.dim() != 2 || f_in.size(0) != B || f_in.size(1) != F) {
    return absl::InvalidArgumentError(
        absl::StrCat("latent activations must be [", B, ", ", F, "], got ", ShapeText(f_in)));
  }
  const int64_t C = opts_.num_categories;
  if (C > 0 && (!category_mask.defined() || category_mask.dim() != 2 ||
                category_mask.size(0) != B || category_mask.size(1) != C)) {
    return absl::InvalidArgumentError(
        absl::StrCat("category mask must be [", B, ", ", C, "], got ", ShapeText(category_mask)));
  }
  if (B == 0) return absl::OkStatus();
  return GuardTorch("latent statistics", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    const at::Tensor x = x_in.detach().to(at::kCPU, at::kFloat).contiguous();
    const at::Tensor xhat = xhat_in.detach().to(at::kCPU, at::kFloat).contiguous();
    const at::Tensor f = f_in.detach().to(at::kCPU, at::kFloat).contiguous();

    const at::Tensor active = f > 0;
    active_count_ += active.sum(0, /*keepdim=*/false, at::kLong);
    active_total_ += static_cast<double>(active.sum().item<int64_t>());
    max_act_ = at::maximum(max_act_, std::get<0>(f.max(0)));

    // Top rows: merge this batch's best K per latent into the running [K, F] table.
    const int64_t K = opts_.top_k;
    const int64_t kb = std::min<int64_t>(K, B);
    auto [bv, bi] = f.topk(kb, /*dim=*/0);
    at::Tensor cand_v = at::cat({top_values_, bv}, 0);
    at::Tensor cand_r = at::cat({top_rows_, bi + first_row}, 0);
    auto [mv, mi] = cand_v.topk(K, /*dim=*/0);
    top_values_ = mv.contiguous();
    top_rows_ = cand_r.gather(0, mi).contiguous();

    // FVU per model.
    const at::Tensor err = x - xhat;  // [B, M, D]
    sse_ += err.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
    sum_x_ += x.sum(0).to(at::kDouble);
    sum_x2_ += x.to(at::kDouble).pow(2).sum(at::IntArrayRef{0, 2});

    // Latent scaling on the selected latents.
    const int64_t S = scaling_dirs_.size(0);
    if (S > 0) {
      const at::Tensor fs = f.index_select(1, opts_.scaling_latents);  // [B, S]
      const at::Tensor fs2 = fs.pow(2).sum(0).to(at::kDouble);         // [S]
      sum_f2_ += fs2;
      const at::Tensor dirs_t = scaling_dirs_.t();  // [D, S]
      for (int64_t m = 0; m < M; ++m) {
        const at::Tensor proj_err = err.select(1, m).matmul(dirs_t);     // [B, S]
        const at::Tensor proj_rec = xhat.select(1, m).matmul(dirs_t);    // [B, S]
        const at::Tensor self = scaling_dots_[m].to(at::kDouble) * fs2;  // sum_n f^2 <d_j, d_j^m>
        num_error_[m] += (fs * proj_err).sum(0).to(at::kDouble) + self;
        num_recon_[m] += (fs * proj_rec).sum(0).to(at::kDouble) - self;
      }
    }

    if (C > 0) {
      const at::Tensor mask = category_mask.to(at::kCPU, at::kFloat);  // [B, C]
      category_tokens_ += mask.sum(0).to(at::kDouble);
      category_mass_ += mask.t().matmul(f).to(at::kDouble);
    }
    rows_ += B;
    return absl::OkStatus();
  });
}

LatentStatistics LatentStatisticsAccumulator::Finish() const {
  LatentStatistics s;
  s.rows = rows_;
  s.active_count = active_count_.clone();
  s.max_act = max_act_.clone();
  s.top_values = top_values_.clone();
  s.top_rows = top_rows_.clone();
  s.l0 = rows_ > 0 ? active_total_ / rows_ : 0.0;
  for (int64_t m = 0; m < num_models_; ++m) {
    const double n = static_cast<double>(rows_);
    const double sst =
        sum_x2_[m].item<double>() - (n > 0 ? sum_x_[m].pow(2).sum().item<double>() / n : 0.0);
    s.fvu.push_back(sst > 0 ? sse_[m].item<double>() / sst : std::nan(""));
  }
  s.scaling.latents = opts_.scaling_latents.clone();
  s.scaling.sum_f2 = sum_f2_.clone();
  const at::Tensor denom = (scaling_norm2_ * sum_f2_).unsqueeze(0);  // [1, S]
  s.scaling.beta_error = num_error_ / denom;
  s.scaling.beta_reconstruction = num_recon_ / denom;
  s.category_tokens = category_tokens_.clone();
  s.category_latent_mass = category_mass_.clone();
  return s;
}

std::optional<double> LatentStatisticsAccumulator::Nu(const at::Tensor& beta, int64_t s) {
  if (!beta.defined() || beta.size(0) < 2) return std::nullopt;
  const double base = beta[0][s].item<double>();
  const double ft = beta[1][s].item<double>();
  if (!std::isfinite(base) || !std::isfinite(ft) || ft == 0) return std::nullopt;
  return base / ft;
}

}  // namespace crossdiff::analysis
