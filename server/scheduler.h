// The coordinator's core: the job store (SQLite, docs/operations.md "Job database") and the
// scheduler that moves jobs through their states:
//
//   queued -> harvesting -> training -> analyzing -> succeeded
//        \________\_____________\___________\-----> failed | cancelled
//
// A job is a list of tasks run by workers: harvest parts (sequence ranges, leased to any worker),
// one merge task, a gang of `workers` train ranks (all leased together to idle workers), one
// analyze task. Every change (job state, task lease, event) is one SQLite transaction, so a
// coordinator killed at any point restarts into a consistent state and continues; leases carry
// deadlines that heartbeats push forward, and a task whose deadline passes goes back to the queue.
//
// Events: every job has a dense sequence of events (1, 2, ...), stored in the same transaction as
// the change they describe. After each commit the new events are handed to the event listener
// (outside the lock), in commit order per job.
//
// Thread-safe: all methods may be called concurrently (one mutex around the database connection).
// Errors are absl::Status with gRPC codes: NOT_FOUND (unknown job / worker), FAILED_PRECONDITION (a
// task not leased to the caller), RESOURCE_EXHAUSTED (limits), INTERNAL (database).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "crossdiff/v1/diff_service.pb.h"
#include "crossdiff/v1/job.pb.h"
#include "crossdiff/v1/worker_service.pb.h"
#include "server/sqlite_db.h"

namespace crossdiff::server {

struct SchedulerOptions {
  std::string database_path;  // <state-dir>/crossdiff.db
  std::string storage_root;   // job outputs: <storage_root>/<job id>/...
  std::string data_root;      // reported to workers
  int heartbeat_interval_ms = 2000;
  int lease_timeout_ms = 15000;
  int max_task_attempts = 3;
  int max_active_jobs_per_team = 8;
};

class Scheduler {
 public:
  using EventListener = std::function<void(const std::vector<v1::JobEvent>&)>;

  // Opens or creates the database and recovers: leases and worker heartbeats get a fresh grace
  // period of one lease timeout, so workers that survived a coordinator restart keep their tasks.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Open(SchedulerOptions options);
  ~Scheduler();

  // Called after every commit with the events it added. Set once, before serving.
  void set_event_listener(EventListener listener) { listener_ = std::move(listener); }
  const SchedulerOptions& options() const { return options_; }

  // ---- clients (team-scoped: another team's job is NOT_FOUND) ----
  // `spec` must be validated (defaults applied) and `inputs` resolved by the caller.
  absl::StatusOr<v1::Job> SubmitJob(const std::string& team, const v1::JobSpec& spec,
                                    const v1::ResolvedInputs& inputs,
                                    const std::string& request_id);
  absl::StatusOr<v1::Job> GetJob(const std::string& team, const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(const std::string& team,
                                                const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& team, const std::string& job_id,
                                    const std::string& reason);
  // Stored events with sequence >= from_sequence, at most `limit`, in order.
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(const std::string& job_id,
                                                       int64_t from_sequence, int limit);

  // ---- workers ----
  absl::StatusOr<v1::RegisterResponse> Register(const v1::WorkerInfo& info);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // Non-blocking: a task for the worker or nullopt. WaitForChange() lets callers long-poll.
  absl::StatusOr<std::optional<v1::LeaseTaskResponse>> TryLeaseTask(
      const v1::LeaseTaskRequest& request);
  absl::StatusOr<v1::ReportProgressResponse> ReportProgress(
      const v1::ReportProgressRequest& request);
  absl::Status CompleteTask(const v1::CompleteTaskRequest& request);
  absl::Status FailTask(const v1::FailTaskRequest& request);
  absl::Status PublishRendezvous(const v1::PublishRendezvousRequest& request);
  absl::StatusOr<v1::GetRendezvousResponse> GetRendezvous(const v1::GetRendezvousRequest& request);

  // Expires leases past their deadline, marks silent workers dead, schedules waiting training
  // gangs. Called periodically by the server (and by tests).
  absl::Status Tick();

  // Blocks until some state changed after `*version` (then updates it) or `timeout_ms` passed.
  // Returns false on timeout or Shutdown().
  bool WaitForChange(uint64_t* version, int timeout_ms);
  uint64_t version();
  // Wakes every waiter for good (server shutdown).
  void Shutdown();
  bool shutting_down();

 private:
  // What one transaction produced, acted on after it commits.
  struct Pending {
    std::vector<v1::JobEvent> events;
    // Long-polling workers must look again (every job change adds an event; a rendezvous does not).
    bool wake = false;
  };
  explicit Scheduler(SchedulerOptions options, SqliteDb db);

  absl::Status CreateSchema();
  absl::Status Recover();
  // Runs `body` in one transaction under mu_, then publishes its events and wakes waiters.
  absl::Status InTransaction(const std::function<absl::Status(Pending&)>& body);

  // Helpers that run inside a transaction.
  absl::Status AppendEvent(Pending& pending, const std::string& job_id, v1::JobEvent event);
  absl::Status SetJobState(Pending& pending, const std::string& job_id, v1::JobState to,
                           const std::string& reason);
  absl::StatusOr<v1::Job> LoadJob(const std::string& job_id);
  absl::StatusOr<v1::Job> LoadJobForTeam(const std::string& team, const std::string& job_id);
  absl::Status CheckWorker(const std::string& worker_id, int64_t now_ms);
  absl::Status CreateHarvestTasks(const std::string& job_id, const v1::JobSpec& spec,
                                  const std::string& job_dir);
  // `attempt` carries the attempts of the rows a gang restart replaces.
  absl::Status InsertTask(const std::string& job_id, v1::TaskKind kind, int ordinal,
                          const v1::Task& params, int attempt = 0);
  absl::Status AdvanceJob(Pending& pending, const std::string& job_id);
  absl::Status RequeueTask(Pending& pending, const std::string& task_id, const std::string& why,
                           bool count_attempt);
  absl::Status FailJob(Pending& pending, const std::string& job_id, const std::string& error);
  absl::Status ScheduleGangs(Pending& pending, int64_t now_ms);
  absl::Status UpdateJobProgress(Pending& pending, const std::string& job_id, const v1::Task& task,
                                 const v1::JobProgress& reported);
  absl::StatusOr<v1::Task> BuildTask(const std::string& task_id);
  std::string NewId(const char* prefix);

  SchedulerOptions options_;
  EventListener listener_;

  std::mutex mu_;  // guards db_ and rng_
  SqliteDb db_;
  std::mt19937_64 rng_;

  std::mutex change_mu_;
  std::condition_variable change_cv_;
  uint64_t version_ = 0;   // guarded by change_mu_
  bool shutdown_ = false;  // guarded by change_mu_
};

// Wall-clock milliseconds since the Unix epoch (leases are stored as absolute times).
int64_t NowUnixMs();
bool IsTerminal(v1::JobState state);
const char* TaskKindName(v1::TaskKind kind);

}  // namespace crossdiff::server
