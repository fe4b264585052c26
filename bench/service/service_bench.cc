// Coordinator benchmark on loopback (figures only; nothing here is a test):
//   - SubmitJob and GetJob latency with 100 concurrent clients (each its own channel and thread);
//   - WatchJob: event-to-client latency with 100 watchers of one job (event time stamped at
//   commit);
//   - the coordinator's resident memory per idle watcher (async streams that stay open).
// It starts a real crossdiff-coordinator process (SQLite state in a temporary directory).
#include <google/protobuf/util/time_util.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/cli_args.h"
#include "crossdiff/v1/diff_service.grpc.pb.h"
#include "crossdiff/v1/worker_service.grpc.pb.h"
#include "proto/jobspec/job_file.h"

namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * (values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

void PrintLatency(const char* what, const std::vector<double>& ms, double seconds) {
  std::printf("%-34s n=%-6zu p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  %8.0f calls/s\n", what,
              ms.size(), Percentile(ms, 0.5), Percentile(ms, 0.99), Percentile(ms, 1.0),
              ms.size() / seconds);
}

// A separate TCP connection per client: gRPC would otherwise share one subchannel between channels.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& address, int id) {
  grpc::ChannelArguments args;
  args.SetInt("crossdiff.bench_channel", id);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

long RssKb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      long kb = 0;
      in >> kb;
      return kb;
    }
    in.ignore(1 << 20, '\n');
  }
  return -1;
}

class Coordinator {
 public:
  Coordinator(const std::string& binary, const std::string& dir) {
    const std::string config = R"({"num_hidden_layers": 4})";
    for (const char* model : {"models/base", "models/ft"}) {
      std::filesystem::create_directories(dir + "/data/" + model);
      std::ofstream(dir + "/data/" + model + "/config.json") << config;
    }
    std::filesystem::create_directories(dir + "/data/data");
    std::ofstream(dir + "/data/data/train.jsonl") << "{\"text\": \"x\"}\n";
    std::string port_file = dir + "/port";
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<std::string> args = {
          binary,        "--listen",     "127.0.0.1:0", "--data-root", dir + "/data",
          "--state-dir", dir + "/state", "--port-file", port_file,     "--max-jobs-per-team",
          "100000000"};
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 2000 && port_ == 0; ++i) {
      std::ifstream in(port_file);
      if (!(in >> port_)) port_ = 0;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~Coordinator() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
    }
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  pid_t pid() const { return pid_; }
  bool ok() const { return port_ > 0; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

crossdiff::v1::JobSpec Spec() {
  return *crossdiff::jobspec::ParseJobJson(
      R"({"name": "bench", "base_model": "models/base", "finetune_model": "models/ft",
          "dataset": {"path": "data/train.jsonl"}, "layer": 1, "harvest": {"max_tokens": 20000, "seq_len": 64},
          "crosscoder": {"dict_size": 256, "k": 8}, "workers": 2})",
      "bench");
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("service_bench", "coordinator latency and memory on loopback");
  auto& binary =
      cl.AddString("coordinator", std::string(CROSSDIFF_BINARY_DIR) + "/bin/crossdiff-coordinator",
                   "crossdiff-coordinator binary");
  auto& clients = cl.AddInt("clients", 100, "concurrent clients");
  auto& submits = cl.AddInt("submits", 20, "SubmitJob calls per client");
  auto& gets = cl.AddInt("gets", 50, "GetJob calls per client");
  auto& events = cl.AddInt("events", 100, "events delivered to the watchers");
  auto& event_gap_ms = cl.AddInt("event-gap-ms", 10, "pause between two events");
  auto& idle_watchers = cl.AddInt("idle-watchers", 1000, "streams held open for the memory figure");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;

  std::string dir =
      (std::filesystem::temp_directory_path() / ("crossdiff-bench-" + std::to_string(getpid())))
          .string();
  std::filesystem::create_directories(dir);
  int exit_code = 0;
  {
    Coordinator coordinator(binary, dir);
    if (!coordinator.ok()) {
      std::fprintf(stderr, "service_bench: the coordinator did not start (%s)\n", binary.c_str());
      return 1;
    }
    const std::string address = coordinator.address();
    std::printf("coordinator %s, %lld clients on loopback, cores %u\n", address.c_str(),
                static_cast<long long>(clients), std::thread::hardware_concurrency());
    const crossdiff::v1::JobSpec spec = Spec();

    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (int c = 0; c < clients; ++c) channels.push_back(NewChannel(address, c));
    // The watched job and its worker, set up first (see the WatchJob phase).
    auto diff_stub = crossdiff::v1::DiffService::NewStub(channels[0]);
    crossdiff::v1::SubmitJobRequest submit;
    *submit.mutable_spec() = spec;
    crossdiff::v1::SubmitJobResponse submitted;
    {
      grpc::ClientContext context;
      diff_stub->SubmitJob(&context, submit, &submitted);
    }
    const std::string job_id = submitted.job().id();
    auto worker = crossdiff::v1::WorkerService::NewStub(NewChannel(address, 100000));
    crossdiff::v1::RegisterRequest reg;
    reg.mutable_info()->set_name("bench-worker");
    crossdiff::v1::RegisterResponse registered;
    {
      grpc::ClientContext context;
      worker->Register(&context, reg, &registered);
    }
    // Submitted first, so its first harvest task is the oldest pending one.
    std::string task_id;
    while (task_id.empty()) {
      crossdiff::v1::LeaseTaskRequest lease;
      lease.set_worker_id(registered.worker_id());
      crossdiff::v1::LeaseTaskResponse leased;
      grpc::ClientContext context;
      if (!worker->LeaseTask(&context, lease, &leased).ok() || !leased.has_task()) break;
      if (leased.task().job_id() == job_id) task_id = leased.task().task_id();
    }
    // ---- SubmitJob / GetJob with N concurrent clients ----
    std::vector<std::vector<double>> submit_ms(clients), get_ms(clients);
    std::vector<std::string> first_job(clients);
    auto run_phase = [&](auto body) {
      std::vector<std::thread> threads;
      auto start = Clock::now();
      for (int c = 0; c < clients; ++c) threads.emplace_back(body, c);
      for (auto& t : threads) t.join();
      return std::chrono::duration<double>(Clock::now() - start).count();
    };
    std::atomic<int> errors{0};
    double submit_s = run_phase([&](int c) {
      auto stub = crossdiff::v1::DiffService::NewStub(channels[c]);
      for (int i = 0; i < submits; ++i) {
        crossdiff::v1::SubmitJobRequest request;
        *request.mutable_spec() = spec;
        crossdiff::v1::SubmitJobResponse response;
        grpc::ClientContext context;
        context.set_wait_for_ready(true);
        auto t0 = Clock::now();
        grpc::Status status = stub->SubmitJob(&context, request, &response);
        submit_ms[c].push_back(
            std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        if (!status.ok()) ++errors;
        if (i == 0) first_job[c] = response.job().id();
      }
    });
    double get_s = run_phase([&](int c) {
      auto stub = crossdiff::v1::DiffService::NewStub(channels[c]);
      for (int i = 0; i < gets; ++i) {
        crossdiff::v1::GetJobRequest request;
        request.set_job_id(first_job[(c + i) % clients]);
        crossdiff::v1::Job job;
        grpc::ClientContext context;
        auto t0 = Clock::now();
        grpc::Status status = stub->GetJob(&context, request, &job);
        get_ms[c].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        if (!status.ok()) ++errors;
      }
    });
    std::vector<double> all_submit, all_get;
    for (int c = 0; c < clients; ++c) {
      all_submit.insert(all_submit.end(), submit_ms[c].begin(), submit_ms[c].end());
      all_get.insert(all_get.end(), get_ms[c].begin(), get_ms[c].end());
    }
    PrintLatency("SubmitJob", all_submit, submit_s);
    PrintLatency("GetJob", all_get, get_s);

    // ---- WatchJob: N watchers, events produced by a worker's progress reports ----
    std::mutex mu;
    std::vector<double> delivery_ms;
    std::atomic<int> ready{0};
    std::vector<std::thread> watchers;
    for (int c = 0; c < clients; ++c) {
      watchers.emplace_back([&, c] {
        auto stub = crossdiff::v1::DiffService::NewStub(channels[c]);
        grpc::ClientContext context;
        crossdiff::v1::WatchJobRequest request;
        request.set_job_id(job_id);
        request.set_from_sequence(submitted.job().last_event_sequence() + 1);
        auto reader = stub->WatchJob(&context, request);
        ++ready;
        crossdiff::v1::JobEvent event;
        std::vector<double> mine;
        while (reader->Read(&event)) {
          if (!event.has_progress()) continue;
          int64_t now_us = std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
          mine.push_back(
              (now_us - google::protobuf::util::TimeUtil::TimestampToMicroseconds(event.time())) /
              1000.0);
        }
        reader->Finish();
        std::lock_guard<std::mutex> lock(mu);
        delivery_ms.insert(delivery_ms.end(), mine.begin(), mine.end());
      });
    }
    while (ready < clients) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // streams established
    auto t0 = Clock::now();
    for (int i = 1; i <= events; ++i) {
      crossdiff::v1::ReportProgressRequest progress;
      progress.set_worker_id(registered.worker_id());
      progress.set_task_id(task_id);
      progress.mutable_progress()->set_done(i);
      progress.mutable_progress()->set_total(events);
      progress.mutable_progress()->set_rate(100);
      crossdiff::v1::ReportProgressResponse response;
      grpc::ClientContext context;
      worker->ReportProgress(&context, progress, &response);
      std::this_thread::sleep_for(std::chrono::milliseconds(event_gap_ms));
    }
    double watch_s = std::chrono::duration<double>(Clock::now() - t0).count();
    {
      crossdiff::v1::CancelJobRequest cancel;
      cancel.set_job_id(job_id);
      crossdiff::v1::Job job;
      grpc::ClientContext context;
      diff_stub->CancelJob(&context, cancel, &job);
    }
    for (auto& t : watchers) t.join();
    std::printf(
        "%-34s n=%-6zu p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  (%lld events x %lld watchers, "
        "%.0f "
        "events/s)\n",
        "WatchJob event-to-client", delivery_ms.size(), Percentile(delivery_ms, 0.5),
        Percentile(delivery_ms, 0.99), Percentile(delivery_ms, 1.0), static_cast<long long>(events),
        static_cast<long long>(clients), events / watch_s);
    if (delivery_ms.size() != static_cast<size_t>(events * clients)) {
      std::printf("WARNING: expected %lld deliveries\n", static_cast<long long>(events * clients));
      exit_code = 1;
    }

    // ---- memory per idle watcher: open streams on a queued job and leave them idle ----
    {
      grpc::ClientContext context;
      diff_stub->SubmitJob(&context, submit, &submitted);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    long before_kb = RssKb(coordinator.pid());
    grpc::CompletionQueue cq;
    std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
    std::vector<std::unique_ptr<grpc::ClientAsyncReader<crossdiff::v1::JobEvent>>> readers;
    std::vector<std::unique_ptr<crossdiff::v1::DiffService::Stub>> stubs;
    const int idle_channels = 10;
    for (int c = 0; c < idle_channels; ++c) {
      stubs.push_back(crossdiff::v1::DiffService::NewStub(NewChannel(address, 200000 + c)));
    }
    crossdiff::v1::WatchJobRequest idle_request;
    idle_request.set_job_id(submitted.job().id());
    idle_request.set_from_sequence(submitted.job().last_event_sequence() +
                                   1);  // nothing to send yet
    for (int i = 0; i < idle_watchers; ++i) {
      contexts.push_back(std::make_unique<grpc::ClientContext>());
      readers.push_back(stubs[i % idle_channels]->AsyncWatchJob(
          contexts.back().get(), idle_request, &cq,
          reinterpret_cast<void*>(static_cast<intptr_t>(i))));
    }
    for (int i = 0; i < idle_watchers; ++i) {  // every call started
      void* tag;
      bool ok;
      cq.Next(&tag, &ok);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    long after_kb = RssKb(coordinator.pid());
    std::printf("%-34s %lld idle watchers: RSS %ld -> %ld KiB, %.1f KiB per watcher\n",
                "coordinator memory", static_cast<long long>(idle_watchers), before_kb, after_kb,
                static_cast<double>(after_kb - before_kb) / idle_watchers);
    for (auto& context : contexts) context->TryCancel();
    cq.Shutdown();
    void* tag;
    bool ok;
    while (cq.Next(&tag, &ok)) {
    }
    if (errors > 0) {
      std::printf("WARNING: %d calls failed\n", errors.load());
      exit_code = 1;
    }
  }
  std::filesystem::remove_all(dir);
  return exit_code;
}
