#include "core/comm/local_launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>

extern char** environ;

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace crossdiff::comm {
namespace {

using Clock = std::chrono::steady_clock;

// One output stream of one rank, split into lines.
struct OutputPipe {
  int fd = -1;
  int rank = 0;
  bool is_stderr = false;
  std::string partial;
};

struct Child {
  pid_t pid = -1;
  bool running = false;
};

void DefaultLine(int rank, bool is_stderr, const std::string& line) {
  FILE* out = is_stderr ? stderr : stdout;
  std::fprintf(out, "[rank %d] %s\n", rank, line.c_str());
  std::fflush(out);
}

std::string DescribeExit(int rank, int status) {
  if (WIFSIGNALED(status)) {
    return absl::StrCat("rank ", rank, " was killed by signal ", WTERMSIG(status), " (",
                        strsignal(WTERMSIG(status)), ")");
  }
  return absl::StrCat("rank ", rank, " exited with status ", WEXITSTATUS(status));
}

int ExitCodeOf(int status) {
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

class Launcher {
 public:
  explicit Launcher(const LocalLaunchSpec& spec) : spec_(spec) {
    if (!spec_.on_line) spec_.on_line = DefaultLine;
    children_.resize(spec.nproc);
    result_.exit_codes.assign(spec.nproc, -1);
  }

  ~Launcher() {
    for (OutputPipe& p : pipes_) {
      if (p.fd >= 0) close(p.fd);
    }
    if (port_fd_ >= 0) close(port_fd_);
    ClosePortOutputs();
  }

  absl::StatusOr<LocalLaunchResult> Run() {
    const bool needs_port = spec_.nproc > 1;
    int port_pipe[2] = {-1, -1};
    if (needs_port) {
      if (pipe(port_pipe) != 0) return Errno("pipe");
      port_fd_ = port_pipe[0];
      fcntl(port_fd_, F_SETFD, FD_CLOEXEC);
      port_deadline_ = Clock::now() + spec_.port_timeout;
    }
    absl::Status s = Spawn(0, needs_port ? 0 : -1, port_pipe[1], -1);
    if (forked_rank_ >= 0) return BecomeRank(port_pipe[1], -1);
    if (port_pipe[1] >= 0) close(port_pipe[1]);
    if (!s.ok()) return s;
    if (!needs_port) started_all_ = true;
    // The other ranks start now too, loading the program while rank 0 binds its port; each reads
    // the port from its own pipe (EOF, if rank 0 fails first). A rank that died before reading
    // must not kill the launcher with SIGPIPE: it is ignored process-wide, as the rendezvous does.
    if (spec_.nproc > 1) std::signal(SIGPIPE, SIG_IGN);
    for (int r = 1; r < spec_.nproc; ++r) {
      int in[2];
      if (pipe(in) != 0) {
        Fail(r, Errno("pipe").message().data());
        break;
      }
      fcntl(in[1], F_SETFD, FD_CLOEXEC);
      port_out_fds_.push_back(in[1]);
      absl::Status st = Spawn(r, 0, -1, in[0]);
      if (forked_rank_ >= 0) return BecomeRank(-1, in[0]);
      close(in[0]);
      if (!st.ok()) {
        Fail(r, st.message().data());
        break;
      }
    }

    while (AnyRunning() || AnyPipeOpen()) {
      PollOnce();
      if (!started_all_ && port_ > 0) {
        const std::string line = absl::StrCat(port_, "\n");
        for (int fd : port_out_fds_) (void)!write(fd, line.data(), line.size());
        ClosePortOutputs();
        started_all_ = true;
      }
      if (!started_all_ && !stopping_ && Clock::now() > port_deadline_) {
        Fail(0, absl::StrCat("rank 0 did not publish its rendezvous port within ",
                             spec_.port_timeout.count() / 1000.0, "s"));
      }
      if (!started_all_ && port_fd_ < 0 && port_ == 0 && !stopping_) {
        Fail(0, "rank 0 closed its port pipe without publishing a port");
      }
      Reap();
      if (!AnyRunning()) {
        // Every rank has exited; a grandchild may still hold a pipe open: drain briefly, then stop.
        if (!all_exited_) {
          all_exited_ = true;
          drain_until_ = Clock::now() + std::chrono::seconds(1);
        } else if (Clock::now() > drain_until_) {
          CloseAllPipes();
        }
      }
      if (stopping_ && !killed_ && Clock::now() > kill_at_) {
        for (Child& c : children_) {
          if (c.running) kill(c.pid, SIGKILL);
        }
        killed_ = true;
      }
    }
    return result_;
  }

 private:
  static absl::Status Errno(const char* what) {
    return absl::InternalError(absl::StrCat("launcher: ", what, ": ", std::strerror(errno)));
  }

  // port < 0: no rendezvous flags (single process); port_write_fd >= 0: rank 0's port pipe;
  // port_read_fd >= 0: the pipe another rank reads the port from.
  absl::Status Spawn(int rank, int port, int port_write_fd, int port_read_fd) {
    int out[2], err[2];
    if (pipe(out) != 0) return Errno("pipe");
    if (pipe(err) != 0) {
      close(out[0]);
      close(out[1]);
      return Errno("pipe");
    }
    std::vector<std::string> args;
    args.push_back(spec_.executable);
    args.insert(args.end(), spec_.args.begin(), spec_.args.end());
    if (port >= 0) {
      // Before a "--" separator, if any, so they stay flags.
      auto at = std::find(args.begin() + 1, args.end(), std::string("--"));
      args.insert(at, {"--rank", std::to_string(rank), "--world-size", std::to_string(spec_.nproc),
                       "--rendezvous", absl::StrCat(spec_.host, ":", port)});
    }
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // The environment is built here: setenv/putenv are not safe between fork and exec.
    std::vector<std::string> env;
    const std::string env_prefix = absl::StrCat(kRendezvousPortFdEnv, "=");
    const std::string in_prefix = absl::StrCat(kRendezvousPortInFdEnv, "=");
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, env_prefix.c_str(), env_prefix.size()) != 0 &&
          std::strncmp(*e, in_prefix.c_str(), in_prefix.size()) != 0) {
        env.emplace_back(*e);
      }
    }
    if (port_write_fd >= 0) env.push_back(absl::StrCat(env_prefix, port_write_fd));
    if (port_read_fd >= 0) env.push_back(absl::StrCat(in_prefix, port_read_fd));
    std::vector<char*> envp;
    for (std::string& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    const pid_t parent = getpid();

    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return Errno("fork");
    if (pid == 0) {
      // Child: only async-signal-safe calls until exec.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(out[1], STDOUT_FILENO);
      dup2(err[1], STDERR_FILENO);
      close(out[0]);
      close(out[1]);
      close(err[0]);
      close(err[1]);
      if (spec_.fork_ranks) {
        forked_rank_ = rank;  // Run() turns this process into the rank (BecomeRank)
        return absl::OkStatus();
      }
      execve(argv[0], argv.data(), envp.data());
      const char msg[] = "launcher: execv failed\n";
      (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
      _exit(127);
    }
    close(out[1]);
    close(err[1]);
    for (int fd : {out[0], err[0]}) fcntl(fd, F_SETFD, FD_CLOEXEC);
    pipes_.push_back({out[0], rank, false, ""});
    pipes_.push_back({err[0], rank, true, ""});
    children_[rank] = {pid, true};
    return absl::OkStatus();
  }

  // In a forked rank: drops the launcher's descriptors this process inherited (the other ranks'
  // output pipes, the port pipes), keeps its own port pipe end under the environment variable an
  // executed rank would find it in, and returns the rank to the caller.
  LocalLaunchResult BecomeRank(int port_write_fd, int port_read_fd) {
    for (OutputPipe& p : pipes_) close(p.fd);
    pipes_.clear();
    if (port_fd_ >= 0) close(port_fd_);
    port_fd_ = -1;
    ClosePortOutputs();
    unsetenv(kRendezvousPortFdEnv);
    unsetenv(kRendezvousPortInFdEnv);
    if (port_write_fd >= 0) {
      fcntl(port_write_fd, F_SETFD, FD_CLOEXEC);
      setenv(kRendezvousPortFdEnv, std::to_string(port_write_fd).c_str(), 1);
    }
    if (port_read_fd >= 0) {
      fcntl(port_read_fd, F_SETFD, FD_CLOEXEC);
      setenv(kRendezvousPortInFdEnv, std::to_string(port_read_fd).c_str(), 1);
    }
    LocalLaunchResult self;
    self.forked_rank = forked_rank_;
    return self;
  }

  void ClosePortOutputs() {
    for (int fd : port_out_fds_) close(fd);
    port_out_fds_.clear();
  }

  bool AnyRunning() const {
    for (const Child& c : children_) {
      if (c.running) return true;
    }
    return false;
  }
  void CloseAllPipes() {
    for (OutputPipe& p : pipes_) {
      if (p.fd < 0) continue;
      if (!p.partial.empty()) spec_.on_line(p.rank, p.is_stderr, p.partial);
      close(p.fd);
      p.fd = -1;
    }
  }
  bool AnyPipeOpen() const {
    for (const OutputPipe& p : pipes_) {
      if (p.fd >= 0) return true;
    }
    return false;
  }

  void PollOnce() {
    std::vector<pollfd> fds;
    std::vector<int> owner;  // index into pipes_, or -1 for the port pipe
    for (size_t i = 0; i < pipes_.size(); ++i) {
      if (pipes_[i].fd >= 0) {
        fds.push_back({pipes_[i].fd, POLLIN, 0});
        owner.push_back(static_cast<int>(i));
      }
    }
    if (port_fd_ >= 0) {
      fds.push_back({port_fd_, POLLIN, 0});
      owner.push_back(-1);
    }
    int n = poll(fds.data(), fds.size(), 50);
    if (n <= 0) return;
    char buf[65536];
    for (size_t i = 0; i < fds.size(); ++i) {
      if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      ssize_t got = read(fds[i].fd, buf, sizeof(buf));
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (owner[i] < 0) {
        ReadPort(got > 0 ? std::string(buf, got) : std::string(), got <= 0);
        continue;
      }
      OutputPipe& p = pipes_[owner[i]];
      if (got <= 0) {
        if (!p.partial.empty()) spec_.on_line(p.rank, p.is_stderr, p.partial);
        p.partial.clear();
        close(p.fd);
        p.fd = -1;
        continue;
      }
      p.partial.append(buf, got);
      size_t start = 0;
      for (size_t nl; (nl = p.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        spec_.on_line(p.rank, p.is_stderr, p.partial.substr(start, nl - start));
      }
      p.partial.erase(0, start);
    }
  }

  void ReadPort(const std::string& data, bool eof) {
    port_text_ += data;
    if (auto nl = port_text_.find('\n'); nl != std::string::npos) {
      int port = 0;
      if (absl::SimpleAtoi(port_text_.substr(0, nl), &port) && port > 0 && port < 65536) {
        port_ = port;
      } else {
        Fail(0, absl::StrCat("rank 0 published a bad rendezvous port '", port_text_.substr(0, nl),
                             "'"));
      }
      eof = true;
    }
    if (eof) {
      close(port_fd_);
      port_fd_ = -1;
    }
  }

  void Reap() {
    for (int r = 0; r < spec_.nproc; ++r) {
      Child& c = children_[r];
      if (!c.running) continue;
      int status = 0;
      pid_t got = waitpid(c.pid, &status, WNOHANG);
      if (got != c.pid) continue;
      c.running = false;
      result_.exit_codes[r] = ExitCodeOf(status);
      // Fail() keeps only the first failure: the ranks it stopped are not failures of their own.
      if (result_.exit_codes[r] != 0) Fail(r, DescribeExit(r, status));
    }
  }

  // Records the first failure and, by default, stops the other ranks.
  void Fail(int rank, const std::string& why) {
    if (result_.failed_rank < 0) {
      result_.failed_rank = rank;
      result_.failure = why;
      if (result_.exit_codes[rank] <= 0) result_.exit_codes[rank] = 1;
    }
    if (port_ == 0) {  // without a port the other ranks cannot join: EOF on their port pipes
      ClosePortOutputs();
      started_all_ = true;
    }
    if (!spec_.stop_all_on_failure || stopping_) return;
    stopping_ = true;
    started_all_ = true;  // never start the remaining ranks
    kill_at_ = Clock::now() + spec_.kill_grace;
    for (Child& c : children_) {
      if (c.running) kill(c.pid, SIGTERM);
    }
  }

  LocalLaunchSpec spec_;
  std::vector<Child> children_;
  std::vector<OutputPipe> pipes_;
  int port_fd_ = -1;
  // Write ends of ranks 1..N-1's port pipes, until the port is sent.
  std::vector<int> port_out_fds_;
  std::string port_text_;
  int port_ = 0;
  Clock::time_point port_deadline_;
  bool started_all_ = false;
  bool stopping_ = false;
  bool killed_ = false;
  bool all_exited_ = false;
  Clock::time_point drain_until_;
  Clock::time_point kill_at_;
  LocalLaunchResult result_;
  int forked_rank_ = -1;  // set in a forked rank only
};

}  // namespace

absl::StatusOr<LocalLaunchResult> RunLocalRanks(const LocalLaunchSpec& spec) {
  if (spec.nproc < 1) {
    return absl::InvalidArgumentError(absl::StrCat("nproc: ", spec.nproc, " is < 1"));
  }
  if (spec.executable.empty() && !spec.fork_ranks) {
    return absl::InvalidArgumentError("executable: empty path");
  }
  Launcher launcher(spec);
  return launcher.Run();
}

}  // namespace crossdiff::comm
