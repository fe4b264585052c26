#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunTrain(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff train is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
