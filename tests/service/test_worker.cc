#include "tests/service/test_worker.h"

#include <gtest/gtest.h>

namespace crossdiff::testing {

grpc::Status TestWorker::Register() {
  v1::RegisterRequest request;
  request.mutable_info()->set_name(name_);
  request.mutable_info()->set_address("127.0.0.1");
  request.mutable_info()->set_device("cpu");
  v1::RegisterResponse response;
  auto context = WorkerContext(coordinator_->worker_secret());
  grpc::Status status = coordinator_->WorkerStub()->Register(context.get(), request, &response);
  if (status.ok()) id_ = response.worker_id();
  return status;
}

std::optional<v1::Task> TestWorker::Lease(int wait_ms) {
  v1::LeaseTaskRequest request;
  request.set_worker_id(id_);
  request.set_wait_ms(wait_ms);
  v1::LeaseTaskResponse response;
  auto context = WorkerContext(coordinator_->worker_secret(), wait_ms + 10000);
  grpc::Status status = coordinator_->WorkerStub()->LeaseTask(context.get(), request, &response);
  EXPECT_TRUE(status.ok()) << name_ << ": " << status.error_message();
  if (!status.ok() || !response.has_task()) return std::nullopt;
  return response.task();
}

grpc::Status TestWorker::Heartbeat(const std::vector<std::string>& running,
                                   v1::HeartbeatResponse* response) {
  v1::HeartbeatRequest request;
  request.set_worker_id(id_);
  for (const auto& id : running) request.add_running_task_ids(id);
  auto context = WorkerContext(coordinator_->worker_secret());
  return coordinator_->WorkerStub()->Heartbeat(context.get(), request, response);
}

grpc::Status TestWorker::Progress(const std::string& task_id, int64_t done, int64_t total,
                                  double rate, v1::ReportProgressResponse* response,
                                  const v1::TrainingMetrics* metrics) {
  v1::ReportProgressRequest request;
  request.set_worker_id(id_);
  request.set_task_id(task_id);
  request.mutable_progress()->set_done(done);
  request.mutable_progress()->set_total(total);
  request.mutable_progress()->set_rate(rate);
  if (metrics != nullptr) *request.mutable_progress()->mutable_metrics() = *metrics;
  auto context = WorkerContext(coordinator_->worker_secret());
  return coordinator_->WorkerStub()->ReportProgress(context.get(), request, response);
}

grpc::Status TestWorker::Complete(const std::string& task_id, const v1::TaskResult& result) {
  v1::CompleteTaskRequest request;
  request.set_worker_id(id_);
  request.set_task_id(task_id);
  *request.mutable_result() = result;
  v1::CompleteTaskResponse response;
  auto context = WorkerContext(coordinator_->worker_secret());
  return coordinator_->WorkerStub()->CompleteTask(context.get(), request, &response);
}

grpc::Status TestWorker::Fail(const std::string& task_id, const std::string& error,
                              bool retryable) {
  v1::FailTaskRequest request;
  request.set_worker_id(id_);
  request.set_task_id(task_id);
  request.set_error(error);
  request.set_retryable(retryable);
  v1::FailTaskResponse response;
  auto context = WorkerContext(coordinator_->worker_secret());
  return coordinator_->WorkerStub()->FailTask(context.get(), request, &response);
}

grpc::Status TestWorker::Publish(const std::string& task_id, int port) {
  v1::PublishRendezvousRequest request;
  request.set_worker_id(id_);
  request.set_task_id(task_id);
  request.set_port(port);
  v1::PublishRendezvousResponse response;
  auto context = WorkerContext(coordinator_->worker_secret());
  return coordinator_->WorkerStub()->PublishRendezvous(context.get(), request, &response);
}

grpc::Status TestWorker::Rendezvous(const std::string& task_id, int wait_ms,
                                    v1::GetRendezvousResponse* response) {
  v1::GetRendezvousRequest request;
  request.set_worker_id(id_);
  request.set_task_id(task_id);
  request.set_wait_ms(wait_ms);
  auto context = WorkerContext(coordinator_->worker_secret(), wait_ms + 10000);
  return coordinator_->WorkerStub()->GetRendezvous(context.get(), request, response);
}

}  // namespace crossdiff::testing
