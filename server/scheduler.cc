#include "server/scheduler.h"

#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"

namespace crossdiff::server {
namespace {

using google::protobuf::util::TimeUtil;

constexpr int kSchemaVersion = 1;

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS meta(
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
  id TEXT PRIMARY KEY,
  team TEXT NOT NULL,
  request_id TEXT NOT NULL DEFAULT '',
  spec BLOB NOT NULL,
  inputs BLOB NOT NULL,
  state INTEGER NOT NULL,
  error TEXT NOT NULL DEFAULT '',
  job_dir TEXT NOT NULL,
  progress BLOB,
  create_ms INTEGER NOT NULL,
  update_ms INTEGER NOT NULL,
  finish_ms INTEGER NOT NULL DEFAULT 0,
  last_sequence INTEGER NOT NULL DEFAULT 0,
  train_generation INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_by_team ON jobs(team, create_ms);
CREATE TABLE IF NOT EXISTS tasks(
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL REFERENCES jobs(id),
  kind INTEGER NOT NULL,
  ordinal INTEGER NOT NULL,
  state TEXT NOT NULL,
  attempt INTEGER NOT NULL DEFAULT 0,
  params BLOB NOT NULL,
  worker_id TEXT,
  delivered INTEGER NOT NULL DEFAULT 0,
  lease_deadline_ms INTEGER NOT NULL DEFAULT 0,
  progress_done INTEGER NOT NULL DEFAULT 0,
  progress_rate REAL NOT NULL DEFAULT 0,
  rdv_host TEXT NOT NULL DEFAULT '',
  rdv_port INTEGER NOT NULL DEFAULT 0,
  result BLOB,
  error TEXT NOT NULL DEFAULT '',
  update_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks(job_id, kind, ordinal);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, lease_deadline_ms);
CREATE INDEX IF NOT EXISTS tasks_by_worker ON tasks(worker_id, state);
CREATE TABLE IF NOT EXISTS events(
  job_id TEXT NOT NULL,
  sequence INTEGER NOT NULL,
  time_ms INTEGER NOT NULL,
  event BLOB NOT NULL,
  PRIMARY KEY(job_id, sequence)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers(
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  info BLOB NOT NULL,
  state TEXT NOT NULL,
  register_ms INTEGER NOT NULL,
  last_heartbeat_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS workers_by_name ON workers(name, state);
)sql";

std::string JoinPath(const std::string& a, const std::string& b) {
  if (a.empty() || a.back() == '/') return a + b;
  return a + "/" + b;
}

google::protobuf::Timestamp MsToTimestamp(int64_t ms) {
  return TimeUtil::MillisecondsToTimestamp(ms);
}

template <typename Message>
absl::StatusOr<Message> ParseBlob(const std::string& bytes, const char* what) {
  Message message;
  if (!message.ParseFromString(bytes)) {
    return absl::DataLossError(absl::StrCat("job database: corrupt ", what, " record"));
  }
  return message;
}

}  // namespace

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

const char* TaskKindName(v1::TaskKind kind) {
  switch (kind) {
    case v1::TASK_KIND_HARVEST:
      return "harvest";
    case v1::TASK_KIND_MERGE:
      return "merge";
    case v1::TASK_KIND_TRAIN:
      return "train";
    case v1::TASK_KIND_ANALYZE:
      return "analyze";
    default:
      return "unknown";
  }
}

Scheduler::Scheduler(SchedulerOptions options, SqliteDb db)
    : options_(std::move(options)), db_(std::move(db)), rng_(std::random_device{}()) {}

Scheduler::~Scheduler() = default;

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Open(SchedulerOptions options) {
  ASSIGN_OR_RETURN(SqliteDb db, SqliteDb::Open(options.database_path));
  std::unique_ptr<Scheduler> scheduler(new Scheduler(std::move(options), std::move(db)));
  RETURN_IF_ERROR(scheduler->CreateSchema());
  RETURN_IF_ERROR(scheduler->Recover());
  return scheduler;
}

absl::Status Scheduler::CreateSchema() {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(db_.Exec(kSchema));
  ASSIGN_OR_RETURN(auto select, db_.Prepare("SELECT value FROM meta WHERE key='schema_version'"));
  ASSIGN_OR_RETURN(bool row, select.Step());
  if (!row) {
    ASSIGN_OR_RETURN(auto insert,
                     db_.Prepare("INSERT INTO meta(key, value) VALUES('schema_version', ?)"));
    return insert.Bind(1, std::to_string(kSchemaVersion)).Run();
  }
  if (select.Text(0) != std::to_string(kSchemaVersion)) {
    return absl::FailedPreconditionError(
        absl::StrCat(options_.database_path, ": schema version ", select.Text(0),
                     " is not supported (expected ", kSchemaVersion, ")"));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::Recover() {
  // Whatever happened while the coordinator was down, workers get one lease timeout to show up
  // again.
  return InTransaction([&](Pending&) -> absl::Status {
    int64_t grace = NowUnixMs() + options_.lease_timeout_ms;
    ASSIGN_OR_RETURN(auto leases,
                     db_.Prepare("UPDATE tasks SET lease_deadline_ms = MAX(lease_deadline_ms, ?) "
                                 "WHERE state = 'leased'"));
    RETURN_IF_ERROR(leases.Bind(1, grace).Run());
    ASSIGN_OR_RETURN(auto workers,
                     db_.Prepare("UPDATE workers SET last_heartbeat_ms = MAX(last_heartbeat_ms, ?) "
                                 "WHERE state = 'alive'"));
    return workers.Bind(1, NowUnixMs()).Run();
  });
}

absl::Status Scheduler::InTransaction(const std::function<absl::Status(Pending&)>& body) {
  Pending pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    SqliteTransaction txn(db_);
    RETURN_IF_ERROR(txn.begin_status());
    RETURN_IF_ERROR(body(pending));
    RETURN_IF_ERROR(txn.Commit());
  }
  if (!pending.events.empty() && listener_) listener_(pending.events);
  if (pending.wake || !pending.events.empty()) {
    std::lock_guard<std::mutex> lock(change_mu_);
    ++version_;
    change_cv_.notify_all();
  }
  return absl::OkStatus();
}

bool Scheduler::WaitForChange(uint64_t* version, int timeout_ms) {
  std::unique_lock<std::mutex> lock(change_mu_);
  bool changed = change_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                                     [&] { return shutdown_ || version_ != *version; });
  *version = version_;
  return changed && !shutdown_;
}

uint64_t Scheduler::version() {
  std::lock_guard<std::mutex> lock(change_mu_);
  return version_;
}

void Scheduler::Shutdown() {
  std::lock_guard<std::mutex> lock(change_mu_);
  shutdown_ = true;
  change_cv_.notify_all();
}

bool Scheduler::shutting_down() {
  std::lock_guard<std::mutex> lock(change_mu_);
  return shutdown_;
}

std::string Scheduler::NewId(const char* prefix) {
  return absl::StrFormat("%s%016x", prefix, rng_());
}

absl::Status Scheduler::AppendEvent(Pending& pending, const std::string& job_id,
                                    v1::JobEvent event) {
  ASSIGN_OR_RETURN(auto select, db_.Prepare("SELECT state, last_sequence FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, job_id).Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  auto state = static_cast<v1::JobState>(select.Int(0));
  int64_t sequence = select.Int(1) + 1;
  // The terminal phase change is a job's last event: nothing may follow it (late worker reports).
  if (IsTerminal(state) && !(event.has_phase_change() && event.phase_change().to() == state)) {
    return absl::OkStatus();
  }
  int64_t now = NowUnixMs();
  event.set_job_id(job_id);
  event.set_sequence(sequence);
  event.set_state(state);
  *event.mutable_time() = MsToTimestamp(now);
  ASSIGN_OR_RETURN(
      auto insert,
      db_.Prepare("INSERT INTO events(job_id, sequence, time_ms, event) VALUES(?,?,?,?)"));
  RETURN_IF_ERROR(insert.Bind(1, job_id)
                      .Bind(2, sequence)
                      .Bind(3, now)
                      .BindBlob(4, event.SerializeAsString())
                      .Run());
  ASSIGN_OR_RETURN(auto update,
                   db_.Prepare("UPDATE jobs SET last_sequence = ?, update_ms = ? WHERE id = ?"));
  RETURN_IF_ERROR(update.Bind(1, sequence).Bind(2, now).Bind(3, job_id).Run());
  pending.events.push_back(std::move(event));
  return absl::OkStatus();
}

absl::Status Scheduler::SetJobState(Pending& pending, const std::string& job_id, v1::JobState to,
                                    const std::string& reason) {
  ASSIGN_OR_RETURN(auto select, db_.Prepare("SELECT state FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, job_id).Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  auto from = static_cast<v1::JobState>(select.Int(0));
  if (from == to || IsTerminal(from)) return absl::OkStatus();
  int64_t now = NowUnixMs();
  ASSIGN_OR_RETURN(auto update,
                   db_.Prepare("UPDATE jobs SET state = ?, update_ms = ?, finish_ms = ?, "
                               "error = CASE WHEN ? != '' THEN ? ELSE error END WHERE id = ?"));
  bool failed = to == v1::JOB_STATE_FAILED || to == v1::JOB_STATE_CANCELLED;
  std::string error = failed ? reason : "";
  RETURN_IF_ERROR(update.Bind(1, static_cast<int64_t>(to))
                      .Bind(2, now)
                      .Bind(3, IsTerminal(to) ? now : int64_t{0})
                      .Bind(4, error)
                      .Bind(5, error)
                      .Bind(6, job_id)
                      .Run());
  if (IsTerminal(to)) {
    ASSIGN_OR_RETURN(auto cancel,
                     db_.Prepare("UPDATE tasks SET state = 'cancelled', update_ms = ? "
                                 "WHERE job_id = ? AND state IN ('pending', 'leased')"));
    RETURN_IF_ERROR(cancel.Bind(1, now).Bind(2, job_id).Run());
  }
  v1::JobEvent event;
  event.mutable_phase_change()->set_from(from);
  event.mutable_phase_change()->set_to(to);
  event.mutable_phase_change()->set_reason(reason);
  return AppendEvent(pending, job_id, std::move(event));
}

absl::StatusOr<v1::Job> Scheduler::LoadJob(const std::string& job_id) {
  ASSIGN_OR_RETURN(
      auto select,
      db_.Prepare("SELECT id, team, spec, state, error, job_dir, progress, create_ms, update_ms, "
                  "finish_ms, last_sequence FROM jobs WHERE id = ?"));
  ASSIGN_OR_RETURN(bool row, select.Bind(1, job_id).Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  v1::Job job;
  job.set_id(select.Text(0));
  job.set_team(select.Text(1));
  ASSIGN_OR_RETURN(*job.mutable_spec(), ParseBlob<v1::JobSpec>(select.Blob(2), "job spec"));
  job.set_state(static_cast<v1::JobState>(select.Int(3)));
  job.set_error(select.Text(4));
  std::string job_dir = select.Text(5);
  if (!select.IsNull(6)) {
    ASSIGN_OR_RETURN(*job.mutable_progress(),
                     ParseBlob<v1::JobProgress>(select.Blob(6), "job progress"));
  }
  *job.mutable_create_time() = MsToTimestamp(select.Int(7));
  *job.mutable_update_time() = MsToTimestamp(select.Int(8));
  if (select.Int(9) > 0) *job.mutable_finish_time() = MsToTimestamp(select.Int(9));
  job.set_last_event_sequence(select.Int(10));
  auto* outputs = job.mutable_outputs();
  outputs->set_job_dir(job_dir);
  outputs->set_activations_dir(JoinPath(job_dir, "activations"));
  outputs->set_crosscoder_dir(JoinPath(job_dir, "crosscoder"));
  outputs->set_report_dir(JoinPath(job_dir, "report"));
  ASSIGN_OR_RETURN(
      auto counts,
      db_.Prepare("SELECT state, COUNT(*) FROM tasks WHERE job_id = ? GROUP BY state"));
  counts.Bind(1, job_id);
  while (true) {
    ASSIGN_OR_RETURN(bool more, counts.Step());
    if (!more) break;
    (*job.mutable_task_counts())[counts.Text(0)] = static_cast<int32_t>(counts.Int(1));
  }
  return job;
}

absl::StatusOr<v1::Job> Scheduler::LoadJobForTeam(const std::string& team,
                                                  const std::string& job_id) {
  absl::StatusOr<v1::Job> job = LoadJob(job_id);
  // Another team's job is reported exactly like a missing one, so ids cannot be probed.
  if (job.ok() && job->team() != team)
    return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return job;
}

absl::Status Scheduler::InsertTask(const std::string& job_id, v1::TaskKind kind, int ordinal,
                                   const v1::Task& params, int attempt) {
  v1::Task task = params;
  if (task.task_id().empty()) task.set_task_id(NewId("t-"));
  task.set_job_id(job_id);
  task.set_kind(kind);
  ASSIGN_OR_RETURN(
      auto insert,
      db_.Prepare("INSERT INTO tasks(id, job_id, kind, ordinal, state, params, update_ms, attempt) "
                  "VALUES(?,?,?,?,'pending',?,?,?)"));
  return insert.Bind(1, task.task_id())
      .Bind(2, job_id)
      .Bind(3, static_cast<int64_t>(kind))
      .Bind(4, static_cast<int64_t>(ordinal))
      .BindBlob(5, task.SerializeAsString())
      .Bind(6, NowUnixMs())
      .Bind(7, static_cast<int64_t>(attempt))
      .Run();
}

absl::Status Scheduler::CreateHarvestTasks(const std::string& job_id, const v1::JobSpec& spec,
                                           const std::string& job_dir) {
  const int64_t seq_len = spec.harvest().seq_len();
  const int64_t max_tokens = spec.harvest().max_tokens();
  const int64_t sequences = (max_tokens + seq_len - 1) / seq_len;
  int64_t parts = spec.harvest().tasks() > 0 ? spec.harvest().tasks() : 2 * int64_t{spec.workers()};
  parts = std::max<int64_t>(1, std::min(parts, sequences));
  for (int64_t i = 0; i < parts; ++i) {
    v1::Task task;
    auto* h = task.mutable_harvest();
    // The same tiling as core/data/sequence_range.h RankRange: [total*i/W, total*(i+1)/W).
    h->set_sequence_begin(sequences * i / parts);
    h->set_sequence_end(sequences * (i + 1) / parts);
    h->set_token_begin(h->sequence_begin() * seq_len);
    h->set_token_end(std::min(h->sequence_end() * seq_len, max_tokens));
    h->set_part_index(static_cast<int32_t>(i));
    h->set_part_count(static_cast<int32_t>(parts));
    h->set_output_dir(JoinPath(job_dir, absl::StrFormat("harvest/part-%05d", i)));
    RETURN_IF_ERROR(InsertTask(job_id, v1::TASK_KIND_HARVEST, static_cast<int>(i), task));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> Scheduler::SubmitJob(const std::string& team, const v1::JobSpec& spec,
                                             const v1::ResolvedInputs& inputs,
                                             const std::string& request_id) {
  std::string job_id;
  RETURN_IF_ERROR(InTransaction([&](Pending& pending) -> absl::Status {
    if (!request_id.empty()) {
      ASSIGN_OR_RETURN(auto existing,
                       db_.Prepare("SELECT id FROM jobs WHERE team = ? AND request_id = ?"));
      ASSIGN_OR_RETURN(bool row, existing.Bind(1, team).Bind(2, request_id).Step());
      if (row) {
        job_id = existing.Text(0);
        return absl::OkStatus();
      }
    }
    ASSIGN_OR_RETURN(
        auto active,
        db_.Prepare("SELECT COUNT(*) FROM jobs WHERE team = ? AND state IN (1, 2, 3, 4)"));
    ASSIGN_OR_RETURN(bool row, active.Bind(1, team).Step());
    if (row && active.Int(0) >= options_.max_active_jobs_per_team) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "team ", team, " already has ", active.Int(0), " unfinished jobs (limit ",
          options_.max_active_jobs_per_team, "): wait for one to finish or cancel one"));
    }
    job_id = NewId("j-");
    std::string job_dir = JoinPath(options_.storage_root, job_id);
    int64_t now = NowUnixMs();
    ASSIGN_OR_RETURN(
        auto insert,
        db_.Prepare(
            "INSERT INTO jobs(id, team, request_id, spec, inputs, state, job_dir, create_ms, "
            "update_ms) VALUES(?,?,?,?,?,?,?,?,?)"));
    RETURN_IF_ERROR(insert.Bind(1, job_id)
                        .Bind(2, team)
                        .Bind(3, request_id)
                        .BindBlob(4, spec.SerializeAsString())
                        .BindBlob(5, inputs.SerializeAsString())
                        .Bind(6, static_cast<int64_t>(v1::JOB_STATE_QUEUED))
                        .Bind(7, job_dir)
                        .Bind(8, now)
                        .Bind(9, now)
                        .Run());
    RETURN_IF_ERROR(CreateHarvestTasks(job_id, spec, job_dir));
    v1::JobEvent event;
    event.mutable_phase_change()->set_from(v1::JOB_STATE_UNSPECIFIED);
    event.mutable_phase_change()->set_to(v1::JOB_STATE_QUEUED);
    event.mutable_phase_change()->set_reason(absl::StrCat("submitted by team ", team));
    return AppendEvent(pending, job_id, std::move(event));
  }));
  std::lock_guard<std::mutex> lock(mu_);
  return LoadJob(job_id);
}

absl::StatusOr<v1::Job> Scheduler::GetJob(const std::string& team, const std::string& job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return LoadJobForTeam(team, job_id);
}

absl::StatusOr<v1::ListJobsResponse> Scheduler::ListJobs(const std::string& team,
                                                         const v1::ListJobsRequest& request) {
  int64_t page_size = request.page_size() <= 0 ? 50 : std::min(request.page_size(), 1000);
  int64_t offset = 0;
  if (!request.page_token().empty()) {
    char* end = nullptr;
    offset = std::strtoll(request.page_token().c_str(), &end, 10);
    if (end == nullptr || *end != '\0' || offset < 0) {
      return absl::InvalidArgumentError("page_token: not a token returned by ListJobs");
    }
  }
  std::string sql = "SELECT id FROM jobs WHERE team = ?";
  if (request.states_size() > 0) {
    std::vector<std::string> states;
    for (int s : request.states()) states.push_back(std::to_string(s));
    sql += absl::StrCat(" AND state IN (", absl::StrJoin(states, ","), ")");
  }
  sql += " ORDER BY create_ms DESC, id DESC LIMIT ? OFFSET ?";
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(auto select, db_.Prepare(sql));
  select.Bind(1, team).Bind(2, page_size + 1).Bind(3, offset);
  std::vector<std::string> ids;
  while (true) {
    ASSIGN_OR_RETURN(bool row, select.Step());
    if (!row) break;
    ids.push_back(select.Text(0));
  }
  v1::ListJobsResponse response;
  if (static_cast<int64_t>(ids.size()) > page_size) {
    ids.pop_back();
    response.set_next_page_token(std::to_string(offset + page_size));
  }
  for (const auto& id : ids) {
    ASSIGN_OR_RETURN(*response.add_jobs(), LoadJob(id));
  }
  return response;
}

absl::StatusOr<v1::Job> Scheduler::CancelJob(const std::string& team, const std::string& job_id,
                                             const std::string& reason) {
  RETURN_IF_ERROR(InTransaction([&](Pending& pending) -> absl::Status {
    ASSIGN_OR_RETURN(v1::Job job, LoadJobForTeam(team, job_id));
    if (IsTerminal(job.state())) return absl::OkStatus();
    std::string why = reason.empty() ? absl::StrCat("cancelled by team ", team)
                                     : absl::StrCat("cancelled: ", reason);
    return SetJobState(pending, job_id, v1::JOB_STATE_CANCELLED, why);
  }));
  std::lock_guard<std::mutex> lock(mu_);
  return LoadJob(job_id);
}

absl::StatusOr<std::vector<v1::JobEvent>> Scheduler::ReadEvents(const std::string& job_id,
                                                                int64_t from_sequence, int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(auto select,
                   db_.Prepare("SELECT event FROM events WHERE job_id = ? AND sequence >= ? "
                               "ORDER BY sequence LIMIT ?"));
  select.Bind(1, job_id).Bind(2, from_sequence).Bind(3, static_cast<int64_t>(limit));
  std::vector<v1::JobEvent> events;
  while (true) {
    ASSIGN_OR_RETURN(bool row, select.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(v1::JobEvent event, ParseBlob<v1::JobEvent>(select.Blob(0), "event"));
    events.push_back(std::move(event));
  }
  return events;
}

}  // namespace crossdiff::server
