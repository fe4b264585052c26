// Test helper: runs comm_test_rank as N real processes through the local launcher and collects
// each rank's output lines.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "core/comm/local_launcher.h"
#include "gtest/gtest.h"

namespace crossdiff::comm::testing {

inline std::string RankBinary() {
  return std::string(CROSSDIFF_BINARY_DIR) + "/tests/comm_test_rank";
}

struct RankRun {
  LocalLaunchResult result;
  std::map<int, std::vector<std::string>> stdout_lines, stderr_lines;

  // The first stdout line of `rank` that starts with `prefix`, or "".
  std::string Line(int rank, const std::string& prefix) const {
    auto it = stdout_lines.find(rank);
    if (it == stdout_lines.end()) return "";
    for (const std::string& l : it->second) {
      if (absl::StartsWith(l, prefix)) return l;
    }
    return "";
  }
  std::string All(int rank) const {
    std::string s;
    for (const auto* m : {&stdout_lines, &stderr_lines}) {
      auto it = m->find(rank);
      if (it == m->end()) continue;
      for (const std::string& l : it->second) s += l + "\n";
    }
    return s;
  }
};

inline RankRun RunRanks(int nproc, std::vector<std::string> args, bool stop_all_on_failure,
                        const std::string& binary = RankBinary()) {
  RankRun run;
  LocalLaunchSpec spec;
  spec.executable = binary;
  spec.args = std::move(args);
  spec.nproc = nproc;
  spec.port_timeout = std::chrono::seconds(60);
  spec.stop_all_on_failure = stop_all_on_failure;
  spec.on_line = [&run](int rank, bool is_stderr, const std::string& line) {
    (is_stderr ? run.stderr_lines : run.stdout_lines)[rank].push_back(line);
  };
  absl::StatusOr<LocalLaunchResult> result = RunLocalRanks(spec);
  EXPECT_TRUE(result.ok()) << result.status();
  if (result.ok()) run.result = *result;
  return run;
}

}  // namespace crossdiff::comm::testing
