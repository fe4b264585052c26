#include "core/common/cli_args.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff {
namespace {

using ::testing::HasSubstr;

// Builds a mutable argv from string literals.
struct Argv {
  explicit Argv(std::vector<std::string> a) : args(std::move(a)) {
    for (auto& s : args) ptrs.push_back(s.data());
  }
  int argc() { return static_cast<int>(ptrs.size()); }
  char** argv() { return ptrs.data(); }
  std::vector<std::string> args;
  std::vector<char*> ptrs;
};

TEST(CommandLineTest, ParsesEveryKindAndBothSpellings) {
  CommandLine cl("crossdiff x", "test");
  auto& s = cl.AddString("model", "", "model dir", true);
  auto& i = cl.AddInt("layer", -1, "layer");
  auto& d = cl.AddDouble("lr", 0.1, "lr");
  auto& b = cl.AddBool("add-special", "special");
  Argv a({"x", "--model", "m", "--layer=3", "--lr", "2.5e-3", "--add-special"});
  ASSERT_TRUE(cl.Parse(a.argc(), a.argv()).ok());
  EXPECT_EQ(s, "m");
  EXPECT_EQ(i, 3);
  EXPECT_DOUBLE_EQ(d, 2.5e-3);
  EXPECT_TRUE(b);
  EXPECT_TRUE(cl.Given("layer"));
  EXPECT_FALSE(cl.Given("missing"));
}

TEST(CommandLineTest, RejectsBadInputNamingTheFlag) {
  {
    CommandLine cl("crossdiff x", "test");
    cl.AddInt("layer", 0, "layer");
    Argv a({"x", "--layer", "two"});
    auto st = cl.Parse(a.argc(), a.argv());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(st.message(), HasSubstr("--layer: expected an integer, got 'two'"));
  }
  {
    CommandLine cl("crossdiff x", "test");
    cl.AddString("model", "", "model", true);
    Argv a({"x"});
    auto st = cl.Parse(a.argc(), a.argv());
    EXPECT_THAT(st.message(), HasSubstr("--model is required"));
  }
  {
    CommandLine cl("crossdiff x", "test");
    Argv a({"x", "--nope"});
    EXPECT_THAT(cl.Parse(a.argc(), a.argv()).message(), HasSubstr("unknown flag --nope"));
  }
  {
    CommandLine cl("crossdiff x", "test");
    cl.AddString("out", "", "out");
    Argv a({"x", "--out"});
    EXPECT_THAT(cl.Parse(a.argc(), a.argv()).message(), HasSubstr("--out: missing value"));
  }
}

TEST(CommandLineTest, PositionalArgumentsAndHelp) {
  CommandLine cl("crossdiff submit", "submits");
  cl.SetPositionalHelp("JOB.yaml", 1, 1);
  Argv ok({"x", "job.yaml"});
  ASSERT_TRUE(cl.Parse(ok.argc(), ok.argv()).ok());
  EXPECT_EQ(cl.positional(), std::vector<std::string>{"job.yaml"});
  Argv none({"x"});
  EXPECT_THAT(cl.Parse(none.argc(), none.argv()).message(), HasSubstr("expected JOB.yaml"));
  Argv help({"x", "--help"});
  EXPECT_EQ(cl.ParseOrExit(help.argc(), help.argv()), 0);
  EXPECT_THAT(cl.Usage(), HasSubstr("usage: crossdiff submit JOB.yaml"));
}

}  // namespace
}  // namespace crossdiff
