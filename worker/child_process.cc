#include "worker/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace crossdiff::worker {

std::string ChildExit::Describe() const {
  if (signal != 0) return absl::StrCat("killed by signal ", signal, " (", strsignal(signal), ")");
  return absl::StrCat("exit code ", exit_code);
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(
    const std::vector<std::string>& argv, const std::vector<std::string>& env,
    const std::string& log_path) {
  if (argv.empty()) return absl::InvalidArgumentError("ChildProcess: empty argv");
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    return absl::InternalError(absl::StrCat(log_path, ": ", std::strerror(errno)));
  }
  // Everything the child needs is prepared before fork (no allocation after it).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "CROSSDIFF_PROGRESS_FD=", 22) != 0) env_strings.emplace_back(*e);
  }
  const int child_progress_fd = 3;
  env_strings.push_back(absl::StrCat("CROSSDIFF_PROGRESS_FD=", child_progress_fd));
  for (const auto& e : env) env_strings.push_back(e);
  std::vector<char*> cargv, cenv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  for (const auto& e : env_strings) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);

  pid_t pid = fork();
  if (pid < 0) {
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    ::close(log_fd);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    setpgid(0, 0);
    int devnull = ::open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    dup2(pipe_fds[1], child_progress_fd);  // dup2 clears O_CLOEXEC on the new descriptor
    execve(cargv[0], cargv.data(), cenv.data());
    const char msg[] = "crossdiff-worker: exec failed\n";
    if (::write(2, msg, sizeof(msg) - 1) < 0) {
    }
    _exit(127);
  }
  setpgid(pid, pid);  // also from the parent, so Terminate() works even before the child runs
  ::close(pipe_fds[1]);
  ::close(log_fd);
  std::unique_ptr<ChildProcess> child(new ChildProcess());
  child->pid_ = pid;
  child->progress_fd_ = pipe_fds[0];
  return child;
}

ChildProcess::~ChildProcess() {
  if (!exited_.load()) {
    Terminate(0);
    int status;
    waitpid(pid_, &status, 0);
  }
  if (progress_fd_ >= 0) ::close(progress_fd_);
}

ChildExit ChildProcess::Wait(const std::function<void(const std::string&)>& on_line) {
  std::string buffer;
  char chunk[4096];
  for (;;) {
    pollfd p{progress_fd_, POLLIN, 0};
    int r = poll(&p, 1, 500);
    if (r < 0 && errno == EINTR) continue;
    if (r > 0) {
      ssize_t n = ::read(progress_fd_, chunk, sizeof(chunk));
      if (n <= 0) break;  // EOF: the child (and any grandchild holding the pipe) is gone
      buffer.append(chunk, static_cast<size_t>(n));
      size_t nl;
      while ((nl = buffer.find('\n')) != std::string::npos) {
        std::string line = buffer.substr(0, nl);
        buffer.erase(0, nl + 1);
        if (!line.empty() && on_line) on_line(line);
      }
      continue;
    }
    // No output for a while: check the child is still alive (it may have exited with the pipe
    // still held open by a grandchild).
    int status;
    pid_t w = waitpid(pid_, &status, WNOHANG);
    if (w == pid_) {
      exited_ = true;
      ChildExit ex;
      if (WIFEXITED(status)) ex.exit_code = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) ex.signal = WTERMSIG(status);
      return ex;
    }
  }
  int status = 0;
  waitpid(pid_, &status, 0);
  exited_ = true;
  ChildExit ex;
  if (WIFEXITED(status)) ex.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) ex.signal = WTERMSIG(status);
  return ex;
}

void ChildProcess::Terminate(int grace_ms) {
  if (exited_.load() || pid_ <= 0) return;
  kill(-pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(grace_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (kill(pid_, 0) != 0 || exited_.load()) return;
    // A zombie still answers kill(0); the owner's Wait() reaps it.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!exited_.load()) kill(-pid_, SIGKILL);
}

std::string ChildProcess::LastLogLine(const std::string& log_path) {
  std::ifstream in(log_path);
  std::string line, last;
  while (std::getline(in, line)) {
    // Progress redraws use '\r'; keep the text after the last one.
    if (auto cr = line.rfind('\r'); cr != std::string::npos) line = line.substr(cr + 1);
    if (line.find_first_not_of(" \t") != std::string::npos) last = line;
  }
  return last;
}

}  // namespace crossdiff::worker
