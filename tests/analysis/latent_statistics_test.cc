// LatentStatisticsAccumulator against independent scalar loops: frequency, maximum, top rows, FVU,
// L0, category mass, and latent scaling on a constructed case whose answer is known.
#include "core/analysis/latent_statistics.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace crossdiff::analysis {
namespace {

using ::testing::HasSubstr;

// Random sparse latents [B, F] (about 30% active), activations and a decoder.
struct Case {
  at::Tensor x, xhat, f, decoder, mask;
};

Case MakeCase(int64_t B, int64_t M, int64_t F, int64_t D, int64_t C, uint64_t seed) {
  at::manual_seed(seed);
  Case c;
  c.decoder = at::randn({M, F, D});
  c.f = at::relu(at::randn({B, F}) - 0.5);
  c.x = at::randn({B, M, D});
  c.xhat = at::einsum("bf,mfd->bmd", {c.f, c.decoder});
  c.mask = (at::rand({B, C}) < 0.4).to(at::kFloat);
  return c;
}

TEST(LatentStatisticsTest, MatchesScalarLoops) {
  const int64_t B = 100, M = 2, F = 7, D = 5, C = 3, K = 4;
  const Case c = MakeCase(B, M, F, D, C, 1);
  LatentStatisticsAccumulator::Options opts;
  opts.top_k = K;
  opts.num_categories = C;
  auto acc = LatentStatisticsAccumulator::Create(c.decoder, opts);
  ASSERT_TRUE(acc.ok()) << acc.status();
  // Three uneven batches, global row numbering from 1000.
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 37}, {37, 38}, {38, B}}) {
    ASSERT_TRUE(acc->Add(c.x.slice(0, b, e), c.xhat.slice(0, b, e), c.f.slice(0, b, e), 1000 + b,
                         c.mask.slice(0, b, e))
                    .ok());
  }
  const LatentStatistics s = acc->Finish();
  EXPECT_EQ(s.rows, B);

  auto fa = c.f.accessor<float, 2>();
  auto xa = c.x.accessor<float, 3>();
  auto ha = c.xhat.accessor<float, 3>();
  auto ma = c.mask.accessor<float, 2>();
  double active_total = 0;
  for (int64_t j = 0; j < F; ++j) {
    int64_t count = 0;
    float mx = 0;
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t n = 0; n < B; ++n) {
      if (fa[n][j] > 0) ++count;
      mx = std::max(mx, fa[n][j]);
      all.emplace_back(fa[n][j], 1000 + n);
    }
    active_total += count;
    EXPECT_EQ(s.active_count[j].item<int64_t>(), count) << j;
    EXPECT_FLOAT_EQ(s.max_act[j].item<float>(), mx) << j;
    std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
    for (int64_t k = 0; k < K; ++k) {
      EXPECT_FLOAT_EQ(s.top_values[k][j].item<float>(), all[k].first) << j << " " << k;
      if (all[k].first > 0) {
        EXPECT_EQ(s.top_rows[k][j].item<int64_t>(), all[k].second) << j << " " << k;
      }
    }
    for (int64_t cat = 0; cat < C; ++cat) {
      double mass = 0;
      for (int64_t n = 0; n < B; ++n) mass += ma[n][cat] * fa[n][j];
      EXPECT_NEAR(s.category_latent_mass[cat][j].item<double>(), mass, 1e-4);
    }
  }
  EXPECT_NEAR(s.l0, active_total / B, 1e-12);
  for (int64_t m = 0; m < M; ++m) {
    double sse = 0, sst = 0;
    std::vector<double> mean(D, 0);
    for (int64_t n = 0; n < B; ++n)
      for (int64_t d = 0; d < D; ++d) mean[d] += xa[n][m][d] / B;
    for (int64_t n = 0; n < B; ++n) {
      for (int64_t d = 0; d < D; ++d) {
        sse += std::pow(xa[n][m][d] - ha[n][m][d], 2);
        sst += std::pow(xa[n][m][d] - mean[d], 2);
      }
    }
    EXPECT_NEAR(s.fvu[m], sse / sst, 1e-5) << m;
  }
  for (int64_t cat = 0; cat < C; ++cat) {
    EXPECT_NEAR(s.category_tokens[cat].item<double>(), c.mask.select(1, cat).sum().item<double>(),
                1e-9);
  }
}

// Latent 0 decodes only into the fine-tune (direction u); the base model nevertheless carries
// alpha * f0 * u, which the crosscoder leaves in its error. Latent 1 decodes into both models along
// v. Known answers: beta_ft^err = 1, beta_base^err = alpha, so nu_error = alpha; for the
// reconstruction target, beta_m^rec = sum f0 f1 <u, v_m> / sum f0^2 (v_m = latent 1's decoder in
// model m).
TEST(LatentStatisticsTest, LatentScalingOnAConstructedCase) {
  const int64_t B = 64, D = 4;
  const double alpha = 0.3;
  at::manual_seed(3);
  at::Tensor u = at::zeros({D});
  u[0] = 2.0;  // not unit: beta divides by ||d||^2
  at::Tensor v_base = at::tensor({0.5f, 1.0f, 0.0f, 0.0f});
  at::Tensor v_ft = at::tensor({0.25f, 0.0f, 1.0f, 0.0f});
  at::Tensor decoder = at::zeros({2, 2, D});
  decoder[1][0] = u;
  decoder[0][1] = v_base;
  decoder[1][1] = v_ft;
  at::Tensor f = at::relu(at::randn({B, 2}));
  at::Tensor xhat = at::einsum("bf,mfd->bmd", {f, decoder});
  at::Tensor x = xhat.clone();
  x.select(1, 0) += alpha * f.select(1, 0).unsqueeze(1) * u.unsqueeze(0);

  LatentStatisticsAccumulator::Options opts;
  opts.scaling_latents = at::tensor({int64_t{0}});
  auto acc = LatentStatisticsAccumulator::Create(decoder, opts);
  ASSERT_TRUE(acc.ok()) << acc.status();
  ASSERT_TRUE(acc->Add(x.slice(0, 0, 20), xhat.slice(0, 0, 20), f.slice(0, 0, 20), 0).ok());
  ASSERT_TRUE(acc->Add(x.slice(0, 20, B), xhat.slice(0, 20, B), f.slice(0, 20, B), 20).ok());
  const LatentStatistics s = acc->Finish();

  EXPECT_NEAR(s.scaling.beta_error[1][0].item<double>(), 1.0, 1e-5);
  EXPECT_NEAR(s.scaling.beta_error[0][0].item<double>(), alpha, 1e-5);
  auto nu = LatentStatisticsAccumulator::Nu(s.scaling.beta_error, 0);
  ASSERT_TRUE(nu.has_value());
  EXPECT_NEAR(*nu, alpha, 1e-5);

  auto fa = f.accessor<float, 2>();
  double f00 = 0, f01 = 0;
  for (int64_t n = 0; n < B; ++n) {
    f00 += fa[n][0] * fa[n][0];
    f01 += fa[n][0] * fa[n][1];
  }
  const double uv_base = (u * v_base).sum().item<double>();
  const double uv_ft = (u * v_ft).sum().item<double>();
  const double uu = (u * u).sum().item<double>();
  const double beta_rec_base = f01 * uv_base / (uu * f00);
  const double beta_rec_ft = f01 * uv_ft / (uu * f00);
  EXPECT_NEAR(s.scaling.beta_reconstruction[0][0].item<double>(), beta_rec_base, 1e-5);
  EXPECT_NEAR(s.scaling.beta_reconstruction[1][0].item<double>(), beta_rec_ft, 1e-5);
  auto nu_r = LatentStatisticsAccumulator::Nu(s.scaling.beta_reconstruction, 0);
  ASSERT_TRUE(nu_r.has_value());
  EXPECT_NEAR(*nu_r, beta_rec_base / beta_rec_ft, 1e-4);
}

TEST(LatentStatisticsTest, NeverFiringLatentHasNoNu) {
  at::Tensor decoder = at::randn({2, 3, 4});
  LatentStatisticsAccumulator::Options opts;
  opts.scaling_latents = at::tensor({int64_t{2}});
  auto acc = LatentStatisticsAccumulator::Create(decoder, opts);
  ASSERT_TRUE(acc.ok());
  at::Tensor f = at::zeros({5, 3});
  at::Tensor x = at::randn({5, 2, 4});
  ASSERT_TRUE(acc->Add(x, x, f, 0).ok());
  const LatentStatistics s = acc->Finish();
  EXPECT_FALSE(LatentStatisticsAccumulator::Nu(s.scaling.beta_error, 0).has_value());
  EXPECT_EQ(s.top_rows[0][2].item<int64_t>(), -1);  // no example recorded for a silent latent
  EXPECT_EQ(s.top_values[0][2].item<float>(), 0.0f);
}

TEST(LatentStatisticsTest, RejectsBadShapes) {
  at::Tensor decoder = at::randn({2, 3, 4});
  EXPECT_THAT(LatentStatisticsAccumulator::Create(at::randn({3, 4}), {}).status().message(),
              HasSubstr("decoder must be [models, latents, d_model]"));
  LatentStatisticsAccumulator::Options opts;
  opts.scaling_latents = at::tensor({int64_t{3}});
  EXPECT_THAT(LatentStatisticsAccumulator::Create(decoder, opts).status().message(),
              HasSubstr("out of range"));
  auto acc = LatentStatisticsAccumulator::Create(decoder, {});
  ASSERT_TRUE(acc.ok());
  absl::Status st = acc->Add(at::randn({5, 2, 5}), at::randn({5, 2, 5}), at::zeros({5, 3}), 0);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("activations must be [rows, 2, 4]"));
  st = acc->Add(at::randn({5, 2, 4}), at::randn({5, 2, 4}), at::zeros({5, 2}), 0);
  EXPECT_THAT(st.message(), HasSubstr("latent activations must be [5, 3]"));
}

}  // namespace
}  // namespace crossdiff::analysis
