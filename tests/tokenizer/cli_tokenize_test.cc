// `crossdiff tokenize` (client/cli/cmd_tokenize.cc), run in-process through RunTokenize: output and
// exit codes.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "client/cli/commands.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/test_support.h"

namespace crossdiff::cli {
namespace {

using ::crossdiff::tokenizer::testing::BpeFixtureDir;
using ::crossdiff::tokenizer::testing::TempDir;
using ::testing::HasSubstr;

struct Result {
  int code;
  std::string out, err;
};

Result RunCli(std::vector<std::string> args) {
  args.insert(args.begin(), "crossdiff tokenize");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  const int code = RunTokenize(static_cast<int>(args.size()), argv.data());
  std::fflush(stdout);
  Result r{code, ::testing::internal::GetCapturedStdout(),
           ::testing::internal::GetCapturedStderr()};
  return r;
}

TEST(CliTokenizeTest, PrintsIdsOnOneLine) {
  const Result r = RunCli({"--model", BpeFixtureDir(), "--text", "Hello world"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "39 68 353 78 1417 520\n");
  const Result special =
      RunCli({"--model", BpeFixtureDir(), "--text=<|im_start|>user", "--add-special"});
  EXPECT_EQ(special.code, 0) << special.err;
  EXPECT_EQ(special.out.substr(0, 5), "1757 ");
}

TEST(CliTokenizeTest, DecodesIds) {
  const Result r = RunCli({"--model", BpeFixtureDir(), "--decode", "39 68 353 78 1417 520"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "Hello world\n");
}

TEST(CliTokenizeTest, ExitCodes) {
  EXPECT_EQ(RunCli({"--help"}).code, 0);
  const Result no_model = RunCli({"--text", "x"});
  EXPECT_EQ(no_model.code, 2);
  EXPECT_THAT(no_model.err, HasSubstr("model"));
  EXPECT_EQ(RunCli({"--model", BpeFixtureDir()}).code, 2);  // neither --text nor --decode
  TempDir empty;
  const Result no_tokenizer = RunCli({"--model", empty.path(), "--text", "x"});
  EXPECT_EQ(no_tokenizer.code, 1);
  EXPECT_THAT(no_tokenizer.err, HasSubstr("no tokenizer"));
  EXPECT_EQ(std::count(no_tokenizer.err.begin(), no_tokenizer.err.end(), '\n'), 1);
  const Result bad_id = RunCli({"--model", BpeFixtureDir(), "--decode", "1 99999"});
  EXPECT_EQ(bad_id.code, 1);
  EXPECT_THAT(bad_id.err, HasSubstr("'99999'"));
}

}  // namespace
}  // namespace crossdiff::cli
