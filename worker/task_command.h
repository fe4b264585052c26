// Turns a leased Task into the command line of the engine command that runs it. Pure functions:
// unit-tested without a coordinator.
//
//   harvest -> crossdiff harvest ... --sequence-begin B --sequence-end E --out PART
//   merge   -> crossdiff merge-stores --out STORE PART...
//   train   -> crossdiff train ... [--resume] [--rank R --world-size W --rendezvous HOST:PORT]
//   analyze -> crossdiff analyze --crosscoder DIR --activations STORE --out DIR
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "crossdiff/v1/worker_service.pb.h"

namespace crossdiff::worker {

struct CommandContext {
  std::string crossdiff_binary;  // absolute path of the `crossdiff` binary
  std::string device = "cpu";
  int threads = 0;               // 0: the command's default
  // Training with world_size > 1: the rendezvous address every rank uses.
  std::string rendezvous;        // "HOST:PORT"
};

// INVALID_ARGUMENT when the task lacks what its kind needs (naming the field).
absl::StatusOr<std::vector<std::string>> BuildTaskCommand(const v1::Task& task,
                                                          const CommandContext& ctx);

// The directory the task writes (removed before a retry and after a cancel).
std::string TaskOutputDir(const v1::Task& task);

}  // namespace crossdiff::worker
