// The local launcher (--nproc) with real processes: output forwarding with rank prefixes, stopping
// the other ranks when one fails, and the flag helpers.
#include "core/comm/launch.h"

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "core/comm/local_launcher.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/comm/rank_runner.h"

namespace crossdiff::comm {
namespace {

using ::crossdiff::comm::testing::RankBinary;
using ::crossdiff::comm::testing::RankRun;
using ::crossdiff::comm::testing::RunRanks;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(LocalLauncherTest, ForwardsEveryRanksOutput) {
  RankRun run = RunRanks(3, {"--scenario", "echo"}, true);
  EXPECT_EQ(run.result.failed_rank, -1) << run.result.failure;
  EXPECT_THAT(run.result.exit_codes, ElementsAre(0, 0, 0));
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(run.Line(r, "hello"), "hello from rank " + std::to_string(r) + " of 3");
    EXPECT_THAT(run.stderr_lines[r], ::testing::Contains("note from rank " + std::to_string(r)));
  }
}

TEST(LocalLauncherTest, FailingRankStopsTheOthersAndIsNamed) {
  RankRun run = RunRanks(3, {"--scenario", "fail", "--victim", "1"}, true);
  EXPECT_EQ(run.result.failed_rank, 1);
  EXPECT_EQ(run.result.failure, "rank 1 exited with status 3");
  EXPECT_EQ(run.result.exit_code(), 3);
  EXPECT_EQ(run.result.exit_codes[0], 128 + SIGTERM);  // stopped by the launcher, not 60 s later
  EXPECT_EQ(run.result.exit_codes[2], 128 + SIGTERM);
}

TEST(LocalLauncherTest, RankZeroThatNeverPublishesItsPortIsNamed) {
  LocalLaunchSpec spec;
  spec.executable = "/bin/sh";
  spec.args = {"-c", "exec sleep 30"};  // the rank flags land in $0.. and are ignored
  spec.nproc = 2;
  spec.port_timeout = std::chrono::milliseconds(300);
  spec.kill_grace = std::chrono::milliseconds(200);
  absl::StatusOr<LocalLaunchResult> result = RunLocalRanks(spec);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->failed_rank, 0);
  EXPECT_EQ(result->failure, "rank 0 did not publish its rendezvous port within 0.3s");
  EXPECT_EQ(result->exit_codes.size(), 2u);
  // Started with rank 0 (it waits for the port on a pipe), stopped when rank 0 failed.
  EXPECT_EQ(result->exit_codes[1], 128 + SIGTERM);
}

// Descriptors of this process that are pipes, other than stdin/stdout/stderr and `keep`.
std::vector<int> OtherPipes(int keep) {
  std::vector<int> pipes;
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return {-1};
  while (dirent* e = readdir(d)) {
    int fd = -1;
    if (!absl::SimpleAtoi(e->d_name, &fd) || fd <= 2 || fd == keep) continue;
    char target[256] = {};
    const std::string link = std::string("/proc/self/fd/") + e->d_name;
    if (readlink(link.c_str(), target, sizeof target - 1) > 0 &&
        std::string(target).rfind("pipe:", 0) == 0) {
      pipes.push_back(fd);
    }
  }
  closedir(d);
  return pipes;
}

// Forked ranks (what --nproc uses): each fork returns from RunLocalRanks as its rank, finds its
// end of the port pipe where an executed rank would, and holds none of the launcher's other pipes
// (a rank holding another's port pipe open would keep it from ever seeing EOF).
TEST(LocalLauncherTest, ForkedRanksGetTheirRankAndOnlyTheirOwnPipes) {
  LocalLaunchSpec spec;
  spec.fork_ranks = true;
  spec.nproc = 3;
  std::vector<std::string> lines[3];
  spec.on_line = [&](int rank, bool is_stderr, const std::string& line) {
    lines[rank].push_back(std::string(is_stderr ? "err: " : "") + line);
  };
  const std::vector<int> inherited = OtherPipes(-1);  // from whoever started the test
  absl::StatusOr<LocalLaunchResult> result = RunLocalRanks(spec);
  ASSERT_TRUE(result.ok()) << result.status();
  if (result->forked_rank >= 0) {  // in a rank: report on stdout, never return into the test
    const int rank = result->forked_rank;
    const char* env = std::getenv(rank == 0 ? kRendezvousPortFdEnv : kRendezvousPortInFdEnv);
    int fd = -1;
    std::string port = "none";
    if (env != nullptr && absl::SimpleAtoi(env, &fd)) {
      if (rank == 0) {
        port = "4242";
        (void)!write(fd, "4242\n", 5);
      } else {
        char buf[16] = {};
        const ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n > 0) port = std::string(buf, n - 1);
      }
    }
    std::printf("rank %d of %d, port %s, pipes beyond the launcher's own: %s\n", rank, spec.nproc,
                port.c_str(), OtherPipes(fd) == inherited ? "none" : "some");
    std::fflush(stdout);
    _exit(0);
  }
  EXPECT_EQ(result->failed_rank, -1) << result->failure;
  EXPECT_THAT(result->exit_codes, ElementsAre(0, 0, 0));
  for (int r = 0; r < 3; ++r) {
    EXPECT_THAT(lines[r], ElementsAre("rank " + std::to_string(r) +
                                      " of 3, port 4242, pipes beyond the launcher's own: none"));
  }
}

// Runs `command`, returns its exit status and merged output.
std::pair<int, std::string> Shell(const std::string& command) {
  std::string output;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) output.append(buf.data(), n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(MaybeLaunchLocalTest, NprocRunsTheSameCommandAsRanks) {
  auto [code, output] = Shell(RankBinary() + " --nproc 2 --scenario collectives");
  EXPECT_EQ(code, 0) << output;
  EXPECT_THAT(output, HasSubstr("[rank 0] COLLECTIVES_OK"));
  EXPECT_THAT(output, HasSubstr("[rank 1] COLLECTIVES_OK"));
}

TEST(MaybeLaunchLocalTest, ExecLaunchRunsTheSameCommandAsRanks) {
  auto [code, output] =
      Shell("CROSSDIFF_LAUNCH=exec " + RankBinary() + " --nproc 2 --scenario collectives");
  EXPECT_EQ(code, 0) << output;
  EXPECT_THAT(output, HasSubstr("[rank 0] COLLECTIVES_OK"));
  EXPECT_THAT(output, HasSubstr("[rank 1] COLLECTIVES_OK"));
}

TEST(MaybeLaunchLocalTest, FailedRankGivesItsExitCodeAndIsNamed) {
  auto [code, output] = Shell(RankBinary() + " --scenario fail --victim 1 --nproc=2");
  EXPECT_EQ(code, 3) << output;
  EXPECT_THAT(output, HasSubstr("crossdiff: rank 1 exited with status 3; stopped the other ranks"));
}

TEST(MaybeLaunchLocalTest, NprocWithRankFlagsIsRejected) {
  auto [code, output] = Shell(RankBinary() + " --scenario echo --nproc 2 --rank 1");
  EXPECT_EQ(code, 2);
  EXPECT_THAT(output, HasSubstr("--nproc: cannot be combined with --rank"));
}

TEST(LaunchFlagsTest, ParseHostPort) {
  std::string host;
  int port = 0;
  ASSERT_TRUE(ParseHostPort("rendezvous", "10.1.2.3:29500", &host, &port).ok());
  EXPECT_EQ(host, "10.1.2.3");
  EXPECT_EQ(port, 29500);
  ASSERT_TRUE(ParseHostPort("rendezvous", "[::1]:0", &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 0);
  absl::Status bad = ParseHostPort("rendezvous", "node7", &host, &port);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("--rendezvous: 'node7' is not HOST:PORT"));
  EXPECT_THAT(ParseHostPort("rendezvous", "h:70000", &host, &port).message(),
              HasSubstr("not a number in [0, 65535]"));
}

TEST(LaunchFlagsTest, RemoveFlagDropsBothForms) {
  EXPECT_THAT(
      RemoveFlag({"train", "--nproc", "4", "--steps", "3", "--nproc=2", "--", "--nproc"}, "nproc"),
      ElementsAre("train", "--steps", "3", "--", "--nproc"));
}

TEST(LaunchFlagsTest, WorldSizeWithoutRendezvousIsRejected) {
  CommandLine cl("t", "t");
  LaunchFlags flags = AddLaunchFlags(cl);
  std::array<const char*, 3> argv = {"t", "--world-size", "2"};
  ASSERT_TRUE(cl.Parse(3, const_cast<char**>(argv.data())).ok());
  auto o = RendezvousOptionsFromFlags(flags);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(o.status().message(), HasSubstr("--rendezvous: needed with --world-size 2"));
}

// Ranks 1..N-1 of a local launch start before rank 0 has a port and read it from a pipe.
absl::StatusOr<RendezvousOptions> OptionsWithPortPipe(const std::string& written, bool close_it) {
  int p[2];
  EXPECT_EQ(pipe(p), 0);
  if (!written.empty()) {
    EXPECT_EQ(write(p[1], written.data(), written.size()), static_cast<ssize_t>(written.size()));
  }
  if (close_it) close(p[1]);
  setenv(kRendezvousPortInFdEnv, std::to_string(p[0]).c_str(), 1);
  CommandLine cl("t", "t");
  LaunchFlags flags = AddLaunchFlags(cl);
  std::array<const char*, 9> argv = {"t",  "--rank",       "1",           "--world-size",
                                     "2",  "--rendezvous", "127.0.0.1:0", "--rendezvous-timeout",
                                     "0.3"};
  EXPECT_TRUE(cl.Parse(9, const_cast<char**>(argv.data())).ok());
  auto o = RendezvousOptionsFromFlags(flags);
  if (!close_it) close(p[1]);
  EXPECT_EQ(std::getenv(kRendezvousPortInFdEnv), nullptr);  // read once, not passed on
  return o;
}

TEST(LaunchFlagsTest, LaterRanksReadThePortFromTheLauncher) {
  auto o = OptionsWithPortPipe("4321\n", /*close_it=*/true);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->port, 4321);
  EXPECT_EQ(o->host, "127.0.0.1");
}

TEST(LaunchFlagsTest, PortPipeClosedOrSilentIsAClearError) {
  auto closed = OptionsWithPortPipe("", /*close_it=*/true);
  EXPECT_EQ(closed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(closed.status().message(), HasSubstr("rank 0 did not start its rendezvous"));
  auto silent = OptionsWithPortPipe("", /*close_it=*/false);
  EXPECT_EQ(silent.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(silent.status().message(), HasSubstr("no port within 0.3s"));
}

}  // namespace
}  // namespace crossdiff::comm
