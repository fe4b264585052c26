#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunDemo(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff demo is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
