#include "tests/service/coordinator_process.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "proto/jobspec/job_file.h"

namespace crossdiff::testing {

TempDir::TempDir() {
  std::string pattern =
      (std::filesystem::temp_directory_path() / "crossdiff-service-XXXXXX").string();
  char* made = mkdtemp(pattern.data());
  if (made == nullptr) std::abort();
  path_ = made;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void WriteFile(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string ExampleJobJson(const std::string& name) {
  return R"({"name": ")" + name + R"(", "base_model": "models/base", "finetune_model": "models/ft",
 "dataset": {"path": "data/train.jsonl", "format": "text"}, "layer": 1,
 "harvest": {"max_tokens": 20000, "seq_len": 64, "batch_size": 8, "dtype": "float32"},
 "crosscoder": {"architecture": "batch_top_k", "dict_size": 256, "k": 8, "steps": 300, "batch_size": 256, "lr": 0.004},
 "workers": 2})";
}

v1::JobSpec ExampleJobSpec(const std::string& name) {
  auto spec = jobspec::ParseJobJson(ExampleJobJson(name), "example");
  if (!spec.ok()) std::abort();
  return *spec;
}

CoordinatorProcess::CoordinatorProcess(bool with_tokens, std::vector<std::string> extra_flags)
    : with_tokens_(with_tokens), extra_flags_(std::move(extra_flags)) {
  data_root_ = dir_.path() + "/data";
  state_dir_ = dir_.path() + "/state";
  tokens_file_ = dir_.path() + "/tokens.txt";
  secret_file_ = dir_.path() + "/worker-secret.txt";
  port_file_ = dir_.path() + "/port";
  log_file_ = dir_.path() + "/coordinator.log";
  const std::string config =
      R"({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16})";
  WriteFile(data_root_ + "/models/base/config.json", config);
  WriteFile(data_root_ + "/models/ft/config.json", config);
  WriteFile(data_root_ + "/data/train.jsonl", "{\"text\": \"hello world\"}\n");
  WriteFile(tokens_file_, "# team token\nalpha tok-a\nbeta tok-b\n");
  WriteFile(secret_file_, worker_secret() + "\n");
}

CoordinatorProcess::~CoordinatorProcess() {
  if (pid_ > 0) Kill();
}

void CoordinatorProcess::Start() {
  std::filesystem::remove(port_file_);
  std::vector<std::string> args = {std::string(CROSSDIFF_BINARY_DIR) + "/bin/crossdiff-coordinator",
                                   "--listen",
                                   "127.0.0.1:" + std::to_string(port_),
                                   "--data-root",
                                   data_root_,
                                   "--state-dir",
                                   state_dir_,
                                   "--worker-secret",
                                   secret_file_,
                                   "--port-file",
                                   port_file_,
                                   "--heartbeat-interval-ms",
                                   "200",
                                   "--lease-timeout-ms",
                                   "3000",
                                   "--tick-ms",
                                   "100"};
  if (with_tokens_) {
    args.push_back("--tokens");
    args.push_back(tokens_file_);
  }
  for (const auto& flag : extra_flags_) args.push_back(flag);
  pid_ = fork();
  ASSERT_GE(pid_, 0);
  if (pid_ == 0) {
    FILE* log = std::fopen(log_file_.c_str(), "a");
    if (log != nullptr) {
      dup2(fileno(log), 1);
      dup2(fileno(log), 2);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file_);
    int port = 0;
    if (in >> port && port > 0) {
      port_ = port;
      return;
    }
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      std::ifstream log(log_file_);
      std::stringstream text;
      text << log.rdbuf();
      FAIL() << "coordinator exited during start-up: " << text.str();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL() << "coordinator did not write " << port_file_;
}

void CoordinatorProcess::Kill(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

int CoordinatorProcess::Terminate() {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::unique_ptr<client::DiffClient> CoordinatorProcess::Client(const std::string& token) const {
  client::ClientOptions options;
  options.server = address();
  options.token = token;
  auto client = client::DiffClient::Create(options);
  if (!client.ok()) std::abort();
  return std::move(*client);
}

std::shared_ptr<grpc::Channel> CoordinatorProcess::Channel() const {
  return grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
}

std::unique_ptr<v1::WorkerService::Stub> CoordinatorProcess::WorkerStub() const {
  return v1::WorkerService::NewStub(Channel());
}

std::unique_ptr<grpc::ClientContext> WorkerContext(const std::string& secret, int timeout_ms) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata("authorization", "Bearer " + secret);
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  return context;
}

}  // namespace crossdiff::testing
