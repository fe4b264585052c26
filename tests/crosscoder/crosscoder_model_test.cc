// The Crosscoder model: initialisation, encode/decode semantics and the checkpoint format (3.3).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/crosscoder/crosscoder.h"
#include "core/tensor_io/safetensors.h"

namespace crossdiff::crosscoder {
namespace {

using ::testing::HasSubstr;

std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("crosscoder_model_test_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

CrosscoderConfig SmallConfig(Architecture arch = Architecture::kBatchTopK) {
  CrosscoderConfig c;
  c.architecture = arch;
  c.activation_dim = 6;
  c.dict_size = 10;
  c.num_models = 2;
  c.k = arch == Architecture::kBatchTopK ? 3 : 0;
  c.models = {"base", "chat"};
  c.layer = 4;
  return c;
}

TEST(CrosscoderTest, InitialisationSharesEncoderAndTransposesDecoder) {
  auto cc = Crosscoder::Create(SmallConfig());
  ASSERT_TRUE(cc.ok()) << cc.status();
  cc->InitializeWeights(7, 0.25);
  at::Tensor norms = cc->DecoderNorms();
  ASSERT_EQ(norms.sizes(), (at::IntArrayRef{2, 10}));
  EXPECT_TRUE(at::allclose(norms, at::full_like(norms, 0.25), 1e-5, 1e-6));
  // Same encoder block for each model; encoder == decoder transposed.
  at::Tensor we = cc->W_enc(), wd = cc->W_dec();
  EXPECT_TRUE(at::equal(we[0], we[1]));
  EXPECT_TRUE(at::equal(we.permute({0, 2, 1}), wd));
  EXPECT_TRUE(at::allclose(cc->LatentWeights(), at::full({10}, 0.5), 1e-5, 1e-6));
}

TEST(CrosscoderTest, EncodeDecodeFollowTheEquations) {
  auto cc = Crosscoder::Create(SmallConfig());
  ASSERT_TRUE(cc.ok());
  cc->InitializeWeights(3, 1.0);
  cc->b_enc().uniform_(-0.1, 0.1);
  cc->b_dec().normal_();
  ASSERT_TRUE(cc->SetNormalization(at::randn({2, 6}), at::tensor({0.5f, 2.0f})).ok());
  at::Tensor x = at::randn({5, 2, 6});
  at::Tensor xn = cc->Normalize(x);
  at::Tensor expect_xn =
      (x - cc->activation_mean().unsqueeze(0)) * cc->activation_scale().view({1, 2, 1});
  EXPECT_TRUE(at::allclose(xn, expect_xn));
  EXPECT_TRUE(at::allclose(cc->Denormalize(xn), x, 1e-5, 1e-5));
  // pre = sum_m xn_m W_enc^m + b_enc
  at::Tensor pre = at::einsum("bmd,mdf->bf", {xn, cc->W_enc()}) + cc->b_enc();
  EXPECT_TRUE(at::allclose(cc->EncodePre(xn), pre, 1e-5, 1e-5));
  at::Tensor f = at::relu(at::randn({5, 10}));
  at::Tensor xhat = at::einsum("bf,mfd->bmd", {f, cc->W_dec()}) + cc->b_dec().unsqueeze(0);
  EXPECT_TRUE(at::allclose(cc->Decode(f), xhat, 1e-5, 1e-5));
  // Before a threshold exists: the batch's top k*B scores.
  at::Tensor enc = cc->Encode(xn);
  EXPECT_LE((enc > 0).sum().item<int64_t>(), 3 * 5);
  // With a threshold: relu(pre) where relu(pre) * w > threshold.
  cc->set_threshold(0.3);
  at::Tensor act = at::relu(pre);
  at::Tensor expect = act * ((act * cc->LatentWeights()) > 0.3).to(at::kFloat);
  EXPECT_TRUE(at::allclose(cc->Encode(xn), expect, 1e-5, 1e-5));
}

TEST(CrosscoderTest, BatchTopKMaskKeepsTheLargestPositiveScores) {
  at::Tensor s = at::tensor({0.f, 5.f, 1.f, 3.f, -1.f, 4.f}).view({2, 3});
  at::Tensor m = BatchTopKMask(s, 3);
  EXPECT_TRUE(at::equal(m, at::tensor({0.f, 1.f, 0.f, 1.f, 0.f, 1.f}).view({2, 3})));
  // Non-positive scores are never kept, even when k*B exceeds the positives.
  EXPECT_EQ(BatchTopKMask(s, 6).sum().item<float>(), 4.f);
}

TEST(CrosscoderTest, CheckpointRoundTripsInTheContractFormat) {
  auto cc = Crosscoder::Create(SmallConfig());
  ASSERT_TRUE(cc.ok());
  cc->InitializeWeights(11, 0.1);
  cc->b_enc().normal_();
  cc->b_dec().normal_();
  ASSERT_TRUE(cc->SetNormalization(at::randn({2, 6}), at::tensor({0.5f, 2.0f})).ok());
  cc->set_threshold(0.75);
  const std::string dir = TempDir("roundtrip");
  ASSERT_TRUE(cc->Save(dir).ok());

  // The contract: tensor names, shapes and F32.
  auto file = tensor_io::SafetensorsFile::Open(dir + "/crosscoder.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::map<std::string, std::vector<int64_t>> expect = {{"encoder.weight", {2, 6, 10}},
                                                        {"encoder.bias", {10}},
                                                        {"decoder.weight", {2, 10, 6}},
                                                        {"decoder.bias", {2, 6}},
                                                        {"activation_scale", {2}},
                                                        {"activation_mean", {2, 6}},
                                                        {"threshold", {}}};
  for (const auto& [name, shape] : expect) {
    const tensor_io::TensorInfo* info = (*file)->Find(name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_EQ(info->shape, shape) << name;
    EXPECT_EQ(info->dtype, tensor_io::DType::kF32) << name;
  }
  std::ifstream in(dir + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  EXPECT_EQ(cfg["architecture"], "batch_top_k");
  EXPECT_EQ(cfg["activation_dim"], 6);
  EXPECT_EQ(cfg["dict_size"], 10);
  EXPECT_EQ(cfg["num_models"], 2);
  EXPECT_EQ(cfg["k"], 3);
  EXPECT_EQ(cfg["models"], nlohmann::json({"base", "chat"}));
  EXPECT_EQ(cfg["layer"], 4);

  auto loaded = Crosscoder::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(at::equal(loaded->W_enc(), cc->W_enc()));
  EXPECT_TRUE(at::equal(loaded->W_dec(), cc->W_dec()));
  EXPECT_TRUE(at::equal(loaded->b_enc(), cc->b_enc()));
  EXPECT_TRUE(at::equal(loaded->b_dec(), cc->b_dec()));
  EXPECT_TRUE(at::equal(loaded->activation_mean(), cc->activation_mean()));
  EXPECT_TRUE(at::equal(loaded->activation_scale(), cc->activation_scale()));
  EXPECT_FLOAT_EQ(loaded->threshold(), 0.75);
  EXPECT_EQ(loaded->config().models, cc->config().models);
  EXPECT_TRUE(loaded->config().CheckCompatible(cc->config(), "x").ok());
  std::filesystem::remove_all(dir);
}

TEST(CrosscoderTest, LoadRejectsATensorOfTheWrongShape) {
  auto cc = Crosscoder::Create(SmallConfig(Architecture::kReluL1));
  ASSERT_TRUE(cc.ok());
  const std::string dir = TempDir("badshape");
  ASSERT_TRUE(cc->Save(dir).ok());
  // config.json now claims another dictionary size than the weights hold.
  std::ifstream in(dir + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  in.close();
  cfg["dict_size"] = 12;
  std::ofstream(dir + "/config.json") << cfg.dump();
  auto loaded = Crosscoder::Load(dir);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("encoder.weight"));
  std::filesystem::remove_all(dir);
}

TEST(CrosscoderTest, ConfigValidationAndCompatibility) {
  CrosscoderConfig c = SmallConfig();
  c.k = 11;
  EXPECT_THAT(std::string(c.Validate().message()), HasSubstr("k must be in [1, dict_size=10]"));
  c = SmallConfig();
  c.num_models = 1;
  c.models.clear();
  EXPECT_THAT(std::string(c.Validate().message()), HasSubstr("num_models must be at least 2"));
  CrosscoderConfig a = SmallConfig(), b = SmallConfig(Architecture::kReluL1);
  absl::Status s = a.CheckCompatible(b, "resume");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("architecture is relu_l1 but this run has batch_top_k"));
  b = SmallConfig();
  b.dict_size = 20;
  EXPECT_THAT(std::string(a.CheckCompatible(b, "resume").message()), HasSubstr("dict_size is 20"));
  EXPECT_TRUE(ParseArchitecture("batch-topk").ok());
  EXPECT_TRUE(ParseArchitecture("relu_l1").ok());
  EXPECT_EQ(ParseArchitecture("topk").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace crossdiff::crosscoder
