// A worker played by the test over real gRPC (a real client of the real WorkerService), so
// scheduler behaviour can be driven step by step without the engine.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tests/service/coordinator_process.h"

namespace crossdiff::testing {

class TestWorker {
 public:
  TestWorker(const CoordinatorProcess* coordinator, std::string name)
      : coordinator_(coordinator), name_(std::move(name)) {}

  grpc::Status Register();
  // A task, or nullopt when none came within wait_ms. Fails the test on an RPC error.
  std::optional<v1::Task> Lease(int wait_ms = 3000);
  grpc::Status Heartbeat(const std::vector<std::string>& running, v1::HeartbeatResponse* response);
  grpc::Status Progress(const std::string& task_id, int64_t done, int64_t total, double rate,
                        v1::ReportProgressResponse* response,
                        const v1::TrainingMetrics* metrics = nullptr);
  grpc::Status Complete(const std::string& task_id,
                        const v1::TaskResult& result = v1::TaskResult());
  grpc::Status Fail(const std::string& task_id, const std::string& error, bool retryable);
  grpc::Status Publish(const std::string& task_id, int port);
  grpc::Status Rendezvous(const std::string& task_id, int wait_ms,
                          v1::GetRendezvousResponse* response);

  const std::string& id() const { return id_; }
  const std::string& name() const { return name_; }

 private:
  const CoordinatorProcess* coordinator_;
  std::string name_;
  std::string id_;
};

}  // namespace crossdiff::testing
