// The subcommands of the `crossdiff` binary. Each takes argv with argv[0] = "crossdiff <command>"
// and returns the process exit code (0 on success; non-zero after one clear line on stderr).
#pragma once

namespace crossdiff::cli {

// Local tools (run the engine in this process).
int RunActivations(int argc, char** argv);  // cmd_activations.cc
int RunTokenize(int argc, char** argv);     // cmd_tokenize.cc
int RunHarvest(int argc, char** argv);      // cmd_harvest.cc
int RunTrain(int argc, char** argv);        // cmd_train.cc
int RunAnalyze(int argc, char** argv);      // cmd_analyze.cc
int RunDemo(int argc, char** argv);         // cmd_demo.cc
int RunMergeStores(int argc, char** argv);  // cmd_merge.cc

// Client commands (talk to a coordinator over gRPC).
int RunSubmit(int argc, char** argv);   // cmd_client.cc
int RunWatch(int argc, char** argv);    // cmd_client.cc
int RunJobs(int argc, char** argv);     // cmd_client.cc
int RunLatents(int argc, char** argv);  // cmd_client.cc
int RunReport(int argc, char** argv);   // cmd_client.cc
int RunCancel(int argc, char** argv);   // cmd_client.cc

}  // namespace crossdiff::cli
