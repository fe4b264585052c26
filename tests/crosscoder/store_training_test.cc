// Training from real activation stores (crossdiff_activations' writer and reader): outputs, bad
// stores, and NaN/Inf rows named by shard and row.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/activations/store.h"
#include "core/crosscoder/trainer.h"

namespace crossdiff::crosscoder {
namespace {

using ::testing::HasSubstr;

std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("crosscoder_store_test_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// Writes `x` [n, M, d] as a store with shards of 256 rows.
void WriteStore(const std::string& dir, const at::Tensor& x, std::vector<std::string> models) {
  activations::StoreWriter::Options o;
  o.models = std::move(models);
  o.layer = 3;
  o.d_model = x.size(2);
  o.rows_per_shard = 256;
  auto w = activations::StoreWriter::Create(dir, o);
  ASSERT_TRUE(w.ok()) << w.status();
  const int64_t n = x.size(0);
  if (n > 0) {
    activations::ActivationBatch b;
    b.activations = x;
    b.token_ids = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    b.sequence_ids = at::arange(n, at::TensorOptions().dtype(at::kLong));
    b.positions = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    ASSERT_TRUE((*w)->Append(b).ok());
  }
  auto m = (*w)->Finish();
  ASSERT_TRUE(m.ok()) << m.status();
}

at::Tensor Rows(int64_t n, int64_t models = 2) {
  at::Generator gen = at::detail::createCPUGenerator(5);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dict = at::randn({24, models, 8}, gen, f32);
  at::Tensor coef =
      at::rand({n, 24}, gen, f32) * (at::rand({n, 24}, gen, f32) < 0.15).to(at::kFloat);
  return at::einsum("nf,fmd->nmd", {coef, dict}) + 0.01 * at::randn({n, models, 8}, gen, f32);
}

TrainOptions Options(const std::string& store, const std::string& out) {
  TrainOptions o;
  o.store_dir = store;
  o.out_dir = out;
  o.dict_size = 32;
  o.k = 4;
  o.steps = 40;
  o.batch_size = 64;
  o.lr = 3e-3;
  o.threads = 1;
  o.metrics_every = 20;
  return o;
}

TEST(StoreTrainingTest, WritesCheckpointAndMetrics) {
  const std::string store = TempDir("store"), out = TempDir("out");
  WriteStore(store, Rows(2000), {"base-model", "chat-model"});
  auto r = RunTraining(Options(store, out), nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  auto cc = Crosscoder::Load(out);
  ASSERT_TRUE(cc.ok()) << cc.status();
  EXPECT_EQ(cc->config().models, (std::vector<std::string>{"base-model", "chat-model"}));
  EXPECT_EQ(cc->config().layer, 3);
  std::ifstream in(out + "/train_metrics.json");
  nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["steps"], 40);
  EXPECT_TRUE(j["fvu_per_model"].contains("chat-model"));
  std::filesystem::remove_all(store);
  std::filesystem::remove_all(out);
}

TEST(StoreTrainingTest, RejectsAStoreWithOneModel) {
  const std::string store = TempDir("one"), out = TempDir("one_out");
  WriteStore(store, Rows(300, 1), {"base-model"});
  auto r = RunTraining(Options(store, out), nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("holds 1 model; a crosscoder needs at least 2"));
  std::filesystem::remove_all(store);
}

TEST(StoreTrainingTest, RejectsAMissingOrCorruptStore) {
  auto r = RunTraining(Options(TempDir("missing"), TempDir("m_out")), nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("manifest.json"));

  const std::string store = TempDir("corrupt");
  WriteStore(store, Rows(600), {"a", "b"});
  // Truncate the second shard: the reader must refuse the store before training.
  std::filesystem::resize_file(store + "/shard-000001.safetensors", 100);
  r = RunTraining(Options(store, TempDir("c_out")), nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("shard-000001.safetensors"));
  std::filesystem::remove_all(store);
}

TEST(StoreTrainingTest, NonFiniteRowsAreNamedByShardAndRow) {
  const std::string store = TempDir("nan"), out = TempDir("nan_out");
  at::Tensor x = Rows(1024);
  x[700][1][2] = std::numeric_limits<float>::infinity();  // shard 2 (rows 512..767), row 188
  WriteStore(store, x, {"a", "b"});
  TrainOptions o = Options(store, out);
  auto r = RunTraining(o, nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("shard-000002.safetensors row 188"));
  // Outside the normalisation sample: found in the training batches, still named by shard and row.
  o.normalization_rows = 64;
  o.val_fraction = 0;
  r = RunTraining(o, nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("shard-000002.safetensors row 188"));
  EXPECT_FALSE(std::filesystem::exists(out + "/crosscoder.safetensors"));
  std::filesystem::remove_all(store);
  std::filesystem::remove_all(out);
}

}  // namespace
}  // namespace crossdiff::crosscoder
