// Starts N local processes of one program as ranks 0..N-1 of a distributed run and supervises them
// (the `--nproc N` of crossdiff harvest/train; torchrun's standalone mode, without Python).
//
// Rendezvous without a port race: rank 0 starts with `--rendezvous HOST:0` and the write end of a
// pipe named in the environment variable kRendezvousPortFdEnv; it binds any free port and writes
// "PORT\n" there (ConnectFromFlags in launch.h does this). Ranks 1..N-1 start at the same time (so
// every rank loads the program in parallel) with `--rendezvous HOST:0` and the read end of a pipe
// named in kRendezvousPortInFdEnv, from which they read the port once the launcher has it.
//
// Forked ranks (fork_ranks): instead of executing `executable`, each rank is a fork of the calling
// process that returns from RunLocalRanks with LocalLaunchResult::forked_rank set, so it skips the
// program's start-up (LibTorch's and its libraries' initialisation: about 0.7 s on a 2-core VM) and
// carries on with what the caller has already parsed. Only for callers that have started no thread
// of their own when they call RunLocalRanks (a command line's entry point, before any work);
// library pools that stop themselves for a fork are fine (OpenBLAS's does, in its pthread_atfork
// handler, and restarts on its next call).
//
// Supervision: every rank's stdout/stderr line is forwarded with a "[rank R] " prefix; when a rank
// exits non-zero or is killed, the others get SIGTERM (SIGKILL after a grace period) and the
// result names the failed rank. Children die with the launcher (PR_SET_PDEATHSIG).
//
// Not thread-safe; blocks the calling thread until every rank has exited.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::comm {

inline constexpr char kRendezvousPortFdEnv[] = "CROSSDIFF_RENDEZVOUS_PORT_FD";
inline constexpr char kRendezvousPortInFdEnv[] = "CROSSDIFF_RENDEZVOUS_PORT_IN_FD";

struct LocalLaunchSpec {
  std::string executable;         // path passed to execv (unused with fork_ranks)
  std::vector<std::string> args;  // argv[1..] of every rank, without the rank flags
  // Ranks are forks of this process (see above) instead of new programs.
  bool fork_ranks = false;
  int nproc = 1;
  std::string host = "127.0.0.1";
  // How long rank 0 may take to publish its port.
  std::chrono::milliseconds port_timeout{std::chrono::seconds(300)};
  // Stop the others as soon as one rank fails (the launcher's behaviour); tests of failure
  // handling turn it off to see how the surviving ranks react.
  bool stop_all_on_failure = true;
  std::chrono::milliseconds kill_grace{std::chrono::seconds(3)};
  // Receives each output line (without its newline). Default: "[rank R] line" to this process's
  // stdout or stderr. Called on the launching thread.
  std::function<void(int rank, bool is_stderr, const std::string& line)> on_line;
};

struct LocalLaunchResult {
  // With fork_ranks, in a forked rank: its rank (the caller runs the command as that rank; the
  // port pipe's descriptor is in kRendezvousPortFdEnv or kRendezvousPortInFdEnv, as for an
  // executed rank, and no other field is set). -1 in the launcher.
  int forked_rank = -1;
  std::vector<int> exit_codes;  // per rank: exit status, or 128 + signal number
  int failed_rank = -1;         // the first rank that failed; -1 when all exited 0
  std::string failure;          // e.g. "rank 1 exited with status 3"
  int exit_code() const { return failed_rank < 0 ? 0 : exit_codes[failed_rank]; }
};

// Errors: INVALID_ARGUMENT (nproc < 1, no executable without fork_ranks), INTERNAL (fork/pipe
// failed). A failing rank is not an error of this function: it is reported in the result.
absl::StatusOr<LocalLaunchResult> RunLocalRanks(const LocalLaunchSpec& spec);

}  // namespace crossdiff::comm
