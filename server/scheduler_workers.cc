// The worker half of Scheduler: registration, leases, progress, results and the job state machine.
#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"
#include "server/scheduler.h"

namespace crossdiff::server {
namespace {

std::string JoinPath(const std::string& a, const std::string& b) {
  if (a.empty() || a.back() == '/') return a + b;
  return a + "/" + b;
}

std::string TaskLabel(const v1::Task& task) {
  switch (task.kind()) {
    case v1::TASK_KIND_HARVEST:
      return absl::StrFormat("harvest part %d/%d", task.harvest().part_index() + 1,
                             task.harvest().part_count());
    case v1::TASK_KIND_TRAIN:
      return absl::StrFormat("train rank %d/%d", task.train().rendezvous().rank(),
                             task.train().rendezvous().world_size());
    default:
      return TaskKindName(task.kind());
  }
}

// One row of `tasks`, as the scheduler needs it.
struct TaskRow {
  std::string id;
  std::string job_id;
  v1::TaskKind kind = v1::TASK_KIND_UNSPECIFIED;
  int ordinal = 0;
  std::string state;
  int attempt = 0;
  std::string worker_id;
  v1::Task params;
};

absl::StatusOr<TaskRow> LoadTaskRow(SqliteDb& db, const std::string& task_id) {
  ASSIGN_OR_RETURN(auto select,
                   db.Prepare("SELECT id, job_id, kind, ordinal, state, attempt, "
                              "COALESCE(worker_id, ''), params FROM tasks WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, task_id).Step());
  if (!row) return absl::NotFoundError(absl::StrCat("task ", task_id, " not found"));
  TaskRow task;
  task.id = select.Text(0);
  task.job_id = select.Text(1);
  task.kind = static_cast<v1::TaskKind>(select.Int(2));
  task.ordinal = static_cast<int>(select.Int(3));
  task.state = select.Text(4);
  task.attempt = static_cast<int>(select.Int(5));
  task.worker_id = select.Text(6);
  if (!task.params.ParseFromString(select.Blob(7))) {
    return absl::DataLossError(absl::StrCat("job database: corrupt parameters of task ", task_id));
  }
  return task;
}

// The task must be leased to this worker; FAILED_PRECONDITION otherwise (lease lost, job
// cancelled).
absl::StatusOr<TaskRow> LoadLeasedTask(SqliteDb& db, const std::string& task_id,
                                       const std::string& worker_id) {
  ASSIGN_OR_RETURN(TaskRow task, LoadTaskRow(db, task_id));
  if (task.state != "leased" || task.worker_id != worker_id) {
    return absl::FailedPreconditionError(absl::StrCat("task ", task_id, " is not leased to worker ",
                                                      worker_id, " (it is ", task.state,
                                                      "): abandon it"));
  }
  return task;
}

absl::StatusOr<v1::JobState> JobStateOf(SqliteDb& db, const std::string& job_id) {
  ASSIGN_OR_RETURN(auto select, db.Prepare("SELECT state FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, job_id).Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return static_cast<v1::JobState>(select.Int(0));
}

v1::JobEvent MessageEvent(v1::Severity severity, std::string text, const std::string& task_id,
                          const std::string& worker_id) {
  v1::JobEvent event;
  auto* message = event.mutable_message();
  message->set_severity(severity);
  message->set_text(std::move(text));
  message->set_task_id(task_id);
  message->set_worker_id(worker_id);
  return event;
}

}  // namespace

absl::Status Scheduler::CheckWorker(const std::string& worker_id, int64_t now_ms) {
  ASSIGN_OR_RETURN(auto select, db_.Prepare("SELECT state FROM workers WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, worker_id).Step());
  if (!row || select.Text(0) != "alive") {
    return absl::NotFoundError(
        absl::StrCat("worker ", worker_id.empty() ? "''" : worker_id,
                     " is not registered (or was declared dead): register again"));
  }
  ASSIGN_OR_RETURN(auto touch,
                   db_.Prepare("UPDATE workers SET last_heartbeat_ms = ? WHERE id = ?"));
  return touch.Bind(1, now_ms).Bind(2, worker_id).Run();
}

absl::StatusOr<v1::RegisterResponse> Scheduler::Register(const v1::WorkerInfo& info) {
  if (info.name().empty()) return absl::InvalidArgumentError("info.name: required");
  v1::RegisterResponse response;
  RETURN_IF_ERROR(InTransaction([&](Pending& pending) -> absl::Status {
    int64_t now = NowUnixMs();
    // A worker that registers again under the same name restarted: what it held is lost.
    ASSIGN_OR_RETURN(auto old,
                     db_.Prepare("SELECT id FROM workers WHERE name = ? AND state = 'alive'"));
    old.Bind(1, info.name());
    std::vector<std::string> old_ids;
    while (true) {
      ASSIGN_OR_RETURN(bool row, old.Step());
      if (!row) break;
      old_ids.push_back(old.Text(0));
    }
    for (const auto& old_id : old_ids) {
      ASSIGN_OR_RETURN(auto dead, db_.Prepare("UPDATE workers SET state = 'dead' WHERE id = ?"));
      RETURN_IF_ERROR(dead.Bind(1, old_id).Run());
      ASSIGN_OR_RETURN(
          auto held, db_.Prepare("SELECT id FROM tasks WHERE worker_id = ? AND state = 'leased'"));
      held.Bind(1, old_id);
      std::vector<std::string> tasks;
      while (true) {
        ASSIGN_OR_RETURN(bool row, held.Step());
        if (!row) break;
        tasks.push_back(held.Text(0));
      }
      for (const auto& task_id : tasks) {
        RETURN_IF_ERROR(RequeueTask(
            pending, task_id, absl::StrCat("worker ", info.name(), " restarted (was ", old_id, ")"),
            true));
      }
    }
    std::string id = NewId("w-");
    ASSIGN_OR_RETURN(auto insert,
                     db_.Prepare("INSERT INTO workers(id, name, info, state, register_ms, "
                                 "last_heartbeat_ms) VALUES(?,?,?,'alive',?,?)"));
    RETURN_IF_ERROR(insert.Bind(1, id)
                        .Bind(2, info.name())
                        .BindBlob(3, info.SerializeAsString())
                        .Bind(4, now)
                        .Bind(5, now)
                        .Run());
    response.set_worker_id(id);
    return absl::OkStatus();
  }));
  response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response.set_lease_timeout_ms(options_.lease_timeout_ms);
  response.set_storage_root(options_.storage_root);
  response.set_data_root(options_.data_root);
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> Scheduler::Heartbeat(const v1::HeartbeatRequest& request) {
  v1::HeartbeatResponse response;
  RETURN_IF_ERROR(InTransaction([&](Pending&) -> absl::Status {
    int64_t now = NowUnixMs();
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), now));
    for (const auto& task_id : request.running_task_ids()) {
      ASSIGN_OR_RETURN(auto extend,
                       db_.Prepare("UPDATE tasks SET lease_deadline_ms = ?, delivered = 1 "
                                   "WHERE id = ? AND worker_id = ? AND state = 'leased'"));
      RETURN_IF_ERROR(extend.Bind(1, now + options_.lease_timeout_ms)
                          .Bind(2, task_id)
                          .Bind(3, request.worker_id())
                          .Run());
      // Anything the worker runs that is no longer leased to it must stop.
      if (db_.Changes() == 0) response.add_cancel_task_ids(task_id);
    }
    return absl::OkStatus();
  }));
  return response;
}

absl::StatusOr<v1::Task> Scheduler::BuildTask(const std::string& task_id) {
  ASSIGN_OR_RETURN(TaskRow row, LoadTaskRow(db_, task_id));
  v1::Task task = row.params;
  task.set_task_id(row.id);
  task.set_job_id(row.job_id);
  task.set_kind(row.kind);
  task.set_attempt(row.attempt);
  ASSIGN_OR_RETURN(
      auto job,
      db_.Prepare("SELECT spec, inputs, job_dir, train_generation FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool found, job.Bind(1, row.job_id).Step());
  if (!found) return absl::NotFoundError(absl::StrCat("job ", row.job_id, " not found"));
  if (!task.mutable_spec()->ParseFromString(job.Blob(0)) ||
      !task.mutable_inputs()->ParseFromString(job.Blob(1))) {
    return absl::DataLossError(absl::StrCat("job database: corrupt spec of job ", row.job_id));
  }
  task.set_job_dir(job.Text(2));
  if (task.has_train()) {
    auto* rdv = task.mutable_train()->mutable_rendezvous();
    rdv->set_generation(static_cast<int32_t>(job.Int(3)));
    ASSIGN_OR_RETURN(
        auto rank0,
        db_.Prepare("SELECT rdv_host, rdv_port FROM tasks WHERE job_id = ? AND kind = ? "
                    "AND ordinal = 0 AND state != 'cancelled'"));
    ASSIGN_OR_RETURN(bool has_rank0,
                     rank0.Bind(1, row.job_id).Bind(2, int64_t{v1::TASK_KIND_TRAIN}).Step());
    if (has_rank0) {
      rdv->set_host(rank0.Text(0));
      rdv->set_port(static_cast<int32_t>(rank0.Int(1)));
    }
  }
  return task;
}

absl::Status Scheduler::ScheduleGangs(Pending& pending, int64_t now_ms) {
  // Jobs whose whole training gang waits, oldest first.
  ASSIGN_OR_RETURN(auto jobs,
                   db_.Prepare("SELECT j.id, COUNT(*) FROM jobs j JOIN tasks t ON t.job_id = j.id "
                               "WHERE j.state = 3 AND t.kind = 3 AND t.state = 'pending' GROUP BY "
                               "j.id ORDER BY j.create_ms"));
  std::vector<std::pair<std::string, int64_t>> waiting;
  while (true) {
    ASSIGN_OR_RETURN(bool row, jobs.Step());
    if (!row) break;
    waiting.emplace_back(jobs.Text(0), jobs.Int(1));
  }
  for (const auto& [job_id, world_size] : waiting) {
    ASSIGN_OR_RETURN(auto idle, db_.Prepare("SELECT w.id, w.info FROM workers w WHERE w.state = "
                                            "'alive' AND w.last_heartbeat_ms >= ? "
                                            "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE "
                                            "t.worker_id = w.id AND t.state = 'leased') "
                                            "ORDER BY w.last_heartbeat_ms DESC LIMIT ?"));
    idle.Bind(1, now_ms - options_.lease_timeout_ms).Bind(2, world_size);
    std::vector<std::pair<std::string, v1::WorkerInfo>> workers;
    while (true) {
      ASSIGN_OR_RETURN(bool row, idle.Step());
      if (!row) break;
      v1::WorkerInfo info;
      info.ParseFromString(idle.Blob(1));
      workers.emplace_back(idle.Text(0), std::move(info));
    }
    if (static_cast<int64_t>(workers.size()) < world_size)
      continue;  // keep waiting for a full gang
    // Rank 0 hosts the c10d TCPStore: at its advertised address, on a port it publishes.
    std::string rank0_host =
        workers[0].second.address().empty() ? "127.0.0.1" : workers[0].second.address();
    for (int64_t rank = 0; rank < world_size; ++rank) {
      ASSIGN_OR_RETURN(
          auto lease,
          db_.Prepare("UPDATE tasks SET state = 'leased', worker_id = ?, delivered = "
                      "0, lease_deadline_ms = ?, "
                      "attempt = attempt + 1, progress_done = 0, progress_rate = 0, "
                      "rdv_host = ?, rdv_port = 0, update_ms = ? "
                      "WHERE job_id = ? AND kind = 3 AND ordinal = ? AND state = 'pending'"));
      RETURN_IF_ERROR(lease.Bind(1, workers[rank].first)
                          .Bind(2, now_ms + options_.lease_timeout_ms)
                          .Bind(3, rank == 0 ? rank0_host : std::string())
                          .Bind(4, now_ms)
                          .Bind(5, job_id)
                          .Bind(6, rank)
                          .Run());
    }
    std::vector<std::string> names;
    for (const auto& w : workers) names.push_back(w.second.name());
    RETURN_IF_ERROR(AppendEvent(
        pending, job_id,
        MessageEvent(v1::SEVERITY_INFO,
                     absl::StrCat("training gang of ", world_size, " scheduled on ",
                                  absl::StrJoin(names, ", "), "; rank 0 at ", rank0_host),
                     "", "")));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<v1::LeaseTaskResponse>> Scheduler::TryLeaseTask(
    const v1::LeaseTaskRequest& request) {
  std::optional<v1::LeaseTaskResponse> result;
  std::set<int> kinds(request.kinds().begin(), request.kinds().end());
  auto accepts = [&](v1::TaskKind kind) { return kinds.empty() || kinds.count(kind) > 0; };
  RETURN_IF_ERROR(InTransaction([&](Pending& pending) -> absl::Status {
    int64_t now = NowUnixMs();
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), now));
    if (accepts(v1::TASK_KIND_TRAIN)) RETURN_IF_ERROR(ScheduleGangs(pending, now));
    std::string task_id;
    // 1. A gang rank assigned to this worker and not yet picked up.
    ASSIGN_OR_RETURN(auto assigned,
                     db_.Prepare("SELECT id FROM tasks WHERE worker_id = ? AND state = 'leased' "
                                 "AND delivered = 0 ORDER BY update_ms LIMIT 1"));
    ASSIGN_OR_RETURN(bool has_assigned, assigned.Bind(1, request.worker_id()).Step());
    if (has_assigned) {
      task_id = assigned.Text(0);
      ASSIGN_OR_RETURN(
          auto deliver,
          db_.Prepare("UPDATE tasks SET delivered = 1, lease_deadline_ms = ? WHERE id = ?"));
      RETURN_IF_ERROR(deliver.Bind(1, now + options_.lease_timeout_ms).Bind(2, task_id).Run());
    } else {
      // 2. The oldest job's next pending harvest / merge / analyze task.
      ASSIGN_OR_RETURN(
          auto next,
          db_.Prepare("SELECT t.id, t.kind, t.job_id FROM tasks t JOIN jobs j ON j.id = t.job_id "
                      "WHERE t.state = 'pending' AND t.kind != 3 AND j.state IN (1, 2, 3, 4) "
                      "ORDER BY j.create_ms, j.id, t.kind, t.ordinal"));
      while (true) {
        ASSIGN_OR_RETURN(bool row, next.Step());
        if (!row) break;
        if (!accepts(static_cast<v1::TaskKind>(next.Int(1)))) continue;
        task_id = next.Text(0);
        break;
      }
      if (task_id.empty()) return absl::OkStatus();
      ASSIGN_OR_RETURN(auto lease, db_.Prepare("UPDATE tasks SET state = 'leased', worker_id = ?, "
                                               "delivered = 1, lease_deadline_ms = ?, "
                                               "attempt = attempt + 1, progress_done = 0, "
                                               "progress_rate = 0, update_ms = ? WHERE id = ?"));
      RETURN_IF_ERROR(lease.Bind(1, request.worker_id())
                          .Bind(2, now + options_.lease_timeout_ms)
                          .Bind(3, now)
                          .Bind(4, task_id)
                          .Run());
    }
    ASSIGN_OR_RETURN(v1::Task task, BuildTask(task_id));
    ASSIGN_OR_RETURN(v1::JobState state, JobStateOf(db_, task.job_id()));
    if (state == v1::JOB_STATE_QUEUED) {
      RETURN_IF_ERROR(SetJobState(pending, task.job_id(), v1::JOB_STATE_HARVESTING,
                                  "first harvest task leased"));
    }
    ASSIGN_OR_RETURN(auto worker, db_.Prepare("SELECT name FROM workers WHERE id = ?"));
    ASSIGN_OR_RETURN(bool has_worker, worker.Bind(1, request.worker_id()).Step());
    std::string worker_name = has_worker ? worker.Text(0) : request.worker_id();
    RETURN_IF_ERROR(
        AppendEvent(pending, task.job_id(),
                    MessageEvent(v1::SEVERITY_INFO,
                                 absl::StrCat(TaskLabel(task), " (attempt ", task.attempt(),
                                              ") started on worker ", worker_name),
                                 task.task_id(), request.worker_id())));
    v1::LeaseTaskResponse response;
    *response.mutable_task() = std::move(task);
    response.set_lease_deadline_unix_ms(now + options_.lease_timeout_ms);
    result = std::move(response);
    return absl::OkStatus();
  }));
  return result;
}

absl::Status Scheduler::UpdateJobProgress(Pending& pending, const std::string& job_id,
                                          const v1::Task& task, const v1::JobProgress& reported) {
  v1::JobProgress progress = reported;
  switch (task.kind()) {
    case v1::TASK_KIND_HARVEST: {
      // The job's harvest progress sums its parts: finished parts count whole, running ones as
      // reported.
      ASSIGN_OR_RETURN(auto sums, db_.Prepare("SELECT state, params, progress_done, progress_rate "
                                              "FROM tasks WHERE job_id = ? AND kind = 1"));
      sums.Bind(1, job_id);
      int64_t done = 0;
      double rate = 0;
      while (true) {
        ASSIGN_OR_RETURN(bool row, sums.Step());
        if (!row) break;
        if (sums.Text(0) == "done") {
          v1::Task part;
          part.ParseFromString(sums.Blob(1));
          done += part.harvest().token_end() - part.harvest().token_begin();
        } else if (sums.Text(0) == "leased") {
          done += sums.Int(2);
          rate += sums.Double(3);
        }
      }
      progress.set_phase("harvest");
      progress.set_unit("tokens");
      progress.set_done(done);
      progress.set_total(task.spec().harvest().max_tokens());
      progress.set_rate(rate);
      progress.set_eta_seconds(rate > 0 ? std::max<double>(0, progress.total() - done) / rate : -1);
      break;
    }
    case v1::TASK_KIND_TRAIN:
      // Ranks train in lock step; rank 0 speaks for the gang.
      if (task.train().rendezvous().rank() != 0) return absl::OkStatus();
      progress.set_phase("train");
      if (progress.unit().empty()) progress.set_unit("steps");
      break;
    default:
      progress.set_phase(TaskKindName(task.kind()));
      break;
  }
  ASSIGN_OR_RETURN(auto store, db_.Prepare("UPDATE jobs SET progress = ? WHERE id = ?"));
  RETURN_IF_ERROR(store.BindBlob(1, progress.SerializeAsString()).Bind(2, job_id).Run());
  v1::JobEvent event;
  *event.mutable_progress() = std::move(progress);
  return AppendEvent(pending, job_id, std::move(event));
}

absl::StatusOr<v1::ReportProgressResponse> Scheduler::ReportProgress(
    const v1::ReportProgressRequest& request) {
  v1::ReportProgressResponse response;
  RETURN_IF_ERROR(InTransaction([&](Pending& pending) -> absl::Status {
    int64_t now = NowUnixMs();
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), now));
    absl::StatusOr<TaskRow> row = LoadLeasedTask(db_, request.task_id(), request.worker_id());
    if (absl::IsFailedPrecondition(row.status())) {
      response.set_cancel(true);  // the worker learns here that it must stop
      return absl::OkStatus();
    }
    if (!row.ok()) return row.status();
    ASSIGN_OR_RETURN(
        auto update,
        db_.Prepare("UPDATE tasks SET progress_done = ?, progress_rate = ?, "
                    "lease_deadline_ms = ?, delivered = 1, update_ms = ? WHERE id = ?"));
    RETURN_IF_ERROR(update.Bind(1, request.progress().done())
                        .BindDouble(2, request.progress().rate())
                        .Bind(3, now + options_.lease_timeout_ms)
                        .Bind(4, now)
                        .Bind(5, request.task_id())
                        .Run());
    ASSIGN_OR_RETURN(v1::Task task, BuildTask(request.task_id()));
    for (const auto& message : request.messages()) {
      RETURN_IF_ERROR(AppendEvent(
          pending, row->job_id,
          MessageEvent(message.severity() == v1::SEVERITY_UNSPECIFIED ? v1::SEVERITY_INFO
                                                                      : message.severity(),
                       message.text(), request.task_id(), request.worker_id())));
    }
    if (request.has_progress())
      RETURN_IF_ERROR(UpdateJobProgress(pending, row->job_id, task, request.progress()));
    return absl::OkStatus();
  }));
  return response;
}

absl::Status Scheduler::FailJob(Pending& pending, const std::string& job_id,
                                const std::string& error) {
  RETURN_IF_ERROR(AppendEvent(pending, job_id, MessageEvent(v1::SEVERITY_ERROR, error, "", "")));
  return SetJobState(pending, job_id, v1::JOB_STATE_FAILED, error);
}

absl::Status Scheduler::RequeueTask(Pending& pending, const std::string& task_id,
                                    const std::string& why, bool count_attempt) {
  ASSIGN_OR_RETURN(TaskRow task, LoadTaskRow(db_, task_id));
  if (task.state != "leased") return absl::OkStatus();
  ASSIGN_OR_RETURN(v1::JobState state, JobStateOf(db_, task.job_id));
  if (IsTerminal(state)) return absl::OkStatus();
  std::string label = TaskLabel(task.params);
  if (count_attempt && task.attempt >= options_.max_task_attempts) {
    return FailJob(pending, task.job_id,
                   absl::StrCat(label, " failed ", task.attempt, " times; last: ", why));
  }
  int64_t now = NowUnixMs();
  if (task.kind == v1::TASK_KIND_TRAIN) {
    // A lost rank breaks the collective: the whole gang restarts under a new generation (the
    // workers of the other ranks are told to stop at their next heartbeat) and resumes from the
    // last checkpoint.
    // The ranks get new task ids, so a worker still running a rank of the old gang (and
    // heart-beating its id) is told to stop even when the new gang puts the same rank on it again.
    ASSIGN_OR_RETURN(auto ranks,
                     db_.Prepare("SELECT id, ordinal, attempt, params FROM tasks "
                                 "WHERE job_id = ? AND kind = 3 AND state != 'cancelled'"));
    ranks.Bind(1, task.job_id);
    struct OldRank {
      std::string id;
      int ordinal;
      int attempt;
      v1::Task params;
    };
    std::vector<OldRank> old_ranks;
    while (true) {
      ASSIGN_OR_RETURN(bool row, ranks.Step());
      if (!row) break;
      OldRank rank{
          ranks.Text(0), static_cast<int>(ranks.Int(1)), static_cast<int>(ranks.Int(2)), {}};
      rank.params.ParseFromString(ranks.Blob(3));
      old_ranks.push_back(std::move(rank));
    }
    for (auto& rank : old_ranks) {
      ASSIGN_OR_RETURN(auto cancel,
                       db_.Prepare("UPDATE tasks SET state = 'cancelled', update_ms = ? "
                                   "WHERE id = ?"));
      RETURN_IF_ERROR(cancel.Bind(1, now).Bind(2, rank.id).Run());
      rank.params.clear_task_id();
      RETURN_IF_ERROR(
          InsertTask(task.job_id, v1::TASK_KIND_TRAIN, rank.ordinal, rank.params, rank.attempt));
    }
    ASSIGN_OR_RETURN(auto generation,
                     db_.Prepare("UPDATE jobs SET train_generation = train_generation + 1 "
                                 "WHERE id = ?"));
    RETURN_IF_ERROR(generation.Bind(1, task.job_id).Run());
    return AppendEvent(
        pending, task.job_id,
        MessageEvent(
            v1::SEVERITY_WARNING,
            absl::StrCat(label, ": ", why, "; the training gang restarts from its last checkpoint"),
            task_id, task.worker_id));
  }
  ASSIGN_OR_RETURN(
      auto requeue,
      db_.Prepare("UPDATE tasks SET state = 'pending', worker_id = NULL, delivered = 0, "
                  "lease_deadline_ms = 0, progress_done = 0, progress_rate = 0, "
                  "update_ms = ? WHERE id = ?"));
  RETURN_IF_ERROR(requeue.Bind(1, now).Bind(2, task_id).Run());
  return AppendEvent(
      pending, task.job_id,
      MessageEvent(v1::SEVERITY_WARNING, absl::StrCat(label, ": ", why, "; re-queued"), task_id,
                   task.worker_id));
}

absl::Status Scheduler::AdvanceJob(Pending& pending, const std::string& job_id) {
  ASSIGN_OR_RETURN(v1::JobState state, JobStateOf(db_, job_id));
  if (IsTerminal(state)) return absl::OkStatus();
  // Per kind: tasks in total and done.
  std::map<int, std::pair<int64_t, int64_t>> counts;
  ASSIGN_OR_RETURN(auto select,
                   db_.Prepare("SELECT kind, COUNT(*), SUM(state = 'done') FROM tasks "
                               "WHERE job_id = ? AND state != 'cancelled' GROUP BY kind"));
  select.Bind(1, job_id);
  while (true) {
    ASSIGN_OR_RETURN(bool row, select.Step());
    if (!row) break;
    counts[static_cast<int>(select.Int(0))] = {select.Int(1), select.Int(2)};
  }
  auto all_done = [&](v1::TaskKind kind) {
    auto it = counts.find(kind);
    return it != counts.end() && it->second.first > 0 && it->second.first == it->second.second;
  };
  auto exists = [&](v1::TaskKind kind) { return counts.count(kind) > 0; };
  ASSIGN_OR_RETURN(auto job_row, db_.Prepare("SELECT spec, job_dir FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool found, job_row.Bind(1, job_id).Step());
  if (!found) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  v1::JobSpec spec;
  spec.ParseFromString(job_row.Blob(0));
  const std::string job_dir = job_row.Text(1);
  const std::string store_dir = JoinPath(job_dir, "activations");
  const std::string crosscoder_dir = JoinPath(job_dir, "crosscoder");

  if (all_done(v1::TASK_KIND_ANALYZE)) {
    return SetJobState(pending, job_id, v1::JOB_STATE_SUCCEEDED, "report written");
  }
  if (all_done(v1::TASK_KIND_TRAIN) && !exists(v1::TASK_KIND_ANALYZE)) {
    RETURN_IF_ERROR(SetJobState(pending, job_id, v1::JOB_STATE_ANALYZING, "training finished"));
    v1::Task task;
    auto* analyze = task.mutable_analyze();
    analyze->set_crosscoder_dir(crosscoder_dir);
    analyze->set_activations_dir(store_dir);
    analyze->set_output_dir(JoinPath(job_dir, "report"));
    return InsertTask(job_id, v1::TASK_KIND_ANALYZE, 0, task);
  }
  if (all_done(v1::TASK_KIND_MERGE) && !exists(v1::TASK_KIND_TRAIN)) {
    RETURN_IF_ERROR(
        SetJobState(pending, job_id, v1::JOB_STATE_TRAINING, "activation store complete"));
    for (int rank = 0; rank < spec.workers(); ++rank) {
      v1::Task task;
      auto* train = task.mutable_train();
      train->set_activations_dir(store_dir);
      train->set_output_dir(crosscoder_dir);
      train->mutable_rendezvous()->set_rank(rank);
      train->mutable_rendezvous()->set_world_size(spec.workers());
      RETURN_IF_ERROR(InsertTask(job_id, v1::TASK_KIND_TRAIN, rank, task));
    }
    RETURN_IF_ERROR(
        AppendEvent(pending, job_id,
                    MessageEvent(v1::SEVERITY_INFO,
                                 absl::StrCat("training waits for ", spec.workers(),
                                              " idle workers to start all ranks together"),
                                 "", "")));
    return ScheduleGangs(pending, NowUnixMs());
  }
  if (all_done(v1::TASK_KIND_HARVEST) && !exists(v1::TASK_KIND_MERGE)) {
    v1::Task task;
    auto* merge = task.mutable_merge();
    ASSIGN_OR_RETURN(
        auto parts,
        db_.Prepare("SELECT params FROM tasks WHERE job_id = ? AND kind = 1 ORDER BY ordinal"));
    parts.Bind(1, job_id);
    while (true) {
      ASSIGN_OR_RETURN(bool row, parts.Step());
      if (!row) break;
      v1::Task part;
      part.ParseFromString(parts.Blob(0));
      merge->add_part_dirs(part.harvest().output_dir());
    }
    merge->set_output_dir(store_dir);
    RETURN_IF_ERROR(AppendEvent(pending, job_id,
                                MessageEvent(v1::SEVERITY_INFO,
                                             absl::StrCat("all ", merge->part_dirs_size(),
                                                          " harvest parts done; merging them"),
                                             "", "")));
    return InsertTask(job_id, v1::TASK_KIND_MERGE, 0, task);
  }
  return absl::OkStatus();
}

absl::Status Scheduler::CompleteTask(const v1::CompleteTaskRequest& request) {
  return InTransaction([&](Pending& pending) -> absl::Status {
    int64_t now = NowUnixMs();
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), now));
    ASSIGN_OR_RETURN(TaskRow task, LoadLeasedTask(db_, request.task_id(), request.worker_id()));
    ASSIGN_OR_RETURN(auto done,
                     db_.Prepare("UPDATE tasks SET state = 'done', result = ?, update_ms = ?, "
                                 "lease_deadline_ms = 0 WHERE id = ?"));
    RETURN_IF_ERROR(
        done.BindBlob(1, request.result().SerializeAsString()).Bind(2, now).Bind(3, task.id).Run());
    if (task.kind == v1::TASK_KIND_HARVEST) {
      ASSIGN_OR_RETURN(v1::Task built, BuildTask(task.id));
      RETURN_IF_ERROR(UpdateJobProgress(pending, task.job_id, built, v1::JobProgress()));
    }
    if (task.kind == v1::TASK_KIND_TRAIN && request.result().has_metrics()) {
      v1::JobEvent event;
      auto* progress = event.mutable_progress();
      progress->set_phase("train");
      progress->set_unit("steps");
      progress->set_done(request.result().metrics().step());
      progress->set_total(request.result().metrics().step());
      *progress->mutable_metrics() = request.result().metrics();
      RETURN_IF_ERROR(AppendEvent(pending, task.job_id, std::move(event)));
    }
    RETURN_IF_ERROR(
        AppendEvent(pending, task.job_id,
                    MessageEvent(v1::SEVERITY_INFO, absl::StrCat(TaskLabel(task.params), " done"),
                                 task.id, request.worker_id())));
    return AdvanceJob(pending, task.job_id);
  });
}

absl::Status Scheduler::FailTask(const v1::FailTaskRequest& request) {
  return InTransaction([&](Pending& pending) -> absl::Status {
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), NowUnixMs()));
    ASSIGN_OR_RETURN(TaskRow task, LoadLeasedTask(db_, request.task_id(), request.worker_id()));
    ASSIGN_OR_RETURN(auto note, db_.Prepare("UPDATE tasks SET error = ? WHERE id = ?"));
    RETURN_IF_ERROR(note.Bind(1, request.error()).Bind(2, task.id).Run());
    std::string what =
        absl::StrCat("failed on worker ", request.worker_id(), ": ", request.error());
    if (!request.retryable()) {
      return FailJob(pending, task.job_id, absl::StrCat(TaskLabel(task.params), " ", what));
    }
    return RequeueTask(pending, task.id, what, true);
  });
}

absl::Status Scheduler::PublishRendezvous(const v1::PublishRendezvousRequest& request) {
  if (request.port() <= 0 || request.port() > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("port: must be between 1 and 65535, got ", request.port()));
  }
  return InTransaction([&](Pending& pending) -> absl::Status {
    RETURN_IF_ERROR(CheckWorker(request.worker_id(), NowUnixMs()));
    ASSIGN_OR_RETURN(TaskRow task, LoadLeasedTask(db_, request.task_id(), request.worker_id()));
    pending.wake = true;  // ranks waiting in GetRendezvous
    if (task.kind != v1::TASK_KIND_TRAIN || task.ordinal != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("task ", task.id, " is not rank 0 of a training gang"));
    }
    ASSIGN_OR_RETURN(
        auto update,
        db_.Prepare("UPDATE tasks SET rdv_host = CASE WHEN ? != '' THEN ? ELSE rdv_host END, "
                    "rdv_port = ? WHERE id = ?"));
    return update.Bind(1, request.host())
        .Bind(2, request.host())
        .Bind(3, int64_t{request.port()})
        .Bind(4, task.id)
        .Run();
  });
}

absl::StatusOr<v1::GetRendezvousResponse> Scheduler::GetRendezvous(
    const v1::GetRendezvousRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(TaskRow task, LoadLeasedTask(db_, request.task_id(), request.worker_id()));
  if (task.kind != v1::TASK_KIND_TRAIN) {
    return absl::FailedPreconditionError(absl::StrCat("task ", task.id, " is not a training task"));
  }
  ASSIGN_OR_RETURN(v1::Task built, BuildTask(task.id));
  v1::GetRendezvousResponse response;
  const auto& rdv = built.train().rendezvous();
  response.set_ready(rdv.port() > 0);
  response.set_host(rdv.host());
  response.set_port(rdv.port());
  response.set_world_size(rdv.world_size());
  response.set_generation(rdv.generation());
  return response;
}

absl::Status Scheduler::Tick() {
  return InTransaction([&](Pending& pending) -> absl::Status {
    int64_t now = NowUnixMs();
    ASSIGN_OR_RETURN(auto dead,
                     db_.Prepare("UPDATE workers SET state = 'dead' WHERE state = 'alive' "
                                 "AND last_heartbeat_ms < ?"));
    RETURN_IF_ERROR(dead.Bind(1, now - options_.lease_timeout_ms).Run());
    ASSIGN_OR_RETURN(auto expired,
                     db_.Prepare("SELECT t.id, COALESCE(w.name, t.worker_id) FROM tasks t "
                                 "LEFT JOIN workers w ON w.id = t.worker_id "
                                 "WHERE t.state = 'leased' AND t.lease_deadline_ms < ?"));
    expired.Bind(1, now);
    std::vector<std::pair<std::string, std::string>> lost;
    while (true) {
      ASSIGN_OR_RETURN(bool row, expired.Step());
      if (!row) break;
      lost.emplace_back(expired.Text(0), expired.Text(1));
    }
    for (const auto& [task_id, worker] : lost) {
      RETURN_IF_ERROR(RequeueTask(
          pending, task_id,
          absl::StrCat("lease expired: worker ", worker, " stopped heart-beating"), true));
    }
    return ScheduleGangs(pending, now);
  });
}

}  // namespace crossdiff::server
