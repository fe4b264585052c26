// A local crossdiff cluster for end-to-end tests: one coordinator process and N worker processes
// on 127.0.0.1, started from the built binaries, with short heartbeats so failures show quickly.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "crossdiff/v1/diff_service.grpc.pb.h"

namespace crossdiff::e2e {

class Cluster {
 public:
  // `root` holds data/ (the data root), state/ and worker dirs.
  Cluster(std::string root, std::string data_root);
  ~Cluster();

  // Starts the coordinator (on `port`, 0 = any) and waits until it serves.
  void StartCoordinator(int port = 0);
  void StartWorkers(int n);
  void KillCoordinator();           // SIGKILL
  void KillWorker(size_t i);        // SIGKILL
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  v1::DiffService::Stub& stub() { return *stub_; }

 private:
  pid_t Spawn(const std::vector<std::string>& args, const std::string& log);
  std::string root_, data_root_;
  pid_t coordinator_ = -1;
  std::vector<pid_t> workers_;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DiffService::Stub> stub_;
};

}  // namespace crossdiff::e2e
