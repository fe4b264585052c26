// internal::FactorExchange across real processes (Gloo on 127.0.0.1): every rank receives every
// rank's factor rows and codes intact, with and without AuxK, through the overflow path, for 2
// and 3 ranks.
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/comm/rank_runner.h"

namespace crossdiff::comm {
namespace {

using testing::RankRun;
using testing::RunRanks;

std::string ExchangeBinary() {
  return std::string(CROSSDIFF_BINARY_DIR) + "/tests/factor_exchange_rank";
}

void ExpectExchanged(int nproc, std::vector<std::string> args) {
  args.insert(args.end(), {"--comm-timeout", "60"});
  RankRun run = RunRanks(nproc, args, true, ExchangeBinary());
  EXPECT_EQ(run.result.failed_rank, -1) << run.result.failure;
  for (int r = 0; r < nproc; ++r) {
    EXPECT_THAT(run.Line(r, "EXCHANGE_OK"), ::testing::HasSubstr("world=" + std::to_string(nproc)))
        << run.All(r);
  }
}

TEST(FactorExchangeTest, TwoRanksMainCodesOnly) { ExpectExchanged(2, {}); }
TEST(FactorExchangeTest, TwoRanksWithAuxK) { ExpectExchanged(2, {"--aux"}); }
TEST(FactorExchangeTest, OverflowingRankGoesThroughTheSecondGather) {
  ExpectExchanged(2, {"--skew", "--aux"});
}
TEST(FactorExchangeTest, ThreeRanksWithOverflow) { ExpectExchanged(3, {"--skew"}); }

}  // namespace
}  // namespace crossdiff::comm
