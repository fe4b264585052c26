#include "client/lib/diff_client.h"

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace crossdiff::client {
namespace {

constexpr int kMaxMessageBytes = 64 << 20;

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ClientOptions& options) {
  if (options.tls_ca_file.empty() && options.tls_cert_file.empty() &&
      options.tls_key_file.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  if (!options.tls_ca_file.empty()) {
    auto ca = ReadPem(options.tls_ca_file, "tls-ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
  }
  if (!options.tls_cert_file.empty() || !options.tls_key_file.empty()) {
    if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
      return absl::InvalidArgumentError("--tls-cert and --tls-key: give both or neither");
    }
    auto cert = ReadPem(options.tls_cert_file, "tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem(options.tls_key_file, "tls-key");
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::unique_ptr<DiffClient>> DiffClient::Create(const ClientOptions& options) {
  if (options.server.empty()) return absl::InvalidArgumentError("--server: required (HOST:PORT)");
  auto credentials = MakeChannelCredentials(options);
  if (!credentials.ok()) return credentials.status();
  std::unique_ptr<DiffClient> client(new DiffClient());
  client->options_ = options;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  client->channel_ = grpc::CreateCustomChannel(options.server, *credentials, args);
  client->stub_ = v1::DiffService::NewStub(client->channel_);
  return client;
}

std::unique_ptr<grpc::ClientContext> DiffClient::NewContext(int timeout_ms) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (!options_.token.empty())
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
  if (timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  }
  // Wait for the coordinator to come up (within the deadline) rather than failing at once.
  context->set_wait_for_ready(timeout_ms > 0);
  return context;
}

absl::StatusOr<v1::Job> DiffClient::SubmitJob(const v1::JobSpec& spec,
                                              const std::string& request_id) {
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  request.set_request_id(request_id);
  v1::SubmitJobResponse response;
  auto context = NewContext(options_.connect_timeout_ms);
  absl::Status status = FromGrpcStatus(stub_->SubmitJob(context.get(), request, &response));
  if (!status.ok()) return status;
  return response.job();
}

absl::StatusOr<v1::Job> DiffClient::GetJob(const std::string& job_id) {
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  auto context = NewContext(options_.connect_timeout_ms);
  absl::Status status = FromGrpcStatus(stub_->GetJob(context.get(), request, &job));
  if (!status.ok()) return status;
  return job;
}

absl::StatusOr<v1::ListJobsResponse> DiffClient::ListJobs(const v1::ListJobsRequest& request) {
  v1::ListJobsResponse response;
  auto context = NewContext(options_.connect_timeout_ms);
  absl::Status status = FromGrpcStatus(stub_->ListJobs(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::Job> DiffClient::CancelJob(const std::string& job_id,
                                              const std::string& reason) {
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  request.set_reason(reason);
  v1::Job job;
  auto context = NewContext(options_.connect_timeout_ms);
  absl::Status status = FromGrpcStatus(stub_->CancelJob(context.get(), request, &job));
  if (!status.ok()) return status;
  return job;
}

absl::StatusOr<v1::Report> DiffClient::GetReport(const std::string& job_id,
                                                 v1::ReportFormat format) {
  v1::GetReportRequest request;
  request.set_job_id(job_id);
  request.set_format(format);
  v1::Report report;
  auto context = NewContext(options_.connect_timeout_ms);
  absl::Status status = FromGrpcStatus(stub_->GetReport(context.get(), request, &report));
  if (!status.ok()) return status;
  return report;
}

absl::Status DiffClient::WatchJob(const std::string& job_id, int64_t from_sequence,
                                  const std::function<bool(const v1::JobEvent&)>& on_event) {
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_from_sequence(from_sequence);
  auto context = NewContext();
  auto reader = stub_->WatchJob(context.get(), request);
  v1::JobEvent event;
  while (reader->Read(&event)) {
    if (!on_event(event)) {
      context->TryCancel();
      (void)reader->Finish();
      return absl::OkStatus();
    }
  }
  return FromGrpcStatus(reader->Finish());
}

absl::Status DiffClient::FollowJob(const std::string& job_id, int64_t from_sequence,
                                   const std::function<bool(const v1::JobEvent&)>& on_event,
                                   int reconnect_window_ms) {
  int64_t next = std::max<int64_t>(1, from_sequence);
  auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(reconnect_window_ms);
  bool stopped = false;
  while (true) {
    absl::Status status = WatchJob(job_id, next, [&](const v1::JobEvent& event) {
      next = event.sequence() + 1;
      give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(reconnect_window_ms);
      if (!on_event(event)) {
        stopped = true;
        return false;
      }
      return true;
    });
    if (stopped || !absl::IsUnavailable(status) || std::chrono::steady_clock::now() >= give_up)
      return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

absl::Status DiffClient::StreamLatents(const v1::StreamLatentsRequest& request,
                                       const std::function<bool(const v1::LatentPage&)>& on_page) {
  auto context = NewContext();
  auto reader = stub_->StreamLatents(context.get(), request);
  v1::LatentPage page;
  while (reader->Read(&page)) {
    if (!on_page(page)) {
      context->TryCancel();
      (void)reader->Finish();
      return absl::OkStatus();
    }
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace crossdiff::client
