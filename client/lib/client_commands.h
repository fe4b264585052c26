// The `crossdiff` client commands (DESIGN.md 3.1): submit, watch, jobs, latents, report, cancel.
// cmd_client.cc calls these with stdout/stderr; tests call them with files, against a real
// coordinator.
//
// Each takes argv with argv[0] = "crossdiff <command>" and returns the exit code: 0 on success (for
// submit --watch and watch: only when the job succeeded), 1 when the job failed or an RPC failed, 2
// for bad flags or a bad job file (reported before anything is sent). Errors are one line on `err`.
#pragma once

#include <cstdio>

namespace crossdiff::client {

int SubmitCommand(int argc, char** argv, FILE* out, FILE* err);
int WatchCommand(int argc, char** argv, FILE* out, FILE* err);
int JobsCommand(int argc, char** argv, FILE* out, FILE* err);
int LatentsCommand(int argc, char** argv, FILE* out, FILE* err);
int ReportCommand(int argc, char** argv, FILE* out, FILE* err);
int CancelCommand(int argc, char** argv, FILE* out, FILE* err);

}  // namespace crossdiff::client
