// A C++ client of the coordinator's DiffService (DESIGN.md 3.6): one channel, the bearer token
// attached to every call, gRPC errors returned as absl::Status with the same code and message.
//
// Thread-safe (gRPC stubs are); streaming calls block the calling thread until the stream ends.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "crossdiff/v1/diff_service.grpc.pb.h"

namespace crossdiff::client {

struct ClientOptions {
  std::string server = "127.0.0.1:50051";  // HOST:PORT
  std::string token;                       // sent as `authorization: Bearer <token>` when non-empty
  // TLS: with tls_ca_file the channel uses TLS and trusts that CA; tls_cert_file + tls_key_file add
  // a client certificate (mutual TLS).
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  int connect_timeout_ms = 10000;
};

// Converts a gRPC status to absl (same code, same message).
absl::Status FromGrpcStatus(const grpc::Status& status);

class DiffClient {
 public:
  // Creates the channel (no connection is made until the first call). INVALID_ARGUMENT for bad TLS
  // files.
  static absl::StatusOr<std::unique_ptr<DiffClient>> Create(const ClientOptions& options);

  absl::StatusOr<v1::Job> SubmitJob(const v1::JobSpec& spec, const std::string& request_id = "");
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id, const std::string& reason = "");
  absl::StatusOr<v1::Report> GetReport(const std::string& job_id, v1::ReportFormat format);

  // Streams the job's events from `from_sequence`; `on_event` returns false to stop early (then
  // OK). Returns the stream's final status (OK after the job's terminal event).
  absl::Status WatchJob(const std::string& job_id, int64_t from_sequence,
                        const std::function<bool(const v1::JobEvent&)>& on_event);
  // WatchJob that reconnects after UNAVAILABLE (coordinator restart) for up to
  // `reconnect_window_ms`, resuming after the last event seen, so every event is delivered exactly
  // once.
  absl::Status FollowJob(const std::string& job_id, int64_t from_sequence,
                         const std::function<bool(const v1::JobEvent&)>& on_event,
                         int reconnect_window_ms = 60000);
  absl::Status StreamLatents(const v1::StreamLatentsRequest& request,
                             const std::function<bool(const v1::LatentPage&)>& on_page);

  v1::DiffService::Stub* stub() { return stub_.get(); }
  // A context with the token and, when > 0, a deadline.
  std::unique_ptr<grpc::ClientContext> NewContext(int timeout_ms = 0) const;

 private:
  DiffClient() = default;
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DiffService::Stub> stub_;
};

// Channel credentials for `options` (insecure, TLS or mutual TLS).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ClientOptions& options);

}  // namespace crossdiff::client
