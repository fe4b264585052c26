#include "core/comm/launch.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/comm/connect.h"
#include "core/comm/local_launcher.h"

namespace crossdiff::comm {
namespace {

absl::StatusOr<std::vector<std::string>> ReadOwnCommandLine() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  if (!in) return absl::UnavailableError("/proc/self/cmdline: cannot open (needs Linux /proc)");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    args.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  if (args.empty()) return absl::UnavailableError("/proc/self/cmdline: empty");
  return args;
}

absl::StatusOr<std::string> OwnExecutable() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) {
    return absl::UnavailableError(absl::StrCat("/proc/self/exe: ", std::strerror(errno)));
  }
  return std::string(buf, n);
}

// Under a local launcher, rank 0 writes the port it bound to the pipe the launcher gave it.
void PublishPortToLauncher(int port) {
  const char* fd_text = std::getenv(kRendezvousPortFdEnv);
  int fd = -1;
  if (fd_text == nullptr || !absl::SimpleAtoi(fd_text, &fd) || fd < 0) return;
  std::string line = absl::StrCat(port, "\n");
  (void)!write(fd, line.data(), line.size());
  close(fd);
  unsetenv(kRendezvousPortFdEnv);  // children of this rank must not write to it
}

// Under a local launcher, ranks 1..N-1 start before rank 0 has bound its port and read it from the
// pipe the launcher gave them.
absl::StatusOr<int> ReadPortFromLauncher(int fd, std::chrono::milliseconds timeout) {
  std::string text;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (text.find('\n') == std::string::npos) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return absl::DeadlineExceededError(absl::StrCat(
          "--rendezvous: the launcher sent no port within ", timeout.count() / 1000.0, "s"));
    }
    pollfd p{fd, POLLIN, 0};
    const int n = poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    char buf[32];
    const ssize_t got = read(fd, buf, sizeof buf);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got <= 0) {
      return absl::UnavailableError(
          "--rendezvous: the launcher closed the port pipe: rank 0 did not start its rendezvous");
    }
    text.append(buf, got);
  }
  int port = 0;
  if (!absl::SimpleAtoi(text.substr(0, text.find('\n')), &port) || port <= 0 || port > 65535) {
    return absl::InternalError(
        absl::StrCat("--rendezvous: bad port from the launcher '", text, "'"));
  }
  return port;
}

// Local ranks are forks of the launcher unless CROSSDIFF_LAUNCH=exec asks for new processes of
// this program (each then pays its start-up again).
bool ForkLocalRanks() {
  const char* mode = std::getenv("CROSSDIFF_LAUNCH");
  return mode == nullptr || std::string(mode) != "exec";
}

}  // namespace

LaunchFlags AddLaunchFlags(CommandLine& cl, double default_timeout_s) {
  LaunchFlags f;
  f.nproc = &cl.AddInt("nproc", 1, "start N local processes (ranks 0..N-1 on 127.0.0.1) and wait");
  f.rank = &cl.AddInt("rank", 0, "this process's rank (multi-machine runs, as torchrun)");
  f.world_size = &cl.AddInt("world-size", 1, "number of ranks in the run");
  f.rendezvous =
      &cl.AddString("rendezvous", "", "HOST:PORT of rank 0's rendezvous store (rank 0 binds it)");
  f.backend = &cl.AddString("backend", "gloo", "collectives backend: gloo (CPU) or nccl (CUDA)");
  f.timeout_s = &cl.AddDouble("comm-timeout", default_timeout_s,
                              "seconds a collective may wait for the other ranks");
  f.join_timeout_s = &cl.AddDouble("rendezvous-timeout", 0,
                                   "seconds to wait for every rank to join (0: --comm-timeout)");
  f.device = &cl.AddString("comm-device", "",
                           "gloo: host/IP or if:NAME carrying collectives; nccl: cuda:N");
  return f;
}

absl::Status ParseHostPort(const std::string& flag, const std::string& text, std::string* host,
                           int* port) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", text, "' is not HOST:PORT"));
  }
  std::string h = text.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  int p = 0;
  if (!absl::SimpleAtoi(text.substr(colon + 1), &p) || p < 0 || p > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": port in '", text, "' is not a number in [0, 65535]"));
  }
  *host = h;
  *port = p;
  return absl::OkStatus();
}

std::vector<std::string> RemoveFlag(const std::vector<std::string>& args, const std::string& name) {
  const std::string bare = "--" + name;
  const std::string with_value = bare + "=";
  std::vector<std::string> kept;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--") {  // everything after is positional
      kept.insert(kept.end(), args.begin() + i, args.end());
      break;
    }
    if (args[i] == bare) {
      ++i;  // skip its value too
      continue;
    }
    if (args[i].rfind(with_value, 0) == 0) continue;
    kept.push_back(args[i]);
  }
  return kept;
}

absl::StatusOr<std::optional<int>> MaybeLaunchLocal(const LaunchFlags& flags) {
  const int64_t nproc = *flags.nproc;
  if (nproc < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--nproc: ", nproc, " is < 1"));
  }
  if (nproc == 1) return std::optional<int>();
  if (*flags.world_size != 1 || *flags.rank != 0 || !flags.rendezvous->empty()) {
    return absl::InvalidArgumentError(
        "--nproc: cannot be combined with --rank, --world-size or --rendezvous (it sets them)");
  }
  LocalLaunchSpec spec;
  if (ForkLocalRanks()) {
    spec.fork_ranks = true;
  } else {
    absl::StatusOr<std::vector<std::string>> cmdline = ReadOwnCommandLine();
    if (!cmdline.ok()) return cmdline.status();
    absl::StatusOr<std::string> exe = OwnExecutable();
    if (!exe.ok()) return exe.status();
    spec.executable = *exe;
    spec.args = RemoveFlag(std::vector<std::string>(cmdline->begin() + 1, cmdline->end()), "nproc");
  }
  spec.nproc = static_cast<int>(nproc);
  spec.host = "127.0.0.1";
  const double join_s = *flags.join_timeout_s > 0 ? *flags.join_timeout_s : *flags.timeout_s;
  spec.port_timeout = std::chrono::milliseconds(static_cast<int64_t>(join_s * 1000));
  absl::StatusOr<LocalLaunchResult> result = RunLocalRanks(spec);
  if (!result.ok()) return result.status();
  if (result->forked_rank >= 0) {  // this process is one of the ranks: run the command
    *flags.nproc = 1;
    *flags.rank = result->forked_rank;
    *flags.world_size = nproc;
    *flags.rendezvous = absl::StrCat(spec.host, ":0");
    return std::optional<int>();
  }
  if (result->failed_rank >= 0) {
    std::fprintf(stderr, "crossdiff: %s; stopped the other ranks\n", result->failure.c_str());
    std::fflush(stderr);
    int code = result->exit_code();
    return std::optional<int>(code == 0 ? 1 : code);
  }
  return std::optional<int>(0);
}

absl::StatusOr<RendezvousOptions> RendezvousOptionsFromFlags(const LaunchFlags& flags) {
  RendezvousOptions o;
  o.backend = *flags.backend;
  o.rank = static_cast<int>(*flags.rank);
  o.world_size = static_cast<int>(*flags.world_size);
  o.device = *flags.device;
  if (!(*flags.timeout_s > 0) || !std::isfinite(*flags.timeout_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--comm-timeout: ", *flags.timeout_s, " is not a positive number of seconds"));
  }
  o.timeout = std::chrono::milliseconds(static_cast<int64_t>(*flags.timeout_s * 1000));
  if (!(*flags.join_timeout_s >= 0) || !std::isfinite(*flags.join_timeout_s)) {
    return absl::InvalidArgumentError(absl::StrCat("--rendezvous-timeout: ", *flags.join_timeout_s,
                                                   " is not a number of seconds >= 0"));
  }
  o.join_timeout = std::chrono::milliseconds(static_cast<int64_t>(*flags.join_timeout_s * 1000));
  if (flags.rendezvous->empty()) {
    if (o.world_size > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--rendezvous: needed with --world-size ", o.world_size));
    }
    o.host = "127.0.0.1";
    o.port = 0;
  } else {
    if (absl::Status s = ParseHostPort("rendezvous", *flags.rendezvous, &o.host, &o.port);
        !s.ok()) {
      return s;
    }
    const char* in_fd = std::getenv(kRendezvousPortInFdEnv);
    int fd = -1;
    if (o.rank > 0 && o.port == 0 && in_fd != nullptr && absl::SimpleAtoi(in_fd, &fd) && fd >= 0) {
      absl::StatusOr<int> port =
          ReadPortFromLauncher(fd, o.join_timeout.count() > 0 ? o.join_timeout : o.timeout);
      close(fd);
      unsetenv(kRendezvousPortInFdEnv);
      if (!port.ok()) return port.status();
      o.port = *port;
    }
  }
  if (absl::Status s = ValidateRendezvousOptions(o); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("launch flags: ", s.message()));
  }
  o.on_store_bound = PublishPortToLauncher;
  return o;
}

absl::StatusOr<std::unique_ptr<Communicator>> ConnectFromFlags(const LaunchFlags& flags) {
  absl::StatusOr<RendezvousOptions> o = RendezvousOptionsFromFlags(flags);
  if (!o.ok()) return o.status();
  if (o->world_size == 1 && o->backend == "gloo" && flags.rendezvous->empty()) {
    return MakeLocalCommunicator();
  }
  return Connect(*o);
}

}  // namespace crossdiff::comm
