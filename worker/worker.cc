#include "worker/worker.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "worker/task_command.h"

namespace crossdiff::worker {
namespace fs = std::filesystem;

namespace {

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return std::string(absl::StripAsciiWhitespace(ss.str()));
}

std::string Hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

// A free TCP port on this host (bound and released: the engine binds it again at once).
absl::StatusOr<int> PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return absl::InternalError("bind failed");
  }
  int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

}  // namespace

v1::TrainingMetrics ParseTrainingDetail(const std::string& detail, int64_t step) {
  v1::TrainingMetrics m;
  m.set_step(step);
  std::vector<std::string> words = absl::StrSplit(detail, ' ', absl::SkipEmpty());
  for (size_t i = 0; i + 1 < words.size(); ++i) {
    std::string key = words[i];
    if (!key.empty() && key.back() == '=') key.pop_back();
    const std::string& value = words[i + 1];
    double v = 0;
    if (key == "loss" && absl::SimpleAtod(value, &v)) {
      m.set_loss(v);
    } else if (key == "l0" && absl::SimpleAtod(value, &v)) {
      m.set_l0(v);
    } else if ((key == "dead" || key == "dead_latents") && absl::SimpleAtod(value, &v)) {
      m.set_dead_latents(static_cast<int64_t>(v));
    } else if (key == "fvu") {
      for (absl::string_view part : absl::StrSplit(value, absl::ByAnyChar("/,"))) {
        if (absl::SimpleAtod(part, &v)) m.add_fvu(v);
      }
    }
  }
  return m;
}

Worker::Worker(WorkerOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(WorkerOptions options) {
  if (options.coordinator.empty()) return absl::InvalidArgumentError("--coordinator is required");
  if (options.work_dir.empty()) return absl::InvalidArgumentError("--work-dir is required");
  std::error_code ec;
  fs::create_directories(fs::path(options.work_dir) / "logs", ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--work-dir ", options.work_dir, ": ", ec.message()));
  }
  if (options.name.empty()) options.name = absl::StrCat(Hostname(), "-", getpid());
  if (options.advertise_host.empty()) options.advertise_host = "127.0.0.1";
  if (options.crossdiff_binary.empty()) {
    options.crossdiff_binary = (fs::read_symlink("/proc/self/exe").parent_path() / "crossdiff").string();
  }
  if (!fs::exists(options.crossdiff_binary)) {
    return absl::NotFoundError(
        absl::StrCat("engine binary ", options.crossdiff_binary, " not found (--crossdiff-bin)"));
  }
  std::unique_ptr<Worker> w(new Worker(std::move(options)));
  if (!w->options_.secret_file.empty()) {
    auto secret = ReadSmallFile(w->options_.secret_file);
    if (!secret.ok()) return absl::InvalidArgumentError(absl::StrCat("--secret ", secret.status().message()));
    w->secret_ = *secret;
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (!w->options_.tls_ca.empty() || !w->options_.tls_cert.empty()) {
    grpc::SslCredentialsOptions ssl;
    for (auto [path, field] : {std::pair{w->options_.tls_ca, &ssl.pem_root_certs},
                               std::pair{w->options_.tls_cert, &ssl.pem_cert_chain},
                               std::pair{w->options_.tls_key, &ssl.pem_private_key}}) {
      if (path.empty()) continue;
      auto pem = ReadSmallFile(path);
      if (!pem.ok()) return absl::InvalidArgumentError(pem.status().message());
      *field = *pem + "\n";
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  w->channel_ = grpc::CreateChannel(w->options_.coordinator, creds);
  w->stub_ = v1::WorkerService::NewStub(w->channel_);
  return w;
}

Worker::~Worker() {
  Shutdown();
  if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
}

std::unique_ptr<grpc::ClientContext> Worker::NewContext(int timeout_ms) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (!secret_.empty()) ctx->AddMetadata("authorization", "Bearer " + secret_);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  return ctx;
}

absl::Status Worker::Register() {
  v1::RegisterRequest req;
  auto* info = req.mutable_info();
  info->set_name(options_.name);
  info->set_address(options_.advertise_host);
  info->set_device(options_.device);
  info->set_host_memory_bytes(static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE));
  info->set_cpu_threads(static_cast<int32_t>(std::thread::hardware_concurrency()));
  info->set_version("0.1.0");
  v1::RegisterResponse resp;
  auto ctx = NewContext();
  grpc::Status s = stub_->Register(ctx.get(), req, &resp);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("register with ", options_.coordinator));
  std::lock_guard<std::mutex> lock(mu_);
  worker_id_ = resp.worker_id();
  heartbeat_interval_ms_ = resp.heartbeat_interval_ms() > 0 ? resp.heartbeat_interval_ms() : 2000;
  registered_ = true;
  std::fprintf(stderr, "crossdiff-worker: registered as %s (%s) with %s\n", worker_id_.c_str(),
               options_.name.c_str(), options_.coordinator.c_str());
  return absl::OkStatus();
}

void Worker::Shutdown() {
  shutdown_ = true;
  std::lock_guard<std::mutex> lock(mu_);
  if (running_child_ != nullptr) running_child_->Terminate();
  cv_.notify_all();
}

void Worker::HeartbeatLoop() {
  while (!shutdown_) {
    v1::HeartbeatRequest req;
    int interval;
    {
      std::unique_lock<std::mutex> lock(mu_);
      interval = heartbeat_interval_ms_;
      cv_.wait_for(lock, std::chrono::milliseconds(interval), [&] { return shutdown_.load(); });
      if (shutdown_) return;
      if (!registered_) continue;
      req.set_worker_id(worker_id_);
      if (!running_task_id_.empty()) req.add_running_task_ids(running_task_id_);
    }
    v1::HeartbeatResponse resp;
    auto ctx = NewContext(interval);
    grpc::Status s = stub_->Heartbeat(ctx.get(), req, &resp);
    std::lock_guard<std::mutex> lock(mu_);
    if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
      // Declared dead (missed heartbeats): our tasks were re-queued; abandon them, register again.
      registered_ = false;
      if (running_child_ != nullptr) {
        cancel_requested_ = true;
        running_child_->Terminate();
      }
      continue;
    }
    for (const auto& id : resp.cancel_task_ids()) {
      if (id == running_task_id_ && running_child_ != nullptr) {
        cancel_requested_ = true;
        running_child_->Terminate();
      }
    }
  }
}

absl::Status Worker::Run() {
  heartbeat_thread_ = std::thread([this] { HeartbeatLoop(); });
  int backoff_ms = 200;
  while (!shutdown_) {
    bool registered;
    std::string worker_id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      registered = registered_;
      worker_id = worker_id_;
    }
    if (!registered) {
      absl::Status s = Register();
      if (!s.ok()) {
        if (s.code() == absl::StatusCode::kUnauthenticated ||
            s.code() == absl::StatusCode::kPermissionDenied) {
          return s;  // a wrong secret does not fix itself
        }
        std::fprintf(stderr, "crossdiff-worker: %s (retrying)\n", std::string(s.message()).c_str());
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(backoff_ms), [&] { return shutdown_.load(); });
        backoff_ms = std::min(backoff_ms * 2, 5000);
        continue;
      }
      backoff_ms = 200;
      continue;
    }
    v1::LeaseTaskRequest req;
    req.set_worker_id(worker_id);
    req.set_wait_ms(options_.lease_wait_ms);
    v1::LeaseTaskResponse resp;
    auto ctx = NewContext(options_.lease_wait_ms + 10000);
    grpc::Status s = stub_->LeaseTask(ctx.get(), req, &resp);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        std::lock_guard<std::mutex> lock(mu_);
        registered_ = false;
      } else {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(500), [&] { return shutdown_.load(); });
      }
      continue;
    }
    if (!resp.has_task()) continue;
    RunTask(resp.task());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Worker::Rendezvous(const v1::Task& task) {
  const auto& rv = task.train().rendezvous();
  std::string worker_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    worker_id = worker_id_;
  }
  if (rv.rank() == 0) {
    int port = options_.rendezvous_port;
    if (port == 0) {
      auto picked = PickFreePort();
      if (!picked.ok()) return picked.status();
      port = *picked;
    }
    v1::PublishRendezvousRequest req;
    req.set_worker_id(worker_id);
    req.set_task_id(task.task_id());
    req.set_host(options_.advertise_host);
    req.set_port(port);
    v1::PublishRendezvousResponse resp;
    auto ctx = NewContext();
    grpc::Status s = stub_->PublishRendezvous(ctx.get(), req, &resp);
    if (!s.ok()) return FromGrpc(s, "publish rendezvous");
    return absl::StrCat(options_.advertise_host, ":", port);
  }
  while (!shutdown_) {
    v1::GetRendezvousRequest req;
    req.set_worker_id(worker_id);
    req.set_task_id(task.task_id());
    req.set_wait_ms(5000);
    v1::GetRendezvousResponse resp;
    auto ctx = NewContext(20000);
    grpc::Status s = stub_->GetRendezvous(ctx.get(), req, &resp);
    if (!s.ok()) return FromGrpc(s, "get rendezvous");
    if (resp.ready()) return absl::StrCat(resp.host(), ":", resp.port());
    std::lock_guard<std::mutex> lock(mu_);
    if (cancel_requested_) return absl::CancelledError("task cancelled");
  }
  return absl::CancelledError("worker shutting down");
}

void Worker::ForwardProgress(const v1::Task& task, const std::string& json_line) {
  nlohmann::json j = nlohmann::json::parse(json_line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return;
  v1::ReportProgressRequest req;
  {
    std::lock_guard<std::mutex> lock(mu_);
    req.set_worker_id(worker_id_);
  }
  req.set_task_id(task.task_id());
  auto* p = req.mutable_progress();
  p->set_phase(j.value("phase", ""));
  p->set_done(j.value("done", int64_t{0}));
  p->set_total(j.value("total", int64_t{0}));
  p->set_unit(j.value("unit", ""));
  p->set_rate(j.value("rate", 0.0));
  p->set_eta_seconds(j.value("eta_s", -1.0));
  p->set_detail(j.value("extra", ""));
  if (task.kind() == v1::TASK_KIND_TRAIN) {
    *p->mutable_metrics() = ParseTrainingDetail(p->detail(), p->done());
  }
  v1::ReportProgressResponse resp;
  auto ctx = NewContext();
  grpc::Status s = stub_->ReportProgress(ctx.get(), req, &resp);
  if ((s.ok() && resp.cancel()) || s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
      s.error_code() == grpc::StatusCode::NOT_FOUND) {
    std::lock_guard<std::mutex> lock(mu_);
    cancel_requested_ = true;
    if (running_child_ != nullptr) running_child_->Terminate();
  }
}

void Worker::CompleteTask(const v1::Task& task) {
  v1::CompleteTaskRequest req;
  {
    std::lock_guard<std::mutex> lock(mu_);
    req.set_worker_id(worker_id_);
  }
  req.set_task_id(task.task_id());
  auto* result = req.mutable_result();
  std::string out = TaskOutputDir(task);
  result->set_output_dir(out);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(out, ec)) {
    if (entry.is_regular_file()) result->add_files(entry.path().filename().string());
  }
  if (auto manifest = ReadSmallFile((fs::path(out) / "manifest.json").string()); manifest.ok()) {
    auto j = nlohmann::json::parse(*manifest, nullptr, false);
    if (j.is_object()) result->set_rows(j.value("rows", int64_t{0}));
  }
  if (auto metrics = ReadSmallFile((fs::path(out) / "train_metrics.json").string()); metrics.ok()) {
    auto j = nlohmann::json::parse(*metrics, nullptr, false);
    if (j.is_object()) {
      auto* m = result->mutable_metrics();
      m->set_step(j.value("steps", int64_t{0}));
      m->set_loss(j.value("final_loss", 0.0));
      m->set_l0(j.value("l0", 0.0));
      m->set_dead_latents(j.value("dead_latents", int64_t{0}));
      m->set_tokens_per_second(j.value("tokens_per_second", 0.0));
      if (j.contains("fvu") && j["fvu"].is_array()) {
        for (const auto& v : j["fvu"]) {
          if (v.is_number()) m->add_fvu(v.get<double>());
        }
      }
    }
  }
  v1::CompleteTaskResponse resp;
  auto ctx = NewContext();
  grpc::Status s = stub_->CompleteTask(ctx.get(), req, &resp);
  if (!s.ok()) {
    std::fprintf(stderr, "crossdiff-worker: complete %s: %s\n", task.task_id().c_str(),
                 s.error_message().c_str());
  }
}

void Worker::FailTask(const v1::Task& task, const std::string& error, bool retryable) {
  v1::FailTaskRequest req;
  {
    std::lock_guard<std::mutex> lock(mu_);
    req.set_worker_id(worker_id_);
  }
  req.set_task_id(task.task_id());
  req.set_error(error);
  req.set_retryable(retryable);
  v1::FailTaskResponse resp;
  auto ctx = NewContext();
  grpc::Status s = stub_->FailTask(ctx.get(), req, &resp);
  if (!s.ok()) {
    std::fprintf(stderr, "crossdiff-worker: fail %s: %s\n", task.task_id().c_str(),
                 s.error_message().c_str());
  }
}

void Worker::RunTask(const v1::Task& task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_task_id_ = task.task_id();
    cancel_requested_ = false;
  }
  std::fprintf(stderr, "crossdiff-worker: task %s (%s, job %s, attempt %d)\n", task.task_id().c_str(),
               v1::TaskKind_Name(task.kind()).c_str(), task.job_id().c_str(), task.attempt());
  const std::string out = TaskOutputDir(task);
  std::error_code ec;
  // Outputs of an earlier attempt are redone from scratch, except a training checkpoint (resumed).
  if (task.kind() != v1::TASK_KIND_TRAIN && !out.empty()) fs::remove_all(out, ec);

  CommandContext ctx;
  ctx.crossdiff_binary = options_.crossdiff_binary;
  ctx.device = options_.device;
  ctx.threads = options_.threads;
  absl::Status status = absl::OkStatus();
  if (task.kind() == v1::TASK_KIND_TRAIN && task.train().rendezvous().world_size() > 1) {
    auto rv = Rendezvous(task);
    if (rv.ok()) {
      ctx.rendezvous = *rv;
    } else {
      status = rv.status();
    }
  }
  auto finish = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    running_task_id_.clear();
    running_child_ = nullptr;
  };
  if (!status.ok()) {
    bool cancelled;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled = cancel_requested_ || shutdown_;
    }
    if (!cancelled) FailTask(task, std::string(status.message()), /*retryable=*/true);
    finish();
    return;
  }
  auto argv = BuildTaskCommand(task, ctx);
  if (!argv.ok()) {
    FailTask(task, std::string(argv.status().message()), /*retryable=*/false);
    finish();
    return;
  }
  std::string log_path =
      (fs::path(options_.work_dir) / "logs" / absl::StrCat(task.task_id(), "-", task.attempt(), ".log"))
          .string();
  auto child = ChildProcess::Start(*argv, {}, log_path);
  if (!child.ok()) {
    FailTask(task, std::string(child.status().message()), /*retryable=*/true);
    finish();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_child_ = child->get();
    if (cancel_requested_ || shutdown_) running_child_->Terminate();
  }
  auto last_sent = std::chrono::steady_clock::time_point{};
  ChildExit exit = (*child)->Wait([&](const std::string& line) {
    auto now = std::chrono::steady_clock::now();
    bool final = line.find("\"final\":true") != std::string::npos;
    if (!final && now - last_sent < std::chrono::milliseconds(500)) return;
    last_sent = now;
    ForwardProgress(task, line);
  });
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled = cancel_requested_ || shutdown_;
    running_child_ = nullptr;
  }
  if (cancelled) {
    // The coordinator re-queues or drops the task; leave nothing half-written behind. A training
    // checkpoint stays: the gang's next attempt resumes from it.
    if (task.kind() != v1::TASK_KIND_TRAIN) fs::remove_all(out, ec);
    std::fprintf(stderr, "crossdiff-worker: task %s stopped\n", task.task_id().c_str());
  } else if (exit.ok()) {
    CompleteTask(task);
    std::fprintf(stderr, "crossdiff-worker: task %s done\n", task.task_id().c_str());
  } else {
    std::string last = ChildProcess::LastLogLine(log_path);
    std::string error = absl::StrCat(v1::TaskKind_Name(task.kind()), " failed (", exit.Describe(),
                                     ")", last.empty() ? "" : ": ", last);
    // A command that exits with an error found bad input; a crash may pass on retry.
    FailTask(task, error, /*retryable=*/exit.signal != 0);
    std::fprintf(stderr, "crossdiff-worker: task %s failed: %s\n", task.task_id().c_str(),
                 error.c_str());
  }
  finish();
}

}  // namespace crossdiff::worker
