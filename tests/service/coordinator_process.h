// Test helpers: a real crossdiff-coordinator process on 127.0.0.1 (port 0, read back from
// --port-file) over a temporary data root holding a tiny model pair and dataset, plus gRPC stubs to
// talk to it.
#pragma once

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "client/lib/diff_client.h"
#include "crossdiff/v1/diff_service.grpc.pb.h"
#include "crossdiff/v1/worker_service.grpc.pb.h"

namespace crossdiff::testing {

// A fresh temporary directory, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes `text` to `path`, creating parent directories.
void WriteFile(const std::string& path, const std::string& text);

// The job file of the issue (relative paths into the test data root).
std::string ExampleJobJson(const std::string& name = "llama-vs-ft");
v1::JobSpec ExampleJobSpec(const std::string& name = "llama-vs-ft");

class CoordinatorProcess {
 public:
  // Lays out root/data (models/base, models/ft with config.json, data/train.jsonl), root/state and
  // a tokens file (`alpha tok-a`, `beta tok-b`) unless `with_tokens` is false.
  explicit CoordinatorProcess(bool with_tokens = true, std::vector<std::string> extra_flags = {});
  ~CoordinatorProcess();

  // Starts the process and waits until it serves. Fails the test (ASSERT) otherwise. The first
  // start binds port 0; later ones (restarts) the same port again, so clients can reconnect.
  void Start();
  void Kill(int signal = SIGKILL);  // and reap
  void Restart() {
    Kill();
    Start();
  }
  // SIGTERM and wait; returns the exit status.
  int Terminate();

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  const std::string& data_root() const { return data_root_; }
  const std::string& root() const { return dir_.path(); }
  std::string worker_secret() const { return "worker-secret-1"; }

  std::unique_ptr<client::DiffClient> Client(const std::string& token = "tok-a") const;
  std::unique_ptr<v1::WorkerService::Stub> WorkerStub() const;
  std::shared_ptr<grpc::Channel> Channel() const;

 private:
  TempDir dir_;
  std::string data_root_, state_dir_, tokens_file_, secret_file_, port_file_, log_file_;
  bool with_tokens_;
  std::vector<std::string> extra_flags_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// A context carrying the worker secret.
std::unique_ptr<grpc::ClientContext> WorkerContext(const std::string& secret,
                                                   int timeout_ms = 10000);

}  // namespace crossdiff::testing
