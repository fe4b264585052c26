// DiffService (DESIGN.md 3.6) on the callback API: unary calls answer inline, WatchJob and
// StreamLatents are write reactors, so 100s of idle watchers cost no threads. Translates and
// delegates: authentication (AccessControl), admission (job_admission.h), state (Scheduler),
// reports (report_reader.h). Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>

#include "crossdiff/v1/diff_service.grpc.pb.h"
#include "server/access_control.h"
#include "server/event_hub.h"
#include "server/job_admission.h"
#include "server/report_reader.h"
#include "server/scheduler.h"

namespace crossdiff::server {

class DiffServiceImpl final : public v1::DiffService::CallbackService {
 public:
  // Borrows everything; all must outlive the server. `data_root` is an absolute real path.
  DiffServiceImpl(Scheduler* scheduler, EventHub* hub, const AccessControl* access,
                  std::string data_root, JobLimits limits);

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::SubmitJobResponse* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request, v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                   const v1::WatchJobRequest* request) override;
  grpc::ServerWriteReactor<v1::LatentPage>* StreamLatents(
      grpc::CallbackServerContext* context, const v1::StreamLatentsRequest* request) override;
  grpc::ServerUnaryReactor* GetReport(grpc::CallbackServerContext* context,
                                      const v1::GetReportRequest* request,
                                      v1::Report* response) override;

 private:
  absl::StatusOr<std::string> Authenticate(grpc::CallbackServerContext* context) const;
  // The job's report, when it succeeded (FAILED_PRECONDITION otherwise).
  absl::StatusOr<std::shared_ptr<const ParsedReport>> LoadReport(const v1::Job& job);

  Scheduler* const scheduler_;
  EventHub* const hub_;
  const AccessControl* const access_;
  const std::string data_root_;
  const JobLimits limits_;
  ReportCache reports_;
};

// Reads `authorization` from call metadata (nullopt when absent).
std::optional<std::string> AuthorizationHeader(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata);

}  // namespace crossdiff::server
