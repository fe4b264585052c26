// RunAnalysis on a hand-made crosscoder and a tiny store: decoder statistics, frequencies, maxima,
// top examples with context, latent scaling scope, capability attribution and the report files,
// each against an independent computation; and the bad inputs (missing crosscoder, mismatched
// store).
#include "core/analysis/analyze.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/activations/store.h"
#include "core/crosscoder/crosscoder.h"
#include "core/tokenizer/tokenizer.h"

namespace crossdiff::analysis {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int64_t kRows = 40, kD = 4, kSeqLen = 10;

class AnalyzeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = (fs::temp_directory_path() /
             ("crossdiff_analyze_" + std::to_string(getpid()) + "_" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name()))
                .string();
    fs::remove_all(root_);
    fs::create_directories(root_);
    at::manual_seed(11);
    x_ = at::randn({kRows, 2, kD});
    WriteStore(root_ + "/store", x_, {"base", "chat"});
    WriteCrosscoder(root_ + "/cc");
  }
  void TearDown() override { fs::remove_all(root_); }

  static void WriteStore(const std::string& dir, const at::Tensor& x,
                         const std::vector<std::string>& models) {
    activations::StoreWriter::Options o;
    o.models = models;
    o.layer = 2;
    o.d_model = x.size(2);
    o.rows_per_shard = 16;  // several shards, windows cross shard boundaries
    auto w = activations::StoreWriter::Create(dir, o);
    ASSERT_TRUE(w.ok()) << w.status();
    const int64_t n = x.size(0);
    activations::ActivationBatch b;
    b.activations = x;
    b.token_ids = at::arange(100, 100 + n, at::kInt);
    b.sequence_ids = at::arange(0, n, at::kLong).div(kSeqLen, "floor");
    b.positions = at::arange(0, n, at::kLong).remainder(kSeqLen).to(at::kInt);
    ASSERT_TRUE((*w)->Append(b).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }

  // Latent 0: fine-tune only (decoder 2 e0 in the fine-tune), reads the fine-tune's coordinate 0.
  // Latent 1: shared (e1 in both), reads the base's coordinate 1.
  // Latent 2: base-leaning (3 e2 in the base, 0.2 e3 in the fine-tune), reads the base's
  // coordinate 2.
  static void WriteCrosscoder(const std::string& dir) {
    crosscoder::CrosscoderConfig c;
    c.architecture = crosscoder::Architecture::kReluL1;
    c.activation_dim = kD;
    c.dict_size = 3;
    c.num_models = 2;
    c.k = 0;
    c.models = {"base", "chat"};
    auto cc = crosscoder::Crosscoder::Create(c);
    ASSERT_TRUE(cc.ok()) << cc.status();
    at::Tensor enc = cc->W_enc();  // [M, d, F]
    at::Tensor dec = cc->W_dec();  // [M, F, d]
    enc.zero_();
    dec.zero_();
    enc[1][0][0] = 1.0;
    enc[0][1][1] = 1.0;
    enc[0][2][2] = 1.0;
    dec[1][0][0] = 2.0;
    dec[0][1][1] = 1.0;
    dec[1][1][1] = 1.0;
    dec[0][2][2] = 3.0;
    dec[1][2][3] = 0.2;
    ASSERT_TRUE(cc->SetNormalization(at::Tensor(), at::ones({2})).ok());
    ASSERT_TRUE(cc->Save(dir).ok());
  }

  AnalyzeOptions Options() const {
    AnalyzeOptions o;
    o.crosscoder_dir = root_ + "/cc";
    o.activations_dir = root_ + "/store";
    o.batch_rows = 7;
    o.top_k = 3;
    o.context_tokens = 2;
    return o;
  }

  // Independent latents: f0 = relu(x_ft[0]), f1 = relu(x_base[1]), f2 = relu(x_base[2]).
  std::vector<std::vector<double>> Latents() const {
    auto xa = x_.accessor<float, 3>();
    std::vector<std::vector<double>> f(3, std::vector<double>(kRows));
    for (int64_t n = 0; n < kRows; ++n) {
      f[0][n] = std::max(0.0f, xa[n][1][0]);
      f[1][n] = std::max(0.0f, xa[n][0][1]);
      f[2][n] = std::max(0.0f, xa[n][0][2]);
    }
    return f;
  }

  std::string root_;
  at::Tensor x_;
};

TEST_F(AnalyzeTest, MatchesAnIndependentComputation) {
  AnalyzeOptions o = Options();
  o.out_dir = root_ + "/report";
  auto r = RunAnalysis(o, {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->latents.size(), 3u);

  // Decoder statistics.
  EXPECT_DOUBLE_EQ(r->latents[0].delta, 0.0);
  EXPECT_EQ(r->latents[0].tag, LatentTag::kFinetuneOnly);
  EXPECT_DOUBLE_EQ(r->latents[0].dec_cos, 0.0);
  EXPECT_NEAR(r->latents[1].delta, 0.5, 1e-12);
  EXPECT_EQ(r->latents[1].tag, LatentTag::kShared);
  EXPECT_NEAR(r->latents[1].dec_cos, 1.0, 1e-6);
  EXPECT_NEAR(r->latents[2].delta, 0.5 * ((3.0 - 0.2) / 3.0 + 1.0), 1e-6);
  EXPECT_EQ(r->latents[2].tag, LatentTag::kBaseOnly);
  EXPECT_NEAR(r->latents[2].dec_cos, 0.0, 1e-12);

  // Frequencies, maxima, top examples.
  const auto f = Latents();
  for (int j = 0; j < 3; ++j) {
    int count = 0;
    double mx = 0;
    int64_t arg = -1;
    for (int64_t n = 0; n < kRows; ++n) {
      if (f[j][n] > 0) ++count;
      if (f[j][n] > mx) mx = f[j][n], arg = n;
    }
    EXPECT_DOUBLE_EQ(r->latents[j].freq, static_cast<double>(count) / kRows) << j;
    EXPECT_NEAR(r->latents[j].max_act, mx, 1e-6) << j;
    ASSERT_FALSE(r->latents[j].top_examples.empty());
    const TopExample& e = r->latents[j].top_examples[0];
    EXPECT_EQ(e.row, arg);
    EXPECT_NEAR(e.activation, mx, 1e-6);
    EXPECT_EQ(e.sequence_id, arg / kSeqLen);
    EXPECT_EQ(e.position, arg % kSeqLen);
    EXPECT_EQ(e.token_id, 100 + arg);
    // The window: positions within 2 of the token, in the same sequence.
    std::vector<int32_t> want;
    for (int64_t p = std::max<int64_t>(0, arg % kSeqLen - 2);
         p <= std::min<int64_t>(kSeqLen - 1, arg % kSeqLen + 2); ++p) {
      want.push_back(static_cast<int32_t>(100 + (arg / kSeqLen) * kSeqLen + p));
    }
    EXPECT_EQ(e.context_token_ids, want) << j;
    EXPECT_EQ(e.context_token_ids[e.context_index], e.token_id);
    EXPECT_FALSE(e.has_text);  // "base" is not a model directory: no tokenizer
    ASSERT_LE(r->latents[j].top_examples.size(), 3u);
    for (size_t k = 1; k < r->latents[j].top_examples.size(); ++k) {
      EXPECT_LE(r->latents[j].top_examples[k].activation,
                r->latents[j].top_examples[k - 1].activation);
    }
  }

  // Latent scaling: computed for the model-specific latents only.
  EXPECT_TRUE(r->latents[0].latent_scaling_computed);
  EXPECT_TRUE(r->latents[0].nu_error.has_value());
  EXPECT_FALSE(r->latents[1].latent_scaling_computed);
  EXPECT_FALSE(r->latents[1].nu_error.has_value());
  EXPECT_TRUE(r->latents[2].nu_error.has_value());

  // Summary.
  EXPECT_EQ(r->summary.rows, kRows);
  EXPECT_EQ(r->summary.counts.at("finetune_only"), 1);
  EXPECT_EQ(r->summary.counts.at("base_only"), 1);
  EXPECT_EQ(r->summary.counts.at("shared"), 1);
  EXPECT_EQ(r->summary.models, (std::vector<std::string>{"base", "chat"}));
  EXPECT_TRUE(r->capabilities.empty());
  double active = 0;
  for (int j = 0; j < 3; ++j)
    for (int64_t n = 0; n < kRows; ++n) active += f[j][n] > 0;
  EXPECT_NEAR(r->summary.l0, active / kRows, 1e-12);

  // The files.
  for (const char* name : {"report.json", "report.md", "report.html"}) {
    EXPECT_TRUE(fs::exists(root_ + "/report/" + name)) << name;
  }
  std::ifstream in(root_ + "/report/report.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["latents"].size(), 3u);
  EXPECT_TRUE(j["latents"][1]["nu_error"].is_null());
  EXPECT_TRUE(j["capabilities"].is_array());
  EXPECT_EQ(j["capabilities"].size(), 0u);
}

// FVU against the hand-made decoder, through the dense and the sparse decode paths.
TEST_F(AnalyzeTest, FvuMatchesAnIndependentReconstruction) {
  const auto f = Latents();
  auto xa = x_.accessor<float, 3>();
  double sse[2] = {0, 0}, sst[2] = {0, 0};
  for (int m = 0; m < 2; ++m) {
    for (int64_t c = 0; c < kD; ++c) {
      double mean = 0;
      for (int64_t n = 0; n < kRows; ++n) mean += xa[n][m][c] / kRows;
      for (int64_t n = 0; n < kRows; ++n) {
        // xhat: base = (0, f1, 3 f2, 0); fine-tune = (2 f0, f1, 0, 0.2 f2).
        double xhat = 0;
        if (m == 0) xhat = c == 1 ? f[1][n] : c == 2 ? 3 * f[2][n] : 0;
        if (m == 1) xhat = c == 0 ? 2 * f[0][n] : c == 1 ? f[1][n] : c == 3 ? 0.2 * f[2][n] : 0;
        sse[m] += std::pow(xa[n][m][c] - xhat, 2);
        sst[m] += std::pow(xa[n][m][c] - mean, 2);
      }
    }
  }
  for (double max_density : {0.0, 1.0}) {  // dense, then sparse decoding
    AnalyzeOptions o = Options();
    o.sparse_decode_max_density = max_density;
    auto r = RunAnalysis(o, {});
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->summary.fvu.size(), 2u);
    EXPECT_NEAR(r->summary.fvu[0], sse[0] / sst[0], 1e-5) << max_density;
    EXPECT_NEAR(r->summary.fvu[1], sse[1] / sst[1], 1e-5) << max_density;
  }
}

TEST_F(AnalyzeTest, LatentScalingOfAFineTuneOnlyLatent) {
  // Latent 0 fires with f0 = relu(x_ft[0]) and decodes d = 2 e0 into the fine-tune only. The base
  // model gets x_base[0] = 0.5 f0, which no latent reconstructs, so it stays in the base error:
  //   beta_base^err = sum f0 <2e0, 0.5 f0 e0> / (4 sum f0^2) = 0.25,
  //   beta_ft^err   = sum f0 <2e0, x_ft - xhat_ft + 2 f0 e0> / (4 sum f0^2) = 0.5   (x_ft[0] = f0
  //   there),
  // so nu_error = 0.5; the loop below recomputes it from the data independently.
  at::Tensor x = x_.clone();
  x.select(1, 0).select(1, 0) = 0.5 * at::relu(x.select(1, 1).select(1, 0));
  fs::remove_all(root_ + "/store");
  WriteStore(root_ + "/store", x, {"base", "chat"});
  auto r = RunAnalysis(Options(), {});
  ASSERT_TRUE(r.ok()) << r.status();
  // Independent computation of beta for latent 0 with d = 2 e0 (the fine-tune decoder).
  auto xa = x.accessor<float, 3>();
  double num_base = 0, num_ft = 0, f2 = 0;
  for (int64_t n = 0; n < kRows; ++n) {
    const double f0 = std::max(0.0f, xa[n][1][0]);
    // base: xhat_base[0] = 0 (no latent decodes into base coordinate 0) -> error target = x_base[0]
    num_base += f0 * 2.0 * xa[n][0][0];
    // fine-tune: xhat_ft[0] = 2 f0; error target = x_ft[0] - 2 f0 + f0 * 2 = x_ft[0]
    num_ft += f0 * 2.0 * xa[n][1][0];
    f2 += f0 * f0;
  }
  const double beta_base = num_base / (4.0 * f2), beta_ft = num_ft / (4.0 * f2);
  ASSERT_TRUE(r->latents[0].nu_error.has_value());
  EXPECT_NEAR(*r->latents[0].nu_error, beta_base / beta_ft, 1e-5);
  EXPECT_NEAR(*r->latents[0].nu_error, 0.5, 1e-5);  // x_base[0] = 0.5 relu(x_ft[0])
}

TEST_F(AnalyzeTest, CapabilityAttributionBySequenceIds) {
  const std::string cats = root_ + "/cats.json";
  std::ofstream(cats) << R"({"first_two": [0, 1], "third": {"sequence_ids": [2]}, "none": [99]})";
  AnalyzeOptions o = Options();
  o.categories_file = cats;
  auto r = RunAnalysis(o, {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->capabilities.size(), 3u);
  const auto f = Latents();
  auto mass = [&](int j, int64_t lo, int64_t hi) {
    double s = 0;
    for (int64_t n = lo; n < hi; ++n) s += f[j][n];
    return s;
  };
  const CapabilityReport& a = r->capabilities[0];
  EXPECT_EQ(a.category, "first_two");
  EXPECT_EQ(a.tokens, 20);
  EXPECT_NEAR(a.base_mass, mass(2, 0, 20) / 20, 1e-5);      // latent 2 is base_only
  EXPECT_NEAR(a.finetune_mass, mass(0, 0, 20) / 20, 1e-5);  // latent 0 is finetune_only
  ASSERT_TRUE(a.change_percent.has_value());
  EXPECT_NEAR(*a.change_percent, 100 * (a.finetune_mass - a.base_mass) / a.base_mass, 1e-9);
  EXPECT_THAT(a.latents, ::testing::UnorderedElementsAre(0, 2));
  EXPECT_EQ(r->capabilities[1].tokens, 10);
  EXPECT_NEAR(r->capabilities[1].base_mass, mass(2, 20, 30) / 10, 1e-5);
  EXPECT_EQ(r->capabilities[2].tokens, 0);
  EXPECT_FALSE(r->capabilities[2].change_percent.has_value());
}

TEST_F(AnalyzeTest, SubstringCategoriesNeedATokenizer) {
  const std::string cats = root_ + "/cats.json";
  std::ofstream(cats) << R"({"code": ["def "]})";
  AnalyzeOptions o = Options();
  o.categories_file = cats;
  auto r = RunAnalysis(o, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("category 'code'"));
}

std::string FixtureTokenizerDir() {
  const char* f = std::getenv("CROSSDIFF_FIXTURES");
  return std::string(f ? f : CROSSDIFF_SOURCE_DIR "/../shared/fixtures") + "/tokenizers/bpe-gpt2";
}

TEST_F(AnalyzeTest, DecodesContextsWithTheStoresTokenizer) {
  const std::string tok_dir = FixtureTokenizerDir();
  if (!fs::exists(tok_dir + "/tokenizer.json"))
    GTEST_SKIP() << "no tokenizer fixture at " << tok_dir;
  auto tok = tokenizer::Tokenizer::Load(tok_dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // The store's first model name is the model directory: the analysis finds the tokenizer there.
  fs::remove_all(root_ + "/store");
  WriteStore(root_ + "/store", x_, {tok_dir, "chat"});
  auto r = RunAnalysis(Options(), {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->summary.decoded_text);
  for (const LatentReport& l : r->latents) {
    for (const TopExample& e : l.top_examples) {
      ASSERT_TRUE(e.has_text);
      EXPECT_EQ(e.context_text, (*tok)->Decode(e.context_token_ids));
      EXPECT_EQ(e.token_text, (*tok)->Decode({e.token_id}));
    }
  }

  // Substring categories are matched against each sequence's decoded text.
  std::vector<int32_t> seq1;
  for (int32_t i = 0; i < kSeqLen; ++i) seq1.push_back(100 + kSeqLen + i);
  const std::string text1 = (*tok)->Decode(seq1);
  ASSERT_GE(text1.size(), 4u);
  // Four bytes from the middle, moved to UTF-8 character boundaries.
  auto is_continuation = [&](size_t i) { return i < text1.size() && (text1[i] & 0xC0) == 0x80; };
  size_t begin = text1.size() / 2 - 2, end = begin + 4;
  while (begin > 0 && is_continuation(begin)) --begin;
  while (end < text1.size() && is_continuation(end)) ++end;
  const std::string needle = text1.substr(begin, end - begin);
  int64_t matching_rows = 0;
  for (int64_t s = 0; s < kRows / kSeqLen; ++s) {
    std::vector<int32_t> ids;
    for (int32_t i = 0; i < kSeqLen; ++i)
      ids.push_back(static_cast<int32_t>(100 + s * kSeqLen + i));
    if ((*tok)->Decode(ids).find(needle) != std::string::npos) matching_rows += kSeqLen;
  }
  const std::string cats = root_ + "/cats.json";
  std::ofstream(cats) << nlohmann::json({{"needle", {needle}}}).dump();
  AnalyzeOptions o = Options();
  o.categories_file = cats;
  r = RunAnalysis(o, {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->capabilities.size(), 1u);
  EXPECT_GE(matching_rows, kSeqLen);
  EXPECT_EQ(r->capabilities[0].tokens, matching_rows);
}

TEST_F(AnalyzeTest, ExplicitTokenizerThatFailsIsAnError) {
  AnalyzeOptions o = Options();
  o.tokenizer_dir = root_ + "/no-tokenizer";
  auto r = RunAnalysis(o, {});
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("--tokenizer"));
}

TEST_F(AnalyzeTest, MissingCrosscoderDirectory) {
  AnalyzeOptions o = Options();
  o.crosscoder_dir = root_ + "/nope";
  auto r = RunAnalysis(o, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("crosscoder directory"));
  EXPECT_THAT(r.status().message(), HasSubstr("/nope"));
}

TEST_F(AnalyzeTest, EmptyCrosscoderDirectory) {
  fs::create_directories(root_ + "/empty");
  AnalyzeOptions o = Options();
  o.crosscoder_dir = root_ + "/empty";
  auto r = RunAnalysis(o, {});
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("config.json"));
}

TEST_F(AnalyzeTest, MissingStore) {
  AnalyzeOptions o = Options();
  o.activations_dir = root_ + "/no-store";
  auto r = RunAnalysis(o, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("activation store"));
}

TEST_F(AnalyzeTest, StoreWithAnotherDModel) {
  WriteStore(root_ + "/store5", at::randn({12, 2, 5}), {"base", "chat"});
  AnalyzeOptions o = Options();
  o.activations_dir = root_ + "/store5";
  auto r = RunAnalysis(o, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("d_model 5 does not match"));
  EXPECT_THAT(r.status().message(), HasSubstr("activation_dim 4"));
}

TEST_F(AnalyzeTest, StoreWithAnotherModelCount) {
  WriteStore(root_ + "/store3", at::randn({12, 3, kD}), {"base", "chat", "other"});
  AnalyzeOptions o = Options();
  o.activations_dir = root_ + "/store3";
  auto r = RunAnalysis(o, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("models has 3 entries"));
}

TEST_F(AnalyzeTest, BadOptions) {
  AnalyzeOptions o = Options();
  o.top_k = 0;
  EXPECT_THAT(RunAnalysis(o, {}).status().message(), HasSubstr("top_k"));
  o = Options();
  o.categories_file = root_ + "/missing.json";
  EXPECT_EQ(RunAnalysis(o, {}).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(AnalyzeTest, ReportsProgress) {
  int updates = 0;
  bool final = false;
  auto r = RunAnalysis(Options(), [&](const ProgressUpdate& u) {
    ++updates;
    EXPECT_EQ(u.phase, "analyze");
    final = final || u.final;
  });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(updates, 1);
  EXPECT_TRUE(final);
}

}  // namespace
}  // namespace crossdiff::analysis
