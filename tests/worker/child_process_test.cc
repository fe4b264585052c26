#include "worker/child_process.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff::worker {
namespace {

using ::testing::ElementsAre;

std::string TempLog(const char* name) {
  auto dir = std::filesystem::temp_directory_path() / ("crossdiff_child_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

TEST(ChildProcessTest, ForwardsProgressLinesAndTheExitCode) {
  std::string log = TempLog("ok.log");
  auto child = ChildProcess::Start(
      {"/bin/sh", "-c",
       "echo '{\"done\":1}' >&$CROSSDIFF_PROGRESS_FD; echo to-log; "
       "echo '{\"done\":2}' >&$CROSSDIFF_PROGRESS_FD; echo 'error: last line' >&2; exit 3"},
      {"EXTRA=1"}, log);
  ASSERT_TRUE(child.ok()) << child.status();
  std::vector<std::string> lines;
  ChildExit ex = (*child)->Wait([&](const std::string& l) { lines.push_back(l); });
  EXPECT_THAT(lines, ElementsAre("{\"done\":1}", "{\"done\":2}"));
  EXPECT_EQ(ex.exit_code, 3);
  EXPECT_FALSE(ex.ok());
  EXPECT_EQ(ChildProcess::LastLogLine(log), "error: last line");
}

TEST(ChildProcessTest, TerminateStopsTheWholeProcessGroup) {
  std::string log = TempLog("term.log");
  // The shell starts a grandchild that would outlive a plain kill of the shell.
  auto child = ChildProcess::Start({"/bin/sh", "-c", "sleep 60 & wait"}, {}, log);
  ASSERT_TRUE(child.ok());
  ChildProcess* c = child->get();
  std::thread killer([c] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    c->Terminate(2000);
  });
  auto start = std::chrono::steady_clock::now();
  ChildExit ex = c->Wait(nullptr);
  killer.join();
  EXPECT_EQ(ex.signal, SIGTERM);
  // Wait() returned because the pipe closed: the grandchild was terminated too.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

TEST(ChildProcessTest, MissingBinaryExitsWith127) {
  auto child = ChildProcess::Start({"/nonexistent/binary"}, {}, TempLog("missing.log"));
  ASSERT_TRUE(child.ok());
  EXPECT_EQ((*child)->Wait(nullptr).exit_code, 127);
}

}  // namespace
}  // namespace crossdiff::worker
