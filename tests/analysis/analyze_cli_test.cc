// `crossdiff analyze` as a real process: a planted store and a hand-made crosscoder on disk, the
// report files, the summary line, and the one-line errors for bad inputs.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/crosscoder/crosscoder.h"
#include "tests/planted/planted_store.h"

namespace crossdiff {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct Result {
  int code = -1;
  std::string out, err;
};

// Runs the CLI with `args`, capturing stdout and stderr (stderr through a file).
Result RunCli(const std::string& args, const std::string& tmp) {
  const std::string err_file = tmp + "/stderr.txt";
  const std::string cmd =
      std::string(CROSSDIFF_BINARY_DIR) + "/bin/crossdiff analyze " + args + " 2>" + err_file;
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return r;
}

class AnalyzeCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = (fs::temp_directory_path() / ("crossdiff_analyze_cli_" + std::to_string(getpid())))
                .string();
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string root_;
};

TEST_F(AnalyzeCliTest, WritesTheReport) {
  planted::PlantedOptions po;
  po.rows = 4096;
  auto store = planted::WritePlantedStore(root_ + "/store", po);
  ASSERT_TRUE(store.ok()) << store.status();
  crosscoder::CrosscoderConfig c;
  c.architecture = crosscoder::Architecture::kReluL1;
  c.activation_dim = po.d_model;
  c.dict_size = store->num_features();
  c.num_models = 2;
  auto cc = crosscoder::Crosscoder::Create(c);
  ASSERT_TRUE(cc.ok()) << cc.status();
  cc->W_dec().copy_(store->dictionary);
  cc->W_enc().copy_(store->dictionary.permute({0, 2, 1}) * 0.5);
  cc->b_enc().fill_(-0.2);
  ASSERT_TRUE(cc->SetNormalization(at::Tensor(), at::ones({2})).ok());
  ASSERT_TRUE(cc->Save(root_ + "/cc").ok());
  std::ofstream(root_ + "/cats.json") << R"({"early": [0, 1, 2], "late": [60, 61, 62, 63]})";

  const Result r = RunCli("--crosscoder " + root_ + "/cc --activations " + root_ + "/store --out " +
                              root_ + "/report --categories " + root_ + "/cats.json --top-k 4",
                          root_);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("48 latents (16 finetune_only, 16 base_only, 16 shared, 0 other)"));
  EXPECT_THAT(r.err, HasSubstr("analyze"));  // the progress line
  for (const char* f : {"report.json", "report.md", "report.html"}) {
    EXPECT_TRUE(fs::exists(root_ + "/report/" + f)) << f;
  }
  std::ifstream in(root_ + "/report/report.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["latents"].size(), 48u);
  EXPECT_LE(j["latents"][0]["top_examples"].size(), 4u);
  ASSERT_EQ(j["capabilities"].size(), 2u);
  EXPECT_EQ(j["capabilities"][0]["category"], "early");
  EXPECT_EQ(j["capabilities"][0]["tokens"], 3 * po.seq_len);
}

TEST_F(AnalyzeCliTest, BadInputsFailWithOneLine) {
  Result r = RunCli(
      "--crosscoder " + root_ + "/missing --activations " + root_ + " --out " + root_ + "/out",
      root_);
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("crosscoder directory"));
  EXPECT_THAT(r.err, HasSubstr(root_ + "/missing"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

  r = RunCli("--activations x --out y", root_);
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("crosscoder"));

  r = RunCli("--crosscoder a --activations b --out c --latent-scaling some", root_);
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--latent-scaling"));

  r = RunCli("--help", root_);
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("--categories"));
}

}  // namespace
}  // namespace crossdiff
