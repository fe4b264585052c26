// The client commands of `crossdiff`: thin wrappers over client/lib/client_commands.h.
#include <cstdio>

#include "client/cli/commands.h"
#include "client/lib/client_commands.h"

namespace crossdiff::cli {

int RunSubmit(int argc, char** argv) { return client::SubmitCommand(argc, argv, stdout, stderr); }
int RunWatch(int argc, char** argv) { return client::WatchCommand(argc, argv, stdout, stderr); }
int RunJobs(int argc, char** argv) { return client::JobsCommand(argc, argv, stdout, stderr); }
int RunLatents(int argc, char** argv) { return client::LatentsCommand(argc, argv, stdout, stderr); }
int RunReport(int argc, char** argv) { return client::ReportCommand(argc, argv, stdout, stderr); }
int RunCancel(int argc, char** argv) { return client::CancelCommand(argc, argv, stdout, stderr); }

}  // namespace crossdiff::cli
