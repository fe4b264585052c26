// Runs the built `crossdiff activations` binary as a subprocess on every HF fixture and compares
// its output file with expected.safetensors (atol = rtol = 1e-4, all positions); checks that bad
// invocations exit non-zero with one line on stderr.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "tests/models/fixture_util.h"

namespace crossdiff::models {
namespace {

namespace fs = std::filesystem;
using testing::AllClose;
using ::testing::HasSubstr;
using testing::HfFixture;
using testing::LoadOrDie;

const char kBinary[] = CROSSDIFF_BINARY_DIR "/bin/crossdiff";

struct RunResult {
  int exit_code = -1;
  std::string err;
};

// Runs `crossdiff <args>` through the shell, capturing stderr.
RunResult RunCrossdiff(const std::string& args, const std::string& work_dir) {
  const std::string err_path = work_dir + "/stderr.txt";
  const std::string cmd = std::string(kBinary) + " " + args + " >/dev/null 2>" + err_path;
  const int status = std::system(cmd.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_path);
  r.err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return r;
}

std::string WorkDir(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) /
                 ("crossdiff_activations_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

class ActivationsCliTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ActivationsCliTest, ReproducesTransformersOutputs) {
  const std::string arch = GetParam();
  const std::string dir = WorkDir(arch);
  auto expected = tensor_io::SafetensorsFile::Open(HfFixture(arch) + "/expected.safetensors");
  ASSERT_TRUE(expected.ok()) << expected.status();
  // The input file holds only the ids and the mask.
  tensor_io::SafetensorsWriter in;
  ASSERT_TRUE(tensor_io::AddTensor(in, "input_ids", LoadOrDie(**expected, "input_ids")).ok());
  ASSERT_TRUE(
      tensor_io::AddTensor(in, "attention_mask", LoadOrDie(**expected, "attention_mask")).ok());
  ASSERT_TRUE(in.Write(dir + "/in.safetensors").ok());

  RunResult r = RunCrossdiff("activations --model " + HfFixture(arch) + " --input " + dir +
                                 "/in.safetensors --out " + dir + "/out.safetensors",
                             dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto out = tensor_io::SafetensorsFile::Open(dir + "/out.safetensors");
  ASSERT_TRUE(out.ok()) << out.status();
  int compared = 0;
  for (const auto& info : (*expected)->tensors()) {
    if (info.name == "input_ids" || info.name == "attention_mask") continue;
    const tensor_io::TensorInfo* got = (*out)->Find(info.name);
    ASSERT_NE(got, nullptr) << arch << ": output lacks " << info.name;
    EXPECT_EQ(got->dtype, tensor_io::DType::kF32) << info.name;
    EXPECT_TRUE(AllClose(LoadOrDie(**out, info.name), LoadOrDie(**expected, info.name)))
        << arch << " " << info.name;
    ++compared;
  }
  EXPECT_EQ(compared, 6);  // hidden_states.0..3, last_block_output, logits
  EXPECT_EQ((*out)->tensors().size(), 6u);
}

INSTANTIATE_TEST_SUITE_P(HfFixtures, ActivationsCliTest,
                         ::testing::Values("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

int CountLines(const std::string& s) {
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

TEST(ActivationsCliErrorsTest, MissingFlag) {
  const std::string dir = WorkDir("noflag");
  RunResult r = RunCrossdiff("activations --model " + HfFixture("llama"), dir);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("input"));
  EXPECT_EQ(CountLines(r.err), 1) << r.err;
}

TEST(ActivationsCliErrorsTest, UnknownModelTypeAndMissingInput) {
  const std::string dir = WorkDir("badmodel");
  {
    std::ofstream cfg(dir + "/config.json");
    cfg << R"({"model_type": "t5"})";
  }
  tensor_io::SafetensorsWriter in;
  at::Tensor ids = at::zeros({1, 4}, at::kLong);
  ASSERT_TRUE(tensor_io::AddTensor(in, "input_ids", ids).ok());
  ASSERT_TRUE(tensor_io::AddTensor(in, "attention_mask", at::ones_like(ids)).ok());
  ASSERT_TRUE(in.Write(dir + "/in.safetensors").ok());
  RunResult r = RunCrossdiff("activations --model " + dir + " --input " + dir +
                                 "/in.safetensors --out " + dir + "/out.safetensors",
                             dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("unsupported model_type 't5'"));
  EXPECT_EQ(CountLines(r.err), 1) << r.err;
  EXPECT_FALSE(fs::exists(dir + "/out.safetensors"));

  RunResult missing = RunCrossdiff("activations --model " + HfFixture("llama") + " --input " + dir +
                                       "/nope.safetensors --out " + dir + "/out.safetensors",
                                   dir);
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, HasSubstr("nope.safetensors"));
  EXPECT_EQ(CountLines(missing.err), 1) << missing.err;
}

TEST(ActivationsCliErrorsTest, TokenOutsideVocabulary) {
  const std::string dir = WorkDir("oov");
  tensor_io::SafetensorsWriter in;
  at::Tensor ids = at::full({1, 4}, 600, at::kLong);
  ASSERT_TRUE(tensor_io::AddTensor(in, "input_ids", ids).ok());
  ASSERT_TRUE(tensor_io::AddTensor(in, "attention_mask", at::ones_like(ids)).ok());
  ASSERT_TRUE(in.Write(dir + "/in.safetensors").ok());
  RunResult r = RunCrossdiff("activations --model " + HfFixture("gemma") + " --input " + dir +
                                 "/in.safetensors --out " + dir + "/out.safetensors",
                             dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("token id 600"));
}

}  // namespace
}  // namespace crossdiff::models
