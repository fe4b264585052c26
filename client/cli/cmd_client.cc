#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

namespace {
int NotBuilt(const char* what) {
  std::fprintf(stderr, "error: crossdiff %s is not built yet\n", what);
  return 1;
}
}  // namespace

int RunSubmit(int, char**) { return NotBuilt("submit"); }
int RunWatch(int, char**) { return NotBuilt("watch"); }
int RunJobs(int, char**) { return NotBuilt("jobs"); }
int RunLatents(int, char**) { return NotBuilt("latents"); }
int RunReport(int, char**) { return NotBuilt("report"); }
int RunCancel(int, char**) { return NotBuilt("cancel"); }

}  // namespace crossdiff::cli
