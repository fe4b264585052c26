// `crossdiff`: the local engine tools and the coordinator client in one binary.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "client/cli/commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

const Command kCommands[] = {
    {"demo", crossdiff::cli::RunDemo, "run the demo diff on the built-in model pair"},
    {"activations", crossdiff::cli::RunActivations,
     "run a Hugging Face checkpoint on input ids, write hidden states and logits"},
    {"tokenize", crossdiff::cli::RunTokenize, "print the token ids of a string"},
    {"harvest", crossdiff::cli::RunHarvest,
     "write paired base/fine-tune activations into an activation store"},
    {"merge-stores", crossdiff::cli::RunMergeStores,
     "join activation stores of consecutive sequence ranges into one"},
    {"train", crossdiff::cli::RunTrain, "train a crosscoder on an activation store"},
    {"analyze", crossdiff::cli::RunAnalyze, "write the diff report of a trained crosscoder"},
    {"submit", crossdiff::cli::RunSubmit, "submit a diff job to a coordinator"},
    {"watch", crossdiff::cli::RunWatch, "follow a job's events"},
    {"jobs", crossdiff::cli::RunJobs, "list jobs"},
    {"latents", crossdiff::cli::RunLatents, "stream a job's latent statistics"},
    {"report", crossdiff::cli::RunReport, "print a job's report"},
    {"cancel", crossdiff::cli::RunCancel, "cancel a job"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: crossdiff <command> [flags]   (crossdiff <command> --help for flags)\n\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    PrintUsage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (std::strcmp(argv[1], c.name) == 0) {
      std::string name = std::string("crossdiff ") + c.name;
      std::vector<char*> args;
      args.push_back(name.data());
      for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
      args.push_back(nullptr);
      const int rc = c.run(argc - 1, args.data());
      // A command has written and closed everything it produces when it returns, so the process
      // ends here without static destructors: LibTorch's deregister each of its thousands of
      // operators, which takes 0.3-0.45 s on a 2-core machine, in every rank of a local run and
      // again in its launcher.
      std::cout.flush();
      std::cerr.flush();
      std::fflush(nullptr);
      std::_Exit(rc);
    }
  }
  std::fprintf(stderr, "error: unknown command '%s'\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
