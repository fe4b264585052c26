#include "server/coordinator_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <limits.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "server/report_reader.h"

namespace crossdiff::server {
namespace {

constexpr int kMaxMessageBytes = 64
                                 << 20;  // reports with many latents travel in one GetReport reply

absl::StatusOr<std::string> RealDirectory(const std::string& flag, const std::string& path,
                                          bool create) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": required"));
  if (create) {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec)
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": cannot create ", path, ": ", ec.message()));
  }
  char real[PATH_MAX];
  if (realpath(path.c_str(), real) == nullptr || !std::filesystem::is_directory(real)) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is not a directory"));
  }
  return std::string(real);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const CoordinatorOptions& options) {
  if (options.tls_cert_file.empty() && options.tls_key_file.empty()) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError("--tls-client-ca: needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key: give both or neither");
  }
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca_file.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ASSIGN_OR_RETURN(std::string cert, ReadTextFile(options.tls_cert_file));
  ASSIGN_OR_RETURN(std::string key, ReadTextFile(options.tls_key_file));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!options.tls_client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadTextFile(options.tls_client_ca_file));
  }
  return grpc::SslServerCredentials(ssl);
}

// The operator's log (stderr): state changes, warnings and errors; progress stays in the events.
void LogEvents(const std::vector<v1::JobEvent>& events) {
  for (const auto& event : events) {
    if (event.has_phase_change()) {
      std::fprintf(stderr, "crossdiff-coordinator: job %s %s -> %s (%s)\n", event.job_id().c_str(),
                   v1::JobState_Name(event.phase_change().from()).c_str(),
                   v1::JobState_Name(event.phase_change().to()).c_str(),
                   event.phase_change().reason().c_str());
    } else if (event.has_message() && event.message().severity() >= v1::SEVERITY_WARNING) {
      std::fprintf(stderr, "crossdiff-coordinator: job %s %s: %s\n", event.job_id().c_str(),
                   event.message().severity() == v1::SEVERITY_ERROR ? "error" : "warning",
                   event.message().text().c_str());
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const CoordinatorOptions& options) {
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer());
  server->options_ = options;
  ASSIGN_OR_RETURN(std::string data_root, RealDirectory("data-root", options.data_root, false));
  ASSIGN_OR_RETURN(std::string state_dir, RealDirectory("state-dir", options.state_dir, true));
  std::string storage =
      options.storage_root.empty() ? data_root + "/crossdiff-jobs" : options.storage_root;
  ASSIGN_OR_RETURN(std::string storage_root, RealDirectory("storage-root", storage, true));
  if (options.lease_timeout_ms <= options.heartbeat_interval_ms) {
    return absl::InvalidArgumentError(
        "--lease-timeout-ms: must be larger than --heartbeat-interval-ms");
  }
  ASSIGN_OR_RETURN(AccessControl access,
                   AccessControl::Load(options.tokens_file, options.worker_secret_file));
  server->access_ = std::make_unique<AccessControl>(std::move(access));
  ASSIGN_OR_RETURN(auto credentials, ServerCredentials(options));

  SchedulerOptions scheduler_options;
  scheduler_options.database_path = state_dir + "/crossdiff.db";
  scheduler_options.storage_root = storage_root;
  scheduler_options.data_root = data_root;
  scheduler_options.heartbeat_interval_ms = options.heartbeat_interval_ms;
  scheduler_options.lease_timeout_ms = options.lease_timeout_ms;
  scheduler_options.max_task_attempts = options.max_task_attempts;
  scheduler_options.max_active_jobs_per_team = options.max_active_jobs_per_team;
  ASSIGN_OR_RETURN(server->scheduler_, Scheduler::Open(scheduler_options));
  EventHub* hub = &server->hub_;
  server->scheduler_->set_event_listener([hub](const std::vector<v1::JobEvent>& events) {
    hub->Publish(events);
    LogEvents(events);
  });

  server->diff_service_ = std::make_unique<DiffServiceImpl>(
      server->scheduler_.get(), &server->hub_, server->access_.get(), data_root, options.limits);
  server->worker_service_ =
      std::make_unique<WorkerServiceImpl>(server->scheduler_.get(), server->access_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  builder.RegisterService(server->diff_service_.get());
  builder.RegisterService(server->worker_service_.get());
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("--listen: cannot listen on ", options.listen));
  }
  if (auto* health = server->server_->GetHealthCheckService(); health != nullptr) {
    health->SetServingStatus(true);
  }
  server->ticker_ = std::thread([raw = server.get()] { raw->TickLoop(); });
  return server;
}

void CoordinatorServer::TickLoop() {
  std::unique_lock<std::mutex> lock(stop_mu_);
  while (!stopping_) {
    stop_cv_.wait_for(lock, std::chrono::milliseconds(options_.tick_ms));
    if (stopping_) break;
    lock.unlock();
    absl::Status status = scheduler_->Tick();
    if (!status.ok())
      std::fprintf(stderr, "crossdiff-coordinator: tick: %s\n", status.ToString().c_str());
    lock.lock();
  }
}

void CoordinatorServer::Shutdown(int grace_ms) {
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (ticker_.joinable()) ticker_.join();
  if (server_ == nullptr) return;
  if (auto* health = server_->GetHealthCheckService(); health != nullptr)
    health->SetServingStatus(false);
  hub_.Shutdown();         // watch streams end with UNAVAILABLE; clients resume elsewhere or later
  scheduler_->Shutdown();  // long polls return
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms));
  server_->Wait();
}

CoordinatorServer::~CoordinatorServer() { Shutdown(0); }

}  // namespace crossdiff::server
