#include "core/common/progress.h"

#include <cstdio>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff {
namespace {

using ::testing::HasSubstr;

TEST(ProgressMeterTest, ForcedUpdatesReachTheCallbackWithRateAndEta) {
  std::vector<ProgressUpdate> seen;
  ProgressMeter meter("harvest", "tokens", 1000, nullptr);
  meter.set_callback([&](const ProgressUpdate& u) { seen.push_back(u); });
  meter.Update(250, "loss 1.0", /*force=*/true);
  meter.Finish(1000, "done");
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].done, 250);
  EXPECT_EQ(seen[0].total, 1000);
  EXPECT_EQ(seen[0].extra, "loss 1.0");
  EXPECT_GT(seen[0].rate, 0);
  EXPECT_GE(seen[0].eta_s, 0);
  EXPECT_TRUE(seen[1].final);
  EXPECT_EQ(seen[1].eta_s, 0);
}

TEST(ProgressMeterTest, UnforcedUpdatesAreRateLimited) {
  int calls = 0;
  ProgressMeter meter("train", "steps", 10, nullptr, /*min_interval_s=*/3600);
  meter.set_callback([&](const ProgressUpdate&) { ++calls; });
  for (int i = 0; i < 100; ++i) meter.Update(i);
  EXPECT_EQ(calls, 0);
}

TEST(ProgressMeterTest, PlainLinesAndJsonLines) {
  FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  ProgressMeter meter("harvest", "tokens", 100, f);
  meter.Update(50, "", true);
  std::rewind(f);
  char buf[256] = {};
  ASSERT_NE(std::fgets(buf, sizeof(buf), f), nullptr);
  EXPECT_THAT(std::string(buf), HasSubstr("[harvest] 50/100 tokens (50.0%)"));
  EXPECT_THAT(std::string(buf), HasSubstr("ETA"));
  std::fclose(f);

  ProgressUpdate u;
  u.phase = "train";
  u.done = 3;
  u.extra = "a \"quoted\" word";
  EXPECT_THAT(ProgressMeter::ToJsonLine(u), HasSubstr("\"extra\":\"a \\\"quoted\\\" word\""));
  EXPECT_EQ(ProgressMeter::FormatDuration(3725), "1h02m");
  EXPECT_EQ(ProgressMeter::FormatDuration(65), "1m05s");
}

}  // namespace
}  // namespace crossdiff
