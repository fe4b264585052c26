// The worker daemon (DESIGN.md section 1): registers with the coordinator, heart-beats, leases tasks
// one at a time, runs each as a child `crossdiff` command (worker/child_process.h), forwards its
// progress, reports the result, and cleans up after cancelled tasks.
//
// Thread-safe: Run() on one thread; Shutdown() from any thread or a signal-handling thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "crossdiff/v1/worker_service.grpc.pb.h"
#include "worker/child_process.h"

namespace crossdiff::worker {

struct WorkerOptions {
  std::string coordinator;       // HOST:PORT
  std::string work_dir;          // logs and scratch
  std::string secret_file;       // worker secret (empty: none, loopback coordinators only)
  std::string device = "cpu";    // "cpu" or "cuda:N"
  std::string name;              // default: hostname-pid
  std::string advertise_host;    // how other workers reach this one (rank 0 rendezvous)
  int rendezvous_port = 0;       // 0: an ephemeral port per training task
  int threads = 0;               // threads per engine command (0: its default)
  std::string crossdiff_binary;  // default: `crossdiff` beside this executable
  // TLS: CA to verify the coordinator; client certificate + key for mutual TLS.
  std::string tls_ca, tls_cert, tls_key;
  int lease_wait_ms = 5000;
};

class Worker {
 public:
  static absl::StatusOr<std::unique_ptr<Worker>> Create(WorkerOptions options);
  ~Worker();

  // Registers and serves tasks until Shutdown(). Returns the reason it stopped.
  absl::Status Run();
  // Stops leasing, terminates the running task (its lease expires and the coordinator re-queues it).
  void Shutdown();

 private:
  explicit Worker(WorkerOptions options);
  absl::Status Register();
  void HeartbeatLoop();
  void RunTask(const v1::Task& task);
  absl::StatusOr<std::string> Rendezvous(const v1::Task& task);
  void ForwardProgress(const v1::Task& task, const std::string& json_line);
  void CompleteTask(const v1::Task& task);
  void FailTask(const v1::Task& task, const std::string& error, bool retryable);
  std::unique_ptr<grpc::ClientContext> NewContext(int timeout_ms = 10000) const;

  WorkerOptions options_;
  std::string secret_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;

  std::atomic<bool> shutdown_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
  int heartbeat_interval_ms_ ABSL_GUARDED_BY(mu_) = 2000;
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  std::string running_task_id_ ABSL_GUARDED_BY(mu_);
  ChildProcess* running_child_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool cancel_requested_ ABSL_GUARDED_BY(mu_) = false;
  std::thread heartbeat_thread_;
};

// Parses "loss 0.12 fvu 0.2/0.3 l0 8.1 dead 3"-style detail text of training progress.
v1::TrainingMetrics ParseTrainingDetail(const std::string& detail, int64_t step);

}  // namespace crossdiff::worker
