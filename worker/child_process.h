// A child process running one of the engine's commands (`crossdiff harvest ...`) for a task.
//
// The child gets CROSSDIFF_PROGRESS_FD pointing at a pipe (core/common/progress.h writes one JSON line
// per progress update there); its stdout and stderr go to a log file. The worker runs engine work in a
// child so that cancelling a task is a signal, and a crash in the engine never takes the worker down.
//
// Thread-compatible: one thread owns a ChildProcess; Terminate() may be called from another thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::worker {

struct ChildExit {
  int exit_code = -1;  // when exited normally
  int signal = 0;      // when killed by a signal
  bool ok() const { return signal == 0 && exit_code == 0; }
  std::string Describe() const;
};

class ChildProcess {
 public:
  // Starts argv[0] (a path) with `argv`, extra environment `env` ("K=V"), output appended to
  // `log_path`. The child is the leader of a new process group, so Terminate() reaches its children.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv,
                                                             const std::vector<std::string>& env,
                                                             const std::string& log_path);
  ~ChildProcess();

  pid_t pid() const { return pid_; }

  // Reads progress lines until the child closes the pipe or exits, calling `on_line` for each, then
  // reaps it. Blocks.
  ChildExit Wait(const std::function<void(const std::string&)>& on_line);

  // SIGTERM to the process group, SIGKILL after `grace_ms` if still alive. Safe from any thread.
  void Terminate(int grace_ms = 3000);

  // The last non-empty line of the log (the one-line error of a failed command).
  static std::string LastLogLine(const std::string& log_path);

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int progress_fd_ = -1;
  std::atomic<bool> exited_{false};
};

}  // namespace crossdiff::worker
