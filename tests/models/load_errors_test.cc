// Loading edge cases: sharded checkpoints, and every bad input with its exact error.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/models/causal_lm.h"
#include "tests/models/fixture_util.h"

namespace crossdiff::models {
namespace {

namespace fs = std::filesystem;
using testing::AllClose;
using ::testing::HasSubstr;
using testing::HfFixture;
using testing::LoadOrDie;

// A fresh directory per test under the gtest temp dir.
std::string MakeTempDir(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) /
                 ("crossdiff_models_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Copies every tensor of `src` into `writer`, renaming `from` to `to` and keeping only the names
// `keep` accepts.
template <typename Keep>
void CopyTensors(const tensor_io::SafetensorsFile& src, tensor_io::SafetensorsWriter& writer,
                 const std::string& from, const std::string& to, Keep keep) {
  for (const auto& info : src.tensors()) {
    if (!keep(info.name)) continue;
    const std::string name = info.name == from ? to : info.name;
    ASSERT_TRUE(writer.Add(name, info.dtype, info.shape, src.data(info), info.nbytes()).ok());
  }
}

// A copy of the fixture `arch` in a fresh directory: its config.json and the tensors `keep`
// accepts.
template <typename Keep>
std::string PartialFixture(const std::string& name, const std::string& arch, Keep keep) {
  const std::string dir = MakeTempDir(name);
  fs::copy_file(HfFixture(arch) + "/config.json", dir + "/config.json");
  auto src = tensor_io::SafetensorsFile::Open(HfFixture(arch) + "/model.safetensors");
  EXPECT_TRUE(src.ok()) << src.status();
  if (!src.ok()) return dir;
  tensor_io::SafetensorsWriter writer;
  CopyTensors(**src, writer, "", "", keep);
  EXPECT_TRUE(writer.Write(dir + "/model.safetensors").ok());
  return dir;
}

TEST(LoadErrorsTest, MissingTensorNamesTensorAndFile) {
  const std::string dir = MakeTempDir("missing");
  fs::copy_file(HfFixture("llama") + "/config.json", dir + "/config.json");
  auto src = tensor_io::SafetensorsFile::Open(HfFixture("llama") + "/model.safetensors");
  ASSERT_TRUE(src.ok()) << src.status();
  tensor_io::SafetensorsWriter writer;
  const std::string victim = "model.layers.1.mlp.up_proj.weight";
  CopyTensors(**src, writer, victim, victim + "_renamed", [](const std::string&) { return true; });
  ASSERT_TRUE(writer.Write(dir + "/model.safetensors").ok());
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("'" + victim + "'"));
  EXPECT_THAT(model.status().message(), HasSubstr(dir + "/model.safetensors"));
}

TEST(LoadErrorsTest, UntiedModelWithoutLmHeadFails) {
  const std::string dir =
      PartialFixture("nohead", "qwen2", [](const std::string& n) { return n != "lm_head.weight"; });
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("'lm_head.weight'"));
}

// A model loaded up to a block reads nothing after it: the missing head and a broken later block do
// not matter, the block range is checked.
TEST(LoadErrorsTest, LoadUpToABlockReadsOnlyThoseBlocks) {
  const std::string dir = PartialFixture("upto", "qwen2", [](const std::string& n) {
    return n != "lm_head.weight" && n != "model.norm.weight" && n.rfind("model.layers.1.", 0) != 0;
  });
  auto model = CausalLM::Load(dir, at::kCPU, std::nullopt, 0);
  ASSERT_TRUE(model.ok()) << model.status();
  auto full = CausalLM::Load(HfFixture("qwen2"));
  ASSERT_TRUE(full.ok()) << full.status();
  at::Tensor ids = at::arange(12, at::kLong).reshape({2, 6});
  at::Tensor mask = at::ones_like(ids);
  auto got = (*model)->ResidualAfterBlock(ids, mask, 0);
  auto want = (*full)->ResidualAfterBlock(ids, mask, 0);
  ASSERT_TRUE(got.ok() && want.ok()) << got.status();
  EXPECT_TRUE(at::equal(*got, *want));
  // Loading further needs the missing block.
  auto block1 = CausalLM::Load(dir, at::kCPU, std::nullopt, 1);
  EXPECT_EQ(block1.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(block1.status().message(), HasSubstr("'model.layers.1."));
  const int64_t n = (*full)->config().num_layers;
  for (int bad : {-1, static_cast<int>(n)}) {
    auto out_of_range = CausalLM::Load(HfFixture("qwen2"), at::kCPU, std::nullopt, bad);
    EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(out_of_range.status().message(),
                HasSubstr("layer " + std::to_string(bad) + " is out of range: the model has " +
                          std::to_string(n) + " blocks"));
  }
}

TEST(LoadErrorsTest, ShapeMismatchWithConfigIsNamed) {
  const std::string dir = MakeTempDir("shape");
  // config says 4 kv heads, the file holds 2.
  std::ifstream in(HfFixture("llama") + "/config.json");
  std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string from = "\"num_key_value_heads\": 2";
  ASSERT_NE(cfg.find(from), std::string::npos);
  cfg.replace(cfg.find(from), from.size(), "\"num_key_value_heads\": 4");
  WriteText(dir + "/config.json", cfg);
  fs::copy_file(HfFixture("llama") + "/model.safetensors", dir + "/model.safetensors");
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("model.layers.0.self_attn.k_proj.weight"));
  EXPECT_THAT(model.status().message(), HasSubstr("[32, 64]"));
}

TEST(LoadErrorsTest, UnknownModelTypeListsSupported) {
  const std::string dir = MakeTempDir("unknown");
  WriteText(dir + "/config.json", R"({"model_type": "falcon", "hidden_size": 64})");
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("'falcon'"));
  EXPECT_THAT(model.status().message(), HasSubstr("gemma, gemma2, gpt2, llama, mistral, qwen2"));
}

TEST(LoadErrorsTest, MalformedConfigJson) {
  const std::string dir = MakeTempDir("malformed");
  WriteText(dir + "/config.json", "{\"model_type\": \"llama\",, }");
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr(dir + "/config.json"));
  EXPECT_THAT(model.status().message(), HasSubstr("malformed JSON"));
}

TEST(LoadErrorsTest, NoWeightsFile) {
  const std::string dir = MakeTempDir("noweights");
  fs::copy_file(HfFixture("llama") + "/config.json", dir + "/config.json");
  auto model = CausalLM::Load(dir);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("model.safetensors"));
}

TEST(LoadErrorsTest, CudaWithoutCudaIsFailedPrecondition) {
  if (at::hasCUDA()) GTEST_SKIP() << "CUDA is available here";
  auto model = CausalLM::Load(HfFixture("llama"), at::Device("cuda:0"));
  EXPECT_EQ(model.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(model.status().message(), HasSubstr("cuda:0"));
}

TEST(LoadErrorsTest, ShardedCheckpointMatchesSingleFile) {
  const std::string dir = MakeTempDir("sharded");
  fs::copy_file(HfFixture("gemma2") + "/config.json", dir + "/config.json");
  auto src = tensor_io::SafetensorsFile::Open(HfFixture("gemma2") + "/model.safetensors");
  ASSERT_TRUE(src.ok());
  auto first_shard = [](const std::string& n) {
    return n.find("layers.0.") != std::string::npos || n.find("embed") != std::string::npos;
  };
  tensor_io::SafetensorsWriter a, b;
  CopyTensors(**src, a, "", "", first_shard);
  CopyTensors(**src, b, "", "", [&](const std::string& n) { return !first_shard(n); });
  ASSERT_TRUE(a.Write(dir + "/model-00001-of-00002.safetensors").ok());
  ASSERT_TRUE(b.Write(dir + "/model-00002-of-00002.safetensors").ok());
  std::string index = "{\"metadata\": {}, \"weight_map\": {";
  bool first = true;
  for (const auto& info : (*src)->tensors()) {
    index += std::string(first ? "" : ", ") + "\"" + info.name + "\": \"model-0000" +
             (first_shard(info.name) ? "1" : "2") + "-of-00002.safetensors\"";
    first = false;
  }
  WriteText(dir + "/model.safetensors.index.json", index + "}}");
  auto model = CausalLM::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto expected = tensor_io::SafetensorsFile::Open(HfFixture("gemma2") + "/expected.safetensors");
  ASSERT_TRUE(expected.ok());
  ForwardRequest req;
  req.logits = true;
  auto r = (*model)->Forward(LoadOrDie(**expected, "input_ids"),
                             LoadOrDie(**expected, "attention_mask"), req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(AllClose(r->logits, LoadOrDie(**expected, "logits")));
}

class ForwardErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = CausalLM::Load(HfFixture("llama"));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    ids_ = at::randint(0, 512, {2, 6}, at::kLong);
    mask_ = at::ones_like(ids_);
  }
  std::unique_ptr<CausalLM> model_;
  at::Tensor ids_, mask_;
};

TEST_F(ForwardErrorsTest, LayerOutOfRangeNamesLayerAndCount) {
  for (int layer : {3, 17, -1}) {
    auto r = model_->ResidualAfterBlock(ids_, mask_, layer);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("layer " + std::to_string(layer)));
    EXPECT_THAT(r.status().message(), HasSubstr("3 blocks"));
  }
}

TEST_F(ForwardErrorsTest, BadInputs) {
  ForwardRequest req;
  req.logits = true;
  auto oov = model_->Forward(ids_.fill_(512), mask_, req);
  EXPECT_EQ(oov.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(oov.status().message(), HasSubstr("token id 512"));
  auto shape = model_->Forward(ids_.fill_(1), at::ones({2, 5}, at::kLong), req);
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(shape.status().message(), HasSubstr("attention_mask"));
  auto floats = model_->Forward(ids_.to(at::kFloat), mask_, req);
  EXPECT_EQ(floats.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(floats.status().message(), HasSubstr("input_ids"));
  auto nothing = model_->Forward(ids_, mask_, ForwardRequest{});
  EXPECT_EQ(nothing.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ForwardErrorsTest, FullyPaddedRowStaysFinite) {
  // A row with no real token: every key is masked with the dtype's lowest value (not -inf), so the
  // softmax stays defined, as in transformers.
  mask_[1].fill_(0);
  ForwardRequest req;
  req.logits = true;
  auto r = model_->Forward(ids_, mask_, req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(at::isfinite(r->logits).all().item<bool>());
}

TEST(ForwardErrorsGpt2Test, SequenceLongerThanPositionTable) {
  auto model = CausalLM::Load(HfFixture("gpt2"));
  ASSERT_TRUE(model.ok()) << model.status();
  at::Tensor ids = at::zeros({1, 129}, at::kLong);
  auto r = (*model)->ResidualAfterBlock(ids, at::ones_like(ids), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("n_positions 128"));
}

}  // namespace
}  // namespace crossdiff::models
