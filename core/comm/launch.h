// The distributed-launch flags shared by `crossdiff harvest`, `crossdiff train` and the worker,
// with torchrun's meaning:
//   --nproc N                       start N local processes of this same command line and wait
//   --rank R --world-size W         this process is rank R of W ...
//   --rendezvous HOST:PORT          ... and rank 0 hosts the c10d::TCPStore on HOST:PORT
//   --backend gloo|nccl             collectives backend (gloo: CPU tensors; nccl: CUDA tensors)
//   --comm-timeout SECONDS          bounds every collective wait
//   --rendezvous-timeout SECONDS    bounds joining (default: --comm-timeout)
//   --comm-device X                 gloo: host/IP (or if:NAME) carrying collectives; nccl: cuda:N
//
// A subcommand uses it like this:
//   CommandLine cl("crossdiff train", "...");
//   ... its own flags ...
//   comm::LaunchFlags launch = comm::AddLaunchFlags(cl);
//   if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
//   absl::StatusOr<std::optional<int>> launched = comm::MaybeLaunchLocal(launch);
//   if (!launched.ok()) { print launched.status(); return 1; }
//   if (launched->has_value()) return **launched;          // this process was the launcher
//   absl::StatusOr<std::unique_ptr<comm::Communicator>> comm = comm::ConnectFromFlags(launch);
//   ... comm->rank(), comm->world_size() ...
//
// Not thread-safe (reads the process's command line and environment).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/comm/rendezvous_options.h"
#include "core/common/cli_args.h"

namespace crossdiff::comm {

// Pointers into the CommandLine's flag storage: valid while the CommandLine lives.
struct LaunchFlags {
  int64_t* nproc = nullptr;
  int64_t* rank = nullptr;
  int64_t* world_size = nullptr;
  std::string* rendezvous = nullptr;
  std::string* backend = nullptr;
  double* timeout_s = nullptr;
  double* join_timeout_s = nullptr;  // 0 = timeout_s
  std::string* device = nullptr;
};

// Registers the flags above on `cl`. `default_timeout_s` is --comm-timeout's default: commands
// whose ranks legitimately wait long for each other (a harvest's final barrier waits for the
// slowest rank) pass a longer one; a dead peer is still noticed at once (its connections close).
LaunchFlags AddLaunchFlags(CommandLine& cl, double default_timeout_s = 300);

// With --nproc N > 1: starts ranks 0..N-1 on 127.0.0.1, forwards their output with a "[rank R] "
// prefix, stops the others when one fails, and returns the exit code to return from main: 0, or
// the failed rank's code (after printing "crossdiff: rank R ..." to stderr). The ranks are forks
// of this process (RunLocalRanks' fork_ranks, which skips the program's start-up in every rank):
// in each of them MaybeLaunchLocal sets the flags to that rank's --rank/--world-size/--rendezvous
// (and --nproc to 1) and returns std::nullopt, so the command goes on as that rank. With the
// environment variable CROSSDIFF_LAUNCH=exec the ranks are new processes of this program instead
// (/proc/self/exe with the original command line from /proc/self/cmdline, minus --nproc).
// Returns std::nullopt too when this process should run the command itself (no --nproc, or N ==
// 1). INVALID_ARGUMENT when --nproc is combined with --rank/--world-size/--rendezvous. Call it
// before the command starts any thread.
absl::StatusOr<std::optional<int>> MaybeLaunchLocal(const LaunchFlags& flags);

// The RendezvousOptions the flags describe (INVALID_ARGUMENT naming the flag when malformed).
absl::StatusOr<RendezvousOptions> RendezvousOptionsFromFlags(const LaunchFlags& flags);

// Joins the run the flags describe. World size 1 without --rendezvous gives the local
// communicator. Under a local launcher, rank 0 binds a free port and reports it to the launcher.
absl::StatusOr<std::unique_ptr<Communicator>> ConnectFromFlags(const LaunchFlags& flags);

// Splits "HOST:PORT" ("[v6addr]:PORT" for IPv6). INVALID_ARGUMENT naming `flag` when malformed.
absl::Status ParseHostPort(const std::string& flag, const std::string& text, std::string* host,
                           int* port);

// Removes `--name VALUE` / `--name=VALUE` from args (used to drop --nproc before re-executing).
std::vector<std::string> RemoveFlag(const std::vector<std::string>& args, const std::string& name);

}  // namespace crossdiff::comm
