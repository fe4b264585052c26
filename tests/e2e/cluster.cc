#include "tests/e2e/cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"

extern char** environ;

namespace crossdiff::e2e {
namespace fs = std::filesystem;

namespace {
const std::string kBin = std::string(CROSSDIFF_BINARY_DIR) + "/bin/";

void KillAndReap(pid_t& pid, int sig) {
  if (pid <= 0) return;
  kill(pid, sig);
  waitpid(pid, nullptr, 0);
  pid = -1;
}
}  // namespace

Cluster::Cluster(std::string root, std::string data_root)
    : root_(std::move(root)), data_root_(std::move(data_root)) {
  fs::create_directories(fs::path(root_) / "state");
}

Cluster::~Cluster() {
  for (auto& w : workers_) KillAndReap(w, SIGTERM);
  KillAndReap(coordinator_, SIGTERM);
}

pid_t Cluster::Spawn(const std::vector<std::string>& args, const std::string& log) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ), 0) << args[0];
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

void Cluster::StartCoordinator(int port) {
  const std::string port_file = (fs::path(root_) / "state" / "port").string();
  fs::remove(port_file);
  coordinator_ = Spawn({kBin + "crossdiff-coordinator", "--listen", "127.0.0.1:" + std::to_string(port),
                        "--data-root", data_root_, "--state-dir", (fs::path(root_) / "state").string(),
                        "--port-file", port_file, "--heartbeat-interval-ms", "300",
                        "--lease-timeout-ms", "2500", "--tick-ms", "100"},
                       (fs::path(root_) / "coordinator.log").string());
  std::string text;
  for (int i = 0; i < 400 && text.empty(); ++i) {
    std::ifstream in(port_file);
    std::getline(in, text);
    if (text.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_FALSE(text.empty()) << "coordinator did not start; see " << root_ << "/coordinator.log";
  port_ = std::stoi(text);
  channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
  ASSERT_TRUE(channel_->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  stub_ = v1::DiffService::NewStub(channel_);
}

void Cluster::StartWorkers(int n) {
  for (int i = 0; i < n; ++i) {
    size_t index = workers_.size();
    fs::path wd = fs::path(root_) / ("worker-" + std::to_string(index));
    fs::create_directories(wd);
    workers_.push_back(Spawn({kBin + "crossdiff-worker", "--coordinator", address(), "--work-dir",
                              wd.string(), "--name", "e2e-worker-" + std::to_string(index),
                              "--threads", "1"},
                             (fs::path(root_) / ("worker-" + std::to_string(index) + ".log")).string()));
  }
}

void Cluster::KillCoordinator() { KillAndReap(coordinator_, SIGKILL); }

void Cluster::KillWorker(size_t i) {
  ASSERT_LT(i, workers_.size());
  KillAndReap(workers_[i], SIGKILL);
}

}  // namespace crossdiff::e2e
