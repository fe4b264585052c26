#include <cstdio>

#include "client/cli/commands.h"

namespace crossdiff::cli {

int RunActivations(int argc, char** argv) {
  std::fprintf(stderr, "error: crossdiff activations is not built yet\n");
  return 1;
}

}  // namespace crossdiff::cli
