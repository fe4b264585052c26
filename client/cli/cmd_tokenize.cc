#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunTokenize(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff tokenize is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
