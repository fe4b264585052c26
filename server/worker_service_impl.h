// WorkerService (proto/crossdiff/v1/worker_service.proto) on the sync API: LeaseTask and
// GetRendezvous long-poll on a server thread, waking when the scheduler's state changes.
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include "crossdiff/v1/worker_service.grpc.pb.h"
#include "server/access_control.h"
#include "server/scheduler.h"

namespace crossdiff::server {

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  WorkerServiceImpl(Scheduler* scheduler, const AccessControl* access)
      : scheduler_(scheduler), access_(access) {}

  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override;
  grpc::Status LeaseTask(grpc::ServerContext* context, const v1::LeaseTaskRequest* request,
                         v1::LeaseTaskResponse* response) override;
  grpc::Status ReportProgress(grpc::ServerContext* context,
                              const v1::ReportProgressRequest* request,
                              v1::ReportProgressResponse* response) override;
  grpc::Status CompleteTask(grpc::ServerContext* context, const v1::CompleteTaskRequest* request,
                            v1::CompleteTaskResponse* response) override;
  grpc::Status FailTask(grpc::ServerContext* context, const v1::FailTaskRequest* request,
                        v1::FailTaskResponse* response) override;
  grpc::Status PublishRendezvous(grpc::ServerContext* context,
                                 const v1::PublishRendezvousRequest* request,
                                 v1::PublishRendezvousResponse* response) override;
  grpc::Status GetRendezvous(grpc::ServerContext* context, const v1::GetRendezvousRequest* request,
                             v1::GetRendezvousResponse* response) override;

 private:
  absl::Status Authenticate(grpc::ServerContext* context) const;

  Scheduler* const scheduler_;
  const AccessControl* const access_;
};

}  // namespace crossdiff::server
