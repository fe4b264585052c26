// The coordinator process minus flag parsing: opens the job store, serves DiffService and
// WorkerService (plus gRPC health checking and server reflection), runs the scheduler's periodic
// tick, and shuts down gracefully (watch streams end with UNAVAILABLE, in-flight calls drain, state
// is already durable).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/access_control.h"
#include "server/diff_service_impl.h"
#include "server/event_hub.h"
#include "server/job_admission.h"
#include "server/scheduler.h"
#include "server/worker_service_impl.h"

namespace crossdiff::server {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";  // HOST:PORT; port 0 picks a free one
  std::string data_root;                   // required
  std::string state_dir;                   // required; holds crossdiff.db
  std::string storage_root;                // default <data_root>/crossdiff-jobs
  std::string tokens_file;
  std::string worker_secret_file;
  // TLS: server certificate chain + key (PEM). With client_ca_file, clients must present a
  // certificate signed by it (mutual TLS).
  std::string tls_cert_file, tls_key_file, tls_client_ca_file;
  int heartbeat_interval_ms = 2000;
  int lease_timeout_ms = 15000;
  int tick_ms = 500;
  int max_task_attempts = 3;
  int max_active_jobs_per_team = 8;
  JobLimits limits;
};

class CoordinatorServer {
 public:
  // Opens the store and starts serving. INVALID_ARGUMENT naming the flag for bad options,
  // UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(
      const CoordinatorOptions& options);
  ~CoordinatorServer();

  int port() const { return port_; }
  Scheduler* scheduler() { return scheduler_.get(); }
  // Graceful stop; idempotent. Waits at most `grace_ms` for calls in flight.
  void Shutdown(int grace_ms = 5000);

 private:
  CoordinatorServer() = default;
  void TickLoop();

  CoordinatorOptions options_;
  std::unique_ptr<Scheduler> scheduler_;
  EventHub hub_;
  std::unique_ptr<AccessControl> access_;
  std::unique_ptr<DiffServiceImpl> diff_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  std::thread ticker_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;  // guarded by stop_mu_
};

}  // namespace crossdiff::server
