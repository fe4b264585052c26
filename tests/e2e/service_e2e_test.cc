// End-to-end tests of the service (issue 5): real coordinator and worker processes on 127.0.0.1,
// real diff jobs on the demo model pair (made from the fixtures), real gRPC clients.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/cli/demo_pair.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/cluster.h"

namespace crossdiff::e2e {
namespace {
namespace fs = std::filesystem;
using std::chrono::seconds;

bool Terminal(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED;
}

// A job small enough to finish in seconds on one core per worker.
v1::JobSpec SmallJob(const std::string& name, int64_t max_tokens = 3000, int64_t steps = 150) {
  v1::JobSpec spec;
  spec.set_name(name);
  spec.set_base_model("models/base");
  spec.set_finetune_model("models/finetune");
  spec.mutable_dataset()->set_path("data/demo.jsonl");
  spec.mutable_dataset()->set_format("text");
  spec.set_layer(1);
  auto* h = spec.mutable_harvest();
  h->set_max_tokens(max_tokens);
  h->set_seq_len(32);
  h->set_batch_size(8);
  h->set_dtype("float32");
  auto* c = spec.mutable_crosscoder();
  c->set_architecture("batch_top_k");
  c->set_dict_size(64);
  c->set_k(4);
  c->set_steps(steps);
  c->set_batch_size(128);
  c->set_lr(0.004);
  spec.set_workers(2);
  return spec;
}

class ServiceE2ETest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("crossdiff_e2e_" + std::to_string(getpid()));
    fs::create_directories(root_);
    cli::DemoPairPaths paths;
    absl::Status s = cli::MakeDemoPair(std::getenv("CROSSDIFF_FIXTURES") ? std::getenv("CROSSDIFF_FIXTURES")
                                                                    : cli::DefaultFixturesDir(),
                                  (root_ / "data").string(), &paths);
    ASSERT_TRUE(s.ok()) << s;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    if (!::testing::Test::HasFailure()) fs::remove_all(root_, ec);
  }

  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    fs::path dir = root_ / info->name();
    cluster_ = std::make_unique<Cluster>(dir.string(), (root_ / "data").string());
  }

  std::string Submit(const v1::JobSpec& spec) {
    grpc::ClientContext ctx;
    v1::SubmitJobRequest req;
    *req.mutable_spec() = spec;
    v1::SubmitJobResponse resp;
    grpc::Status s = cluster_->stub().SubmitJob(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.job().id();
  }

  v1::Job Get(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetJobRequest req;
    req.set_job_id(id);
    v1::Job job;
    grpc::Status s = cluster_->stub().GetJob(&ctx, req, &job);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return job;
  }

  // Reads events from `from` until the job ends (or `stop_after` events, or the deadline).
  std::vector<v1::JobEvent> Watch(const std::string& id, int64_t from, size_t stop_after = SIZE_MAX,
                                  int timeout_s = 240) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(timeout_s));
    v1::WatchJobRequest req;
    req.set_job_id(id);
    req.set_from_sequence(from);
    auto reader = cluster_->stub().WatchJob(&ctx, req);
    std::vector<v1::JobEvent> events;
    v1::JobEvent e;
    while (events.size() < stop_after && reader->Read(&e)) {
      events.push_back(e);
      if (Terminal(e.state()) && e.has_phase_change()) break;
    }
    ctx.TryCancel();
    grpc::Status status = reader->Finish();
    if (events.empty() || !Terminal(events.back().state())) {
      std::fprintf(stderr, "watch %s from %lld: %zu events, stream ended: %d %s\n", id.c_str(),
                   static_cast<long long>(from), events.size(), status.error_code(),
                   status.error_message().c_str());
    }
    return events;
  }

  v1::JobState WaitDone(const std::string& id, int timeout_s = 240) {
    auto deadline = std::chrono::steady_clock::now() + seconds(timeout_s);
    while (std::chrono::steady_clock::now() < deadline) {
      v1::Job job = Get(id);
      if (Terminal(job.state())) return job.state();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return v1::JOB_STATE_UNSPECIFIED;
  }

  static void ExpectContiguous(const std::vector<v1::JobEvent>& events, int64_t first) {
    for (size_t i = 0; i < events.size(); ++i) {
      ASSERT_EQ(events[i].sequence(), first + static_cast<int64_t>(i)) << "event " << i;
    }
  }

  static fs::path root_;
  std::unique_ptr<Cluster> cluster_;
};
fs::path ServiceE2ETest::root_;

TEST_F(ServiceE2ETest, JobRunsToSuccessAndItsReportIsServed) {
  cluster_->StartCoordinator();
  cluster_->StartWorkers(2);
  std::string id = Submit(SmallJob("e2e-success"));
  ASSERT_FALSE(id.empty());
  std::vector<v1::JobEvent> events = Watch(id, 1);
  ASSERT_FALSE(events.empty());
  ExpectContiguous(events, 1);
  EXPECT_EQ(events.back().state(), v1::JOB_STATE_SUCCEEDED);
  std::set<v1::JobState> phases;
  bool saw_progress = false;
  for (const auto& e : events) {
    if (e.has_phase_change()) phases.insert(e.phase_change().to());
    if (e.has_progress() && e.progress().rate() > 0) saw_progress = true;
  }
  EXPECT_TRUE(phases.count(v1::JOB_STATE_HARVESTING));
  EXPECT_TRUE(phases.count(v1::JOB_STATE_TRAINING));
  EXPECT_TRUE(phases.count(v1::JOB_STATE_ANALYZING));
  EXPECT_TRUE(saw_progress) << "no progress event with a rate";

  // GetReport: the report.json of DESIGN.md 3.5.
  grpc::ClientContext ctx;
  v1::GetReportRequest rreq;
  rreq.set_job_id(id);
  rreq.set_format(v1::REPORT_FORMAT_JSON);
  v1::Report report;
  ASSERT_TRUE(cluster_->stub().GetReport(&ctx, rreq, &report).ok());
  nlohmann::json j = nlohmann::json::parse(report.content());
  ASSERT_TRUE(j.contains("latents"));
  EXPECT_EQ(j["latents"].size(), 64u);
  for (const char* field : {"index", "delta", "dec_cos", "freq", "max_act", "tag", "top_examples"}) {
    EXPECT_TRUE(j["latents"][0].contains(field)) << field;
  }
  EXPECT_TRUE(j.contains("summary"));
  EXPECT_TRUE(j.contains("capabilities"));

  // StreamLatents: every latent, ordered by delta, in pages; a tag filter keeps only that tag.
  grpc::ClientContext sctx;
  v1::StreamLatentsRequest sreq;
  sreq.set_job_id(id);
  sreq.set_page_size(10);
  auto reader = cluster_->stub().StreamLatents(&sctx, sreq);
  v1::LatentPage page;
  std::vector<double> deltas;
  while (reader->Read(&page)) {
    for (const auto& l : page.latents()) deltas.push_back(l.delta());
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(deltas.size(), 64u);
  EXPECT_TRUE(std::is_sorted(deltas.begin(), deltas.end()));

  grpc::ClientContext tctx;
  sreq.set_tag("shared");
  auto tagged = cluster_->stub().StreamLatents(&tctx, sreq);
  while (tagged->Read(&page)) {
    for (const auto& l : page.latents()) EXPECT_EQ(l.tag(), "shared");
  }
  EXPECT_TRUE(tagged->Finish().ok());
}

TEST_F(ServiceE2ETest, LateWatcherAndResumingWatcherSeeEveryEventOnce) {
  cluster_->StartCoordinator();
  cluster_->StartWorkers(2);
  std::string id = Submit(SmallJob("e2e-watchers"));
  // A first watcher reads a few events and goes away, as a client whose connection drops.
  std::vector<v1::JobEvent> first = Watch(id, 1, 3);
  ASSERT_EQ(first.size(), 3u);
  ExpectContiguous(first, 1);
  // It reconnects from where it left off; a second client attaches at the same time from 1.
  std::vector<v1::JobEvent> second;
  std::thread late([&] { second = Watch(id, 1); });
  std::vector<v1::JobEvent> rest = Watch(id, first.back().sequence() + 1);
  late.join();
  ExpectContiguous(rest, 4);
  ExpectContiguous(second, 1);
  ASSERT_FALSE(rest.empty());
  EXPECT_EQ(rest.back().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(second.back().sequence(), rest.back().sequence());
  // After the end, resuming from N replays exactly events N..last.
  int64_t n = rest.back().sequence() - 2;
  std::vector<v1::JobEvent> replay = Watch(id, n);
  ExpectContiguous(replay, n);
  EXPECT_EQ(replay.size(), 3u);
}

TEST_F(ServiceE2ETest, CancelStopsTheWorkAndFreesTheWorkers) {
  cluster_->StartCoordinator();
  cluster_->StartWorkers(2);
  // Long enough that it is still running when cancelled.
  std::string big = Submit(SmallJob("e2e-cancel", 200000, 100000));
  auto deadline = std::chrono::steady_clock::now() + seconds(60);
  while (Get(big).state() == v1::JOB_STATE_QUEUED && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  grpc::ClientContext ctx;
  v1::CancelJobRequest creq;
  creq.set_job_id(big);
  creq.set_reason("test");
  v1::Job cancelled;
  ASSERT_TRUE(cluster_->stub().CancelJob(&ctx, creq, &cancelled).ok());
  EXPECT_EQ(WaitDone(big, 30), v1::JOB_STATE_CANCELLED);
  // The workers are free again: a small job runs to success.
  std::string small = Submit(SmallJob("e2e-after-cancel"));
  EXPECT_EQ(WaitDone(small), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(ServiceE2ETest, WorkerKilledMidHarvestLosesNothing) {
  cluster_->StartCoordinator();
  cluster_->StartWorkers(2);
  std::string id = Submit(SmallJob("e2e-worker-killed", 6000));
  auto deadline = std::chrono::steady_clock::now() + seconds(60);
  while (Get(id).state() != v1::JOB_STATE_HARVESTING && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  cluster_->KillWorker(0);
  cluster_->StartWorkers(1);  // training needs two workers again
  EXPECT_EQ(WaitDone(id), v1::JOB_STATE_SUCCEEDED);
  // Every harvested row is there exactly once: 6000 tokens round up to 188 whole sequences of 32.
  v1::Job job = Get(id);
  nlohmann::json manifest = nlohmann::json::parse(
      std::ifstream(fs::path(job.outputs().activations_dir()) / "manifest.json"));
  EXPECT_EQ(manifest["rows"].get<int64_t>(), 188 * 32);
}

TEST_F(ServiceE2ETest, CoordinatorKilledAndRestartedFinishesTheJob) {
  cluster_->StartCoordinator();
  cluster_->StartWorkers(2);
  std::string id = Submit(SmallJob("e2e-restart", 3000, 400));
  std::vector<v1::JobEvent> before = Watch(id, 1, 4);
  ASSERT_EQ(before.size(), 4u);
  int port = cluster_->port();
  cluster_->KillCoordinator();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  cluster_->StartCoordinator(port);
  // A client reconnects as long as the coordinator is coming back, resuming after the last event
  // it saw; across reconnections it must see every event exactly once.
  std::vector<v1::JobEvent> after;
  auto deadline = std::chrono::steady_clock::now() + seconds(240);
  while ((after.empty() || !Terminal(after.back().state())) &&
         std::chrono::steady_clock::now() < deadline) {
    int64_t next = after.empty() ? before.back().sequence() + 1 : after.back().sequence() + 1;
    std::vector<v1::JobEvent> more = Watch(id, next);
    after.insert(after.end(), more.begin(), more.end());
    if (more.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ExpectContiguous(after, before.back().sequence() + 1);
  ASSERT_FALSE(after.empty());
  EXPECT_EQ(after.back().state(), v1::JOB_STATE_SUCCEEDED);
}

}  // namespace
}  // namespace crossdiff::e2e
