// The Gloo communicator with real processes on 127.0.0.1 (port 0): correctness of every collective
// and the failure behaviour (a rank that dies or hangs makes the others fail naming it).
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/comm/rank_runner.h"

namespace crossdiff::comm {
namespace {

using ::crossdiff::comm::testing::RankRun;
using ::crossdiff::comm::testing::RunRanks;
using ::testing::HasSubstr;
using ::testing::StartsWith;

class GlooCollectivesTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooCollectivesTest, EveryCollectiveMatchesTheReference) {
  const int world = GetParam();
  RankRun run = RunRanks(world, {"--scenario", "collectives", "--comm-timeout", "60"}, true);
  EXPECT_EQ(run.result.failed_rank, -1) << run.result.failure;
  for (int r = 0; r < world; ++r) {
    EXPECT_THAT(run.Line(r, "COLLECTIVES_OK"), StartsWith("COLLECTIVES_OK bytes="))
        << "rank " << r << ":\n"
        << run.All(r);
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, GlooCollectivesTest, ::testing::Values(2, 3, 4));

// A rank that exits abruptly: the others fail with UNAVAILABLE naming it (Gloo sees the closed
// connection at once; the heartbeats say which rank it was).
TEST(GlooFailureTest, DeadRankIsNamedByTheOthers) {
  RankRun run = RunRanks(3, {"--scenario", "die", "--victim", "1", "--comm-timeout", "20"}, false);
  EXPECT_EQ(run.result.exit_codes[1], 7);
  for (int r : {0, 2}) {
    EXPECT_EQ(run.result.exit_codes[r], 0) << run.All(r);
    EXPECT_THAT(run.Line(r, "EXPECTED_ERROR"), HasSubstr("UNAVAILABLE")) << run.All(r);
    EXPECT_THAT(run.Line(r, "EXPECTED_ERROR"),
                HasSubstr("rank 1 stopped responding (its process died or is frozen)"))
        << run.All(r);
    EXPECT_THAT(run.Line(r, "EXPECTED_ERROR"), HasSubstr("rank " + std::to_string(r) + ": "));
    // The communicator stays broken: later collectives fail at once with the first error.
    EXPECT_THAT(run.Line(r, "SECOND_ERROR"), HasSubstr("FAILED_PRECONDITION")) << run.All(r);
    EXPECT_THAT(run.Line(r, "SECOND_ERROR"), HasSubstr("rank 1 stopped responding"));
  }
}

// The same through a started all-reduce: its Wait() names the dead rank.
TEST(GlooFailureTest, DeadRankIsNamedByAStartedAllReduce) {
  RankRun run = RunRanks(
      2, {"--scenario", "die", "--victim", "1", "--pending", "--comm-timeout", "20"}, false);
  EXPECT_EQ(run.result.exit_codes[1], 7);
  EXPECT_EQ(run.result.exit_codes[0], 0) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"), HasSubstr("UNAVAILABLE")) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"),
              HasSubstr("rank 1 stopped responding (its process died or is frozen)"))
      << run.All(0);
  EXPECT_THAT(run.Line(0, "SECOND_ERROR"), HasSubstr("FAILED_PRECONDITION")) << run.All(0);
}

// Rank 0 hosts the rendezvous store: its death is named too.
TEST(GlooFailureTest, DeadStoreHostIsNamed) {
  RankRun run = RunRanks(2, {"--scenario", "die", "--victim", "0", "--comm-timeout", "20"}, false);
  EXPECT_EQ(run.result.exit_codes[0], 7);
  EXPECT_EQ(run.result.exit_codes[1], 0) << run.All(1);
  EXPECT_THAT(run.Line(1, "EXPECTED_ERROR"), HasSubstr("UNAVAILABLE")) << run.All(1);
  EXPECT_THAT(run.Line(1, "EXPECTED_ERROR"), HasSubstr("rank 0 ")) << run.All(1);
}

// A rank that is alive but never enters the collective: the others time out after
// --comm-timeout with DEADLINE_EXCEEDED naming it.
TEST(GlooFailureTest, HangingRankIsNamedAfterTheTimeout) {
  std::string release = ::testing::TempDir() + "/comm_hang_release_" + std::to_string(getpid());
  std::filesystem::remove(release);
  RankRun run = RunRanks(3,
                         {"--scenario", "hang", "--victim", "2", "--comm-timeout", "2",
                          "--rendezvous-timeout", "60", "--release-file", release},
                         false);
  std::filesystem::remove(release);
  EXPECT_EQ(run.result.exit_codes[2], 0) << run.All(2);
  for (int r : {0, 1}) {
    EXPECT_EQ(run.result.exit_codes[r], 0) << run.All(r);
    EXPECT_THAT(run.Line(r, "EXPECTED_ERROR"), HasSubstr("DEADLINE_EXCEEDED")) << run.All(r);
    EXPECT_THAT(run.Line(r, "EXPECTED_ERROR"),
                HasSubstr("rank 2 is alive but never entered it (still at #1"))
        << run.All(r);
  }
}

// A started all-reduce that a live peer never joins: Wait() gives up after the timeout.
TEST(GlooFailureTest, HangingRankIsNamedByAStartedAllReduce) {
  std::string release =
      ::testing::TempDir() + "/comm_hang_pending_release_" + std::to_string(getpid());
  std::filesystem::remove(release);
  RankRun run = RunRanks(2,
                         {"--scenario", "hang", "--victim", "1", "--pending", "--comm-timeout", "2",
                          "--rendezvous-timeout", "60", "--release-file", release},
                         false);
  std::filesystem::remove(release);
  EXPECT_EQ(run.result.exit_codes[0], 0) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"), HasSubstr("DEADLINE_EXCEEDED")) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"),
              HasSubstr("rank 1 is alive but never entered it (still at #1"))
      << run.All(0);
}

// A frozen rank (SIGSTOP: its heartbeat stops too) is told apart from a hanging one.
TEST(GlooFailureTest, FrozenRankIsNamedAfterTheTimeout) {
  std::string pid_file = ::testing::TempDir() + "/comm_freeze_pid_" + std::to_string(getpid());
  std::filesystem::remove(pid_file);
  RankRun run = RunRanks(2,
                         {"--scenario", "freeze", "--victim", "1", "--comm-timeout", "2",
                          "--rendezvous-timeout", "60", "--release-file", pid_file},
                         false);
  std::filesystem::remove(pid_file);
  EXPECT_EQ(run.result.exit_codes[1], 128 + SIGKILL);
  EXPECT_EQ(run.result.exit_codes[0], 0) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"), HasSubstr("UNAVAILABLE")) << run.All(0);
  EXPECT_THAT(run.Line(0, "EXPECTED_ERROR"),
              HasSubstr("rank 1 stopped responding (its process died or is frozen)"))
      << run.All(0);
}

}  // namespace
}  // namespace crossdiff::comm
