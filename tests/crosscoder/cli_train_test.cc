// `crossdiff train` as a user runs it (DESIGN.md 3.1): the real binary on a real store.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/activations/store.h"

namespace {

using ::testing::HasSubstr;

struct CliRun {
  int code = -1;
  std::string err;
};

CliRun Crossdiff(const std::string& args, const std::string& dir) {
  const std::string err_file = dir + "/stderr.txt";
  const std::string cmd = std::string(CROSSDIFF_BINARY_DIR) + "/bin/crossdiff train " + args +
                          " > " + dir + "/stdout.txt 2> " + err_file;
  CliRun r;
  const int status = std::system(cmd.c_str());
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  std::stringstream ss;
  ss << in.rdbuf();
  r.err = ss.str();
  return r;
}

TEST(CliTrainTest, TrainsAndReportsBadInput) {
  const auto root =
      std::filesystem::temp_directory_path() / ("cli_train_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  const std::string store = (root / "store").string(), out = (root / "cc").string();
  {
    crossdiff::activations::StoreWriter::Options o;
    o.models = {"base", "chat"};
    o.d_model = 8;
    o.rows_per_shard = 512;
    auto w = crossdiff::activations::StoreWriter::Create(store, o);
    ASSERT_TRUE(w.ok()) << w.status();
    const int64_t n = 1500;
    crossdiff::activations::ActivationBatch b;
    b.activations = at::randn({n, 2, 8});
    b.token_ids = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    b.sequence_ids = at::arange(n, at::TensorOptions().dtype(at::kLong));
    b.positions = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    ASSERT_TRUE((*w)->Append(b).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  CliRun ok = Crossdiff(
      "--activations " + store + " --out " + out +
          " --arch relu-l1 --dict-size 32 --steps 30 --batch 64 --lr 1e-3 --seed 3 --threads 1",
      root.string());
  EXPECT_EQ(ok.code, 0) << ok.err;
  for (const char* f : {"crosscoder.safetensors", "config.json", "train_metrics.json"}) {
    EXPECT_TRUE(std::filesystem::exists(out + "/" + f)) << f;
  }
  std::ifstream cfg_in(out + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(cfg_in);
  EXPECT_EQ(cfg["architecture"], "relu_l1");
  EXPECT_EQ(cfg["dict_size"], 32);

  CliRun bad_k = Crossdiff("--activations " + store + " --out " + out + "2 --k 0", root.string());
  EXPECT_NE(bad_k.code, 0);
  EXPECT_THAT(bad_k.err, HasSubstr("error: k must be in [1, dict_size=64], got 0"));
  CliRun bad_arch =
      Crossdiff("--activations " + store + " --out " + out + "2 --arch topk", root.string());
  EXPECT_NE(bad_arch.code, 0);
  EXPECT_THAT(bad_arch.err, HasSubstr("architecture 'topk' is unknown"));
  CliRun no_store = Crossdiff(
      "--activations " + (root / "nothing").string() + " --out " + out + "2", root.string());
  EXPECT_NE(no_store.code, 0);
  EXPECT_THAT(no_store.err, HasSubstr("manifest.json"));
  std::filesystem::remove_all(root);
}

}  // namespace
