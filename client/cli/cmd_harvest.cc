#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunHarvest(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff harvest is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
