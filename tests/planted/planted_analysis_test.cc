// RunAnalysis on a planted store with the ideal crosscoder: decoder = the planted dictionary (one
// latent per feature), encoder = its transpose with a negative bias. No training is involved, so
// this checks the analysis alone: every latent must be tagged as its group, shared latents must
// show the planted decoder cosine, latent scaling must call fine-tune-only latents fine-tune
// specific (nu near 0) and base-only ones base specific (1/nu near 0).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "core/analysis/analyze.h"
#include "core/crosscoder/crosscoder.h"
#include "tests/planted/planted_store.h"

namespace crossdiff {
namespace {

namespace fs = std::filesystem;

TEST(PlantedAnalysisTest, IdealCrosscoderIsTaggedAndScaledCorrectly) {
  const std::string root =
      (fs::temp_directory_path() / ("crossdiff_planted_ideal_" + std::to_string(getpid())))
          .string();
  fs::remove_all(root);
  planted::PlantedOptions po;
  po.rows = 16384;
  po.shared_cosine = 0.8;
  auto store = planted::WritePlantedStore(root + "/store", po);
  ASSERT_TRUE(store.ok()) << store.status();
  const int64_t N = store->num_features(), D = po.d_model;

  crosscoder::CrosscoderConfig c;
  c.architecture = crosscoder::Architecture::kReluL1;
  c.activation_dim = D;
  c.dict_size = N;
  c.num_models = 2;
  c.models = po.models;
  auto cc = crosscoder::Crosscoder::Create(c);
  ASSERT_TRUE(cc.ok()) << cc.status();
  cc->W_dec().copy_(store->dictionary);                           // [2, N, D]
  cc->W_enc().copy_(store->dictionary.permute({0, 2, 1}) * 0.5);  // [2, D, N]
  cc->b_enc().fill_(-0.2);
  ASSERT_TRUE(cc->SetNormalization(at::Tensor(), at::ones({2})).ok());
  ASSERT_TRUE(cc->Save(root + "/cc").ok());

  analysis::AnalyzeOptions o;
  o.crosscoder_dir = root + "/cc";
  o.activations_dir = root + "/store";
  o.top_k = 5;
  auto r = analysis::RunAnalysis(o, {});
  ASSERT_TRUE(r.ok()) << r.status();

  int top_token_hits = 0;
  for (int64_t i = 0; i < N; ++i) {
    const analysis::LatentReport& l = r->latents[i];
    const planted::FeatureGroup g = store->groups[i];
    SCOPED_TRACE(testing::Message() << "feature " << i << " (" << planted::GroupName(g) << ")");
    switch (g) {
      case planted::FeatureGroup::kShared:
        EXPECT_EQ(l.tag, analysis::LatentTag::kShared);
        EXPECT_NEAR(l.delta, 0.5, 1e-6);
        EXPECT_NEAR(l.dec_cos, po.shared_cosine, 1e-5);
        EXPECT_FALSE(l.nu_error.has_value());
        break;
      case planted::FeatureGroup::kBaseOnly:
        EXPECT_EQ(l.tag, analysis::LatentTag::kBaseOnly);
        EXPECT_DOUBLE_EQ(l.delta, 1.0);
        ASSERT_TRUE(l.nu_error.has_value());
        EXPECT_LT(std::abs(1.0 / *l.nu_error), 0.2) << *l.nu_error;
        break;
      case planted::FeatureGroup::kFinetuneOnly:
        EXPECT_EQ(l.tag, analysis::LatentTag::kFinetuneOnly);
        EXPECT_DOUBLE_EQ(l.delta, 0.0);
        ASSERT_TRUE(l.nu_error.has_value());
        EXPECT_LT(std::abs(*l.nu_error), 0.2) << *l.nu_error;
        break;
    }
    // The transposed dictionary is not a perfect encoder: interference from other active features
    // adds spurious firing (a lot for shared features, read from both models), never removes the
    // real one (magnitudes >= 0.5 > the bias).
    const double p = store->frequencies[i].item<double>();
    EXPECT_GE(l.freq, 0.9 * p);
    ASSERT_FALSE(l.top_examples.empty());
    if (l.top_examples[0].token_id == 1 + i) ++top_token_hits;
  }
  // The strongest feature of a row names its token; a latent's top row usually has its own feature
  // as the strongest one.
  EXPECT_GE(top_token_hits, N / 3);
  EXPECT_EQ(r->summary.counts.at("shared"), po.num_shared);
  EXPECT_EQ(r->summary.counts.at("base_only"), po.num_base_only);
  EXPECT_EQ(r->summary.counts.at("finetune_only"), po.num_finetune_only);
  fs::remove_all(root);
}

}  // namespace
}  // namespace crossdiff
