#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunAnalyze(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff analyze is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
