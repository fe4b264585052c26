#include "server/diff_service_impl.h"

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"
#include "server/watch_job_reactor.h"

namespace crossdiff::server {
namespace {

grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

template <typename Message>
class FinishedWriter : public grpc::ServerWriteReactor<Message> {
 public:
  explicit FinishedWriter(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

// Streams the selected latents of a report in pages, one write in flight at a time.
class LatentPageWriter : public grpc::ServerWriteReactor<v1::LatentPage> {
 public:
  LatentPageWriter(std::shared_ptr<const ParsedReport> report,
                   std::vector<const v1::LatentStats*> selected, int64_t offset, int64_t limit,
                   int page_size)
      : report_(std::move(report)),
        selected_(std::move(selected)),
        next_(offset),
        page_size_(page_size) {
    end_ = static_cast<int64_t>(selected_.size());
    if (limit > 0) end_ = std::min(end_, offset + limit);
    WriteNext();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    WriteNext();
  }
  void OnDone() override { delete this; }

 private:
  void WriteNext() {
    if (next_ >= end_ && wrote_any_) {
      Finish(grpc::Status::OK);
      return;
    }
    page_.Clear();
    page_.set_total_matching(static_cast<int64_t>(selected_.size()));
    page_.set_offset(next_);
    int64_t stop = std::min(end_, next_ + page_size_);
    for (int64_t i = next_; i < stop; ++i) *page_.add_latents() = *selected_[i];
    next_ = std::max(next_, stop);
    wrote_any_ = true;  // an empty selection still gets one (empty) page with the total
    StartWrite(&page_);
  }

  std::shared_ptr<const ParsedReport> report_;  // keeps selected_ alive
  std::vector<const v1::LatentStats*> selected_;
  int64_t next_;
  int64_t end_;
  int page_size_;
  bool wrote_any_ = false;
  v1::LatentPage page_;
};

}  // namespace

std::optional<std::string> AuthorizationHeader(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return std::nullopt;
  return std::string(it->second.data(), it->second.size());
}

DiffServiceImpl::DiffServiceImpl(Scheduler* scheduler, EventHub* hub, const AccessControl* access,
                                 std::string data_root, JobLimits limits)
    : scheduler_(scheduler),
      hub_(hub),
      access_(access),
      data_root_(std::move(data_root)),
      limits_(limits) {}

absl::StatusOr<std::string> DiffServiceImpl::Authenticate(
    grpc::CallbackServerContext* context) const {
  return access_->AuthenticateClient(AuthorizationHeader(context->client_metadata()),
                                     context->peer());
}

grpc::ServerUnaryReactor* DiffServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                     const v1::SubmitJobRequest* request,
                                                     v1::SubmitJobResponse* response) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return Answer(context, team.status());
  if (!request->has_spec()) return Answer(context, absl::InvalidArgumentError("spec: required"));
  absl::StatusOr<AdmittedJob> admitted = AdmitJob(request->spec(), data_root_, limits_);
  if (!admitted.ok()) return Answer(context, admitted.status());
  absl::StatusOr<v1::Job> job =
      scheduler_->SubmitJob(*team, admitted->spec, admitted->inputs, request->request_id());
  if (job.ok()) *response->mutable_job() = std::move(*job);
  return Answer(context, job.status());
}

grpc::ServerUnaryReactor* DiffServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                  const v1::GetJobRequest* request,
                                                  v1::Job* response) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return Answer(context, team.status());
  absl::StatusOr<v1::Job> job = scheduler_->GetJob(*team, request->job_id());
  if (job.ok()) *response = std::move(*job);
  return Answer(context, job.status());
}

grpc::ServerUnaryReactor* DiffServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                    const v1::ListJobsRequest* request,
                                                    v1::ListJobsResponse* response) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return Answer(context, team.status());
  absl::StatusOr<v1::ListJobsResponse> jobs = scheduler_->ListJobs(*team, *request);
  if (jobs.ok()) *response = std::move(*jobs);
  return Answer(context, jobs.status());
}

grpc::ServerUnaryReactor* DiffServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                     const v1::CancelJobRequest* request,
                                                     v1::Job* response) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return Answer(context, team.status());
  absl::StatusOr<v1::Job> job = scheduler_->CancelJob(*team, request->job_id(), request->reason());
  if (job.ok()) *response = std::move(*job);
  return Answer(context, job.status());
}

grpc::ServerWriteReactor<v1::JobEvent>* DiffServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return new FinishedWriter<v1::JobEvent>(ToGrpcStatus(team.status()));
  if (request->from_sequence() < 0) {
    return new FinishedWriter<v1::JobEvent>(
        ToGrpcStatus(absl::InvalidArgumentError("from_sequence: must be >= 0")));
  }
  absl::StatusOr<v1::Job> job = scheduler_->GetJob(*team, request->job_id());
  if (!job.ok()) return new FinishedWriter<v1::JobEvent>(ToGrpcStatus(job.status()));
  return new WatchJobReactor(scheduler_, hub_, *job, request->from_sequence());
}

absl::StatusOr<std::shared_ptr<const ParsedReport>> DiffServiceImpl::LoadReport(
    const v1::Job& job) {
  if (job.state() != v1::JOB_STATE_SUCCEEDED) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.id(), " has no report: it is ", v1::JobState_Name(job.state())));
  }
  return reports_.Get(job.outputs().report_dir());
}

grpc::ServerWriteReactor<v1::LatentPage>* DiffServiceImpl::StreamLatents(
    grpc::CallbackServerContext* context, const v1::StreamLatentsRequest* request) {
  auto fail = [](const absl::Status& status) {
    return new FinishedWriter<v1::LatentPage>(ToGrpcStatus(status));
  };
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return fail(team.status());
  if (request->page_size() < 0 || request->page_size() > 4096) {
    return fail(absl::InvalidArgumentError("page_size: must be between 0 and 4096"));
  }
  if (request->offset() < 0 || request->limit() < 0) {
    return fail(absl::InvalidArgumentError("offset, limit: must be >= 0"));
  }
  absl::StatusOr<v1::Job> job = scheduler_->GetJob(*team, request->job_id());
  if (!job.ok()) return fail(job.status());
  absl::StatusOr<std::shared_ptr<const ParsedReport>> report = LoadReport(*job);
  if (!report.ok()) return fail(report.status());
  absl::StatusOr<std::vector<const v1::LatentStats*>> selected =
      SelectLatents(**report, request->tag(), request->order());
  if (!selected.ok()) return fail(selected.status());
  int page_size = request->page_size() == 0 ? 256 : request->page_size();
  return new LatentPageWriter(*report, std::move(*selected), request->offset(), request->limit(),
                              page_size);
}

grpc::ServerUnaryReactor* DiffServiceImpl::GetReport(grpc::CallbackServerContext* context,
                                                     const v1::GetReportRequest* request,
                                                     v1::Report* response) {
  absl::StatusOr<std::string> team = Authenticate(context);
  if (!team.ok()) return Answer(context, team.status());
  absl::StatusOr<v1::Job> job = scheduler_->GetJob(*team, request->job_id());
  if (!job.ok()) return Answer(context, job.status());
  absl::StatusOr<std::shared_ptr<const ParsedReport>> report = LoadReport(*job);
  if (!report.ok()) return Answer(context, report.status());
  const char* file = request->format() == v1::REPORT_FORMAT_MARKDOWN ? "report.md"
                     : request->format() == v1::REPORT_FORMAT_HTML   ? "report.html"
                                                                     : "report.json";
  absl::StatusOr<std::string> content = ReadTextFile(job->outputs().report_dir() + "/" + file);
  if (!content.ok()) return Answer(context, content.status());
  response->set_job_id(job->id());
  response->set_format(request->format());
  response->set_content(std::move(*content));
  *response->mutable_summary() = (*report)->summary;
  for (const auto& capability : (*report)->capabilities) *response->add_capabilities() = capability;
  response->set_report_dir(job->outputs().report_dir());
  return Answer(context, absl::OkStatus());
}

}  // namespace crossdiff::server
