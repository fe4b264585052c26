#include "server/worker_service_impl.h"

#include <algorithm>
#include <chrono>

#include "server/diff_service_impl.h"
#include "server/grpc_status.h"

namespace crossdiff::server {
namespace {

constexpr int kMaxWaitMs = 30000;

// Calls `attempt` until it yields a value, the wait ends, the client goes away or the server stops.
template <typename Attempt>
auto LongPoll(Scheduler* scheduler, grpc::ServerContext* context, int wait_ms, Attempt attempt)
    -> decltype(attempt()) {
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(std::clamp(wait_ms, 0, kMaxWaitMs));
  uint64_t version = scheduler->version();
  while (true) {
    auto result = attempt();
    if (!result.ok() || result->has_value()) return result;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || context->IsCancelled()) return result;
    // Wake at least every 250 ms to notice a cancelled client.
    scheduler->WaitForChange(&version, static_cast<int>(std::min<int64_t>(left.count(), 250)));
    if (scheduler->shutting_down()) return result;
  }
}

}  // namespace

absl::Status WorkerServiceImpl::Authenticate(grpc::ServerContext* context) const {
  return access_->AuthenticateWorker(AuthorizationHeader(context->client_metadata()),
                                     context->peer());
}

grpc::Status WorkerServiceImpl::Register(grpc::ServerContext* context,
                                         const v1::RegisterRequest* request,
                                         v1::RegisterResponse* response) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<v1::RegisterResponse> result = scheduler_->Register(request->info());
  if (result.ok()) *response = std::move(*result);
  return ToGrpcStatus(result.status());
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* context,
                                          const v1::HeartbeatRequest* request,
                                          v1::HeartbeatResponse* response) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<v1::HeartbeatResponse> result = scheduler_->Heartbeat(*request);
  if (result.ok()) *response = std::move(*result);
  return ToGrpcStatus(result.status());
}

grpc::Status WorkerServiceImpl::LeaseTask(grpc::ServerContext* context,
                                          const v1::LeaseTaskRequest* request,
                                          v1::LeaseTaskResponse* response) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  auto result = LongPoll(scheduler_, context, request->wait_ms(),
                         [&] { return scheduler_->TryLeaseTask(*request); });
  if (result.ok() && result->has_value()) *response = std::move(**result);
  return ToGrpcStatus(result.status());
}

grpc::Status WorkerServiceImpl::ReportProgress(grpc::ServerContext* context,
                                               const v1::ReportProgressRequest* request,
                                               v1::ReportProgressResponse* response) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<v1::ReportProgressResponse> result = scheduler_->ReportProgress(*request);
  if (result.ok()) *response = std::move(*result);
  return ToGrpcStatus(result.status());
}

grpc::Status WorkerServiceImpl::CompleteTask(grpc::ServerContext* context,
                                             const v1::CompleteTaskRequest* request,
                                             v1::CompleteTaskResponse*) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  return ToGrpcStatus(scheduler_->CompleteTask(*request));
}

grpc::Status WorkerServiceImpl::FailTask(grpc::ServerContext* context,
                                         const v1::FailTaskRequest* request,
                                         v1::FailTaskResponse*) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  return ToGrpcStatus(scheduler_->FailTask(*request));
}

grpc::Status WorkerServiceImpl::PublishRendezvous(grpc::ServerContext* context,
                                                  const v1::PublishRendezvousRequest* request,
                                                  v1::PublishRendezvousResponse*) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  return ToGrpcStatus(scheduler_->PublishRendezvous(*request));
}

grpc::Status WorkerServiceImpl::GetRendezvous(grpc::ServerContext* context,
                                              const v1::GetRendezvousRequest* request,
                                              v1::GetRendezvousResponse* response) {
  if (auto s = Authenticate(context); !s.ok()) return ToGrpcStatus(s);
  auto result = LongPoll(scheduler_, context, request->wait_ms(),
                         [&]() -> absl::StatusOr<std::optional<v1::GetRendezvousResponse>> {
                           absl::StatusOr<v1::GetRendezvousResponse> r =
                               scheduler_->GetRendezvous(*request);
                           if (!r.ok()) return r.status();
                           if (!r->ready()) return std::optional<v1::GetRendezvousResponse>();
                           return std::optional<v1::GetRendezvousResponse>(std::move(*r));
                         });
  if (!result.ok()) return ToGrpcStatus(result.status());
  if (result->has_value()) {
    *response = std::move(**result);
  } else {
    response->set_ready(false);
  }
  return grpc::Status::OK;
}

}  // namespace crossdiff::server
