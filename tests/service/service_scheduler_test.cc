// The scheduler end to end over real gRPC: the test plays the workers (WorkerService is the
// contract a worker implements), the coordinator is the real process.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "tests/service/coordinator_process.h"
#include "tests/service/test_worker.h"

namespace crossdiff::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A small report.json in the DESIGN.md 3.5 format (what the analysis task writes).
std::string FixtureReportJson() {
  return R"({"format": "crossdiff.report", "version": 1,
 "summary": {"models": ["models/base", "models/ft"], "layer": 1, "num_latents": 5,
             "counts": {"base_only": 1, "finetune_only": 2, "shared": 1, "other": 1},
             "fvu": [0.2, 0.25], "l0": 7.5, "dead_latents": 0},
 "capabilities": [{"category": "code", "base_mass": 0.5, "finetune_mass": 1.0, "change_percent": 100.0, "latents": [1, 3]}],
 "latents": [
  {"index": 0, "delta": 0.95, "dec_cos": 0.1, "freq": 0.01, "max_act": 3.0, "tag": "base_only", "nu_error": null, "nu_reconstruction": null, "top_examples": []},
  {"index": 1, "delta": 0.05, "dec_cos": 0.2, "freq": 0.02, "max_act": 2.0, "tag": "finetune_only", "nu_error": 0.1, "nu_reconstruction": 0.2,
   "top_examples": [{"activation": 2.0, "row": 7, "sequence_id": 1, "position": 3, "token_id": 42, "context_token_ids": [5, 42], "context_index": 1, "token_text": "hi", "context_text": "oh hi"}]},
  {"index": 2, "delta": 0.5, "dec_cos": 0.9, "freq": 0.03, "max_act": 1.0, "tag": "shared", "nu_error": null, "nu_reconstruction": null, "top_examples": []},
  {"index": 3, "delta": 0.01, "dec_cos": 0.3, "freq": 0.04, "max_act": 4.0, "tag": "finetune_only", "nu_error": 0.0, "nu_reconstruction": 0.1, "top_examples": []},
  {"index": 4, "delta": 0.3, "dec_cos": 0.5, "freq": 0.05, "max_act": 5.0, "tag": "other", "nu_error": null, "nu_reconstruction": null, "top_examples": []}]})";
}

std::vector<v1::JobEvent> AllEvents(client::DiffClient& client, const std::string& job_id,
                                    int64_t from = 1) {
  std::vector<v1::JobEvent> events;
  auto status = client.WatchJob(job_id, from, [&](const v1::JobEvent& e) {
    events.push_back(e);
    return true;
  });
  EXPECT_TRUE(status.ok()) << status;
  return events;
}

std::vector<v1::JobState> PhaseChanges(const std::vector<v1::JobEvent>& events) {
  std::vector<v1::JobState> states;
  for (const auto& e : events) {
    if (e.has_phase_change()) states.push_back(e.phase_change().to());
  }
  return states;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override { coordinator_.Start(); }

  std::string Submit(int harvest_tasks, int workers = 2) {
    v1::JobSpec spec = ExampleJobSpec();
    spec.mutable_harvest()->set_tasks(harvest_tasks);
    spec.set_workers(workers);
    auto job = coordinator_.Client()->SubmitJob(spec);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->id() : "";
  }

  v1::JobState StateOf(const std::string& job_id) {
    auto job = coordinator_.Client()->GetJob(job_id);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->state() : v1::JOB_STATE_UNSPECIFIED;
  }

  // Runs a leased harvest task to completion.
  void RunHarvest(TestWorker& worker, const v1::Task& task) {
    ASSERT_EQ(task.kind(), v1::TASK_KIND_HARVEST);
    int64_t tokens = task.harvest().token_end() - task.harvest().token_begin();
    v1::ReportProgressResponse progress;
    ASSERT_TRUE(worker.Progress(task.task_id(), tokens / 2, tokens, 1000.0, &progress).ok());
    EXPECT_FALSE(progress.cancel());
    v1::TaskResult result;
    result.set_output_dir(task.harvest().output_dir());
    result.set_rows(tokens);
    ASSERT_TRUE(worker.Complete(task.task_id(), result).ok());
  }

  CoordinatorProcess coordinator_;
};

TEST_F(SchedulerTest, JobRunsThroughAllPhasesAndServesItsReport) {
  TestWorker a(&coordinator_, "worker-a"), b(&coordinator_, "worker-b");
  ASSERT_TRUE(a.Register().ok());
  ASSERT_TRUE(b.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/3);

  // Harvest: 3 parts tiling the 313 sequences / 20000 tokens.
  std::vector<v1::Task> parts;
  for (int i = 0; i < 3; ++i) {
    TestWorker& w = i % 2 == 0 ? a : b;
    auto task = w.Lease();
    ASSERT_TRUE(task.has_value());
    parts.push_back(*task);
    EXPECT_EQ(task->job_id(), job_id);
    EXPECT_EQ(task->attempt(), 1);
    EXPECT_EQ(task->spec().harvest().seq_len(), 64);
    EXPECT_EQ(task->inputs().base_model(), coordinator_.data_root() + "/models/base");
    EXPECT_THAT(task->job_dir(), HasSubstr(job_id));
  }
  EXPECT_EQ(parts[0].harvest().sequence_begin(), 0);
  EXPECT_EQ(parts[0].harvest().sequence_end(), parts[1].harvest().sequence_begin());
  EXPECT_EQ(parts[2].harvest().sequence_end(), 313);
  EXPECT_EQ(parts[2].harvest().token_end(), 20000);
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_HARVESTING);
  for (int i = 0; i < 3; ++i) RunHarvest(i % 2 == 0 ? a : b, parts[i]);

  // Merge: one task listing the parts in order.
  auto merge = a.Lease();
  ASSERT_TRUE(merge.has_value());
  ASSERT_EQ(merge->kind(), v1::TASK_KIND_MERGE);
  ASSERT_EQ(merge->merge().part_dirs_size(), 3);
  EXPECT_EQ(merge->merge().part_dirs(1), parts[1].harvest().output_dir());
  ASSERT_TRUE(a.Complete(merge->task_id()).ok());
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_TRAINING);

  // Training: both ranks leased together; rank 0 publishes the store address, rank 1 receives it.
  auto first = a.Lease();
  auto second = b.Lease();
  ASSERT_TRUE(first.has_value() && second.has_value());
  ASSERT_EQ(first->kind(), v1::TASK_KIND_TRAIN);
  ASSERT_EQ(second->kind(), v1::TASK_KIND_TRAIN);
  EXPECT_EQ(first->train().rendezvous().world_size(), 2);
  std::vector<int> ranks = {first->train().rendezvous().rank(),
                            second->train().rendezvous().rank()};
  std::sort(ranks.begin(), ranks.end());
  EXPECT_THAT(ranks, ElementsAre(0, 1));
  TestWorker& rank0 = first->train().rendezvous().rank() == 0 ? a : b;
  TestWorker& rank1 = first->train().rendezvous().rank() == 0 ? b : a;
  const v1::Task& task0 = first->train().rendezvous().rank() == 0 ? *first : *second;
  const v1::Task& task1 = first->train().rendezvous().rank() == 0 ? *second : *first;
  v1::GetRendezvousResponse rdv;
  ASSERT_TRUE(rank1.Rendezvous(task1.task_id(), 0, &rdv).ok());
  EXPECT_FALSE(rdv.ready());
  std::thread publisher([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_TRUE(rank0.Publish(task0.task_id(), 29512).ok());
  });
  ASSERT_TRUE(
      rank1.Rendezvous(task1.task_id(), 5000, &rdv).ok());  // long poll, woken by the publish
  publisher.join();
  EXPECT_TRUE(rdv.ready());
  EXPECT_EQ(rdv.host(), "127.0.0.1");
  EXPECT_EQ(rdv.port(), 29512);
  EXPECT_EQ(rdv.world_size(), 2);
  v1::TrainingMetrics metrics;
  metrics.set_step(150);
  metrics.set_loss(0.5);
  metrics.add_fvu(0.3);
  metrics.add_fvu(0.35);
  v1::ReportProgressResponse progress;
  ASSERT_TRUE(rank0.Progress(task0.task_id(), 150, 300, 20, &progress, &metrics).ok());
  ASSERT_TRUE(rank1.Complete(task1.task_id()).ok());
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_TRAINING);  // until every rank is done
  v1::TaskResult trained;
  metrics.set_step(300);
  *trained.mutable_metrics() = metrics;
  ASSERT_TRUE(rank0.Complete(task0.task_id(), trained).ok());
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_ANALYZING);

  // Analysis writes the report where the task says.
  auto analyze = b.Lease();
  ASSERT_TRUE(analyze.has_value());
  ASSERT_EQ(analyze->kind(), v1::TASK_KIND_ANALYZE);
  const std::string report_dir = analyze->analyze().output_dir();
  WriteFile(report_dir + "/report.json", FixtureReportJson());
  WriteFile(report_dir + "/report.md", "# crossdiff diff report\n");
  WriteFile(report_dir + "/report.html", "<html></html>\n");
  ASSERT_TRUE(b.Complete(analyze->task_id()).ok());

  auto client = coordinator_.Client();
  auto job = client->GetJob(job_id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job->outputs().report_dir(), report_dir);

  auto events = AllEvents(*client, job_id);
  EXPECT_THAT(PhaseChanges(events),
              ElementsAre(v1::JOB_STATE_QUEUED, v1::JOB_STATE_HARVESTING, v1::JOB_STATE_TRAINING,
                          v1::JOB_STATE_ANALYZING, v1::JOB_STATE_SUCCEEDED));
  for (size_t i = 0; i < events.size(); ++i)
    EXPECT_EQ(events[i].sequence(), static_cast<int64_t>(i + 1));
  bool saw_harvest_rate = false, saw_metrics = false;
  for (const auto& e : events) {
    if (e.has_progress() && e.progress().phase() == "harvest" && e.progress().rate() > 0) {
      saw_harvest_rate = true;
      EXPECT_EQ(e.progress().total(), 20000);
      EXPECT_GE(e.progress().eta_seconds(), 0);
    }
    if (e.has_progress() && e.progress().has_metrics()) saw_metrics = true;
  }
  EXPECT_TRUE(saw_harvest_rate);
  EXPECT_TRUE(saw_metrics);

  auto report = client->GetReport(job_id, v1::REPORT_FORMAT_JSON);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->content(), FixtureReportJson());
  EXPECT_EQ(report->summary().counts().at("finetune_only"), 2);
  ASSERT_EQ(report->capabilities_size(), 1);
  EXPECT_DOUBLE_EQ(report->capabilities(0).change_percent(), 100.0);
  auto markdown = client->GetReport(job_id, v1::REPORT_FORMAT_MARKDOWN);
  ASSERT_TRUE(markdown.ok());
  EXPECT_EQ(markdown->content(), "# crossdiff diff report\n");

  // StreamLatents: filtered by tag, ordered by delta, in pages.
  v1::StreamLatentsRequest request;
  request.set_job_id(job_id);
  request.set_tag("finetune_only");
  std::vector<int64_t> order;
  ASSERT_TRUE(client
                  ->StreamLatents(request,
                                  [&](const v1::LatentPage& page) {
                                    EXPECT_EQ(page.total_matching(), 2);
                                    for (const auto& l : page.latents()) order.push_back(l.index());
                                    return true;
                                  })
                  .ok());
  EXPECT_THAT(order, ElementsAre(3, 1));
  request.set_tag("");
  request.set_order(v1::LATENT_ORDER_DELTA_DESCENDING);
  request.set_page_size(2);
  order.clear();
  int pages = 0;
  ASSERT_TRUE(client
                  ->StreamLatents(request,
                                  [&](const v1::LatentPage& page) {
                                    ++pages;
                                    for (const auto& l : page.latents()) order.push_back(l.index());
                                    return true;
                                  })
                  .ok());
  EXPECT_EQ(pages, 3);
  EXPECT_THAT(order, ElementsAre(0, 2, 4, 1, 3));
  request.set_tag("bogus");
  EXPECT_EQ(client->StreamLatents(request, [](const v1::LatentPage&) { return true; }).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SchedulerTest, ExpiredLeaseGoesBackToTheQueue) {
  TestWorker lost(&coordinator_, "lost"), rescuer(&coordinator_, "rescuer");
  ASSERT_TRUE(lost.Register().ok());
  ASSERT_TRUE(rescuer.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/1);
  auto task = lost.Lease();
  ASSERT_TRUE(task.has_value());
  // `lost` stops heart-beating; its lease (3 s) runs out and the task is offered again.
  auto again = rescuer.Lease(/*wait_ms=*/10000);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->task_id(), task->task_id());
  EXPECT_EQ(again->attempt(), 2);
  // The lost worker is told so: unknown (declared dead) and its result is refused.
  v1::HeartbeatResponse heartbeat;
  EXPECT_EQ(lost.Heartbeat({task->task_id()}, &heartbeat).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(lost.Complete(task->task_id()).error_code(), grpc::StatusCode::NOT_FOUND);
  RunHarvest(rescuer, *again);
  // The job's events say what happened.
  std::string warning;
  ASSERT_TRUE(coordinator_.Client()
                  ->WatchJob(job_id, 1,
                             [&](const v1::JobEvent& e) {
                               if (e.has_message() &&
                                   e.message().severity() == v1::SEVERITY_WARNING) {
                                 warning = e.message().text();
                                 return false;
                               }
                               return true;
                             })
                  .ok());
  EXPECT_THAT(warning, HasSubstr("lease expired: worker lost stopped heart-beating; re-queued"));
}

TEST_F(SchedulerTest, HeartbeatsKeepTheLease) {
  TestWorker worker(&coordinator_, "steady"), other(&coordinator_, "other");
  ASSERT_TRUE(worker.Register().ok());
  Submit(/*harvest_tasks=*/1);
  auto task = worker.Lease();
  ASSERT_TRUE(task.has_value());
  for (int i = 0; i < 25; ++i) {  // 5 s, longer than the 3 s lease timeout
    v1::HeartbeatResponse response;
    ASSERT_TRUE(worker.Heartbeat({task->task_id()}, &response).ok());
    EXPECT_EQ(response.cancel_task_ids_size(), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_TRUE(other.Register().ok());
  EXPECT_FALSE(other.Lease(0).has_value());  // still leased to `worker`
  EXPECT_TRUE(worker.Complete(task->task_id()).ok());
}

TEST_F(SchedulerTest, FailedTaskIsRetriedThenFailsTheJob) {
  TestWorker worker(&coordinator_, "flaky");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/1);
  auto task = worker.Lease();
  ASSERT_TRUE(task.has_value());
  ASSERT_TRUE(worker.Fail(task->task_id(), "out of memory", /*retryable=*/true).ok());
  auto retry = worker.Lease();
  ASSERT_TRUE(retry.has_value());
  EXPECT_EQ(retry->attempt(), 2);
  ASSERT_TRUE(
      worker.Fail(retry->task_id(), "dataset.path: line 3: invalid JSON", /*retryable=*/false)
          .ok());
  auto job = coordinator_.Client()->GetJob(job_id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job->error(), HasSubstr("line 3: invalid JSON"));
  // The watch of a failed job ends after its terminal event.
  auto events = AllEvents(*coordinator_.Client(), job_id);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().phase_change().to(), v1::JOB_STATE_FAILED);
}

TEST_F(SchedulerTest, CancelTellsTheWorkersToStop) {
  TestWorker worker(&coordinator_, "busy");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/2);
  auto task = worker.Lease();
  ASSERT_TRUE(task.has_value());
  ASSERT_TRUE(coordinator_.Client()->CancelJob(job_id).ok());
  v1::HeartbeatResponse heartbeat;
  ASSERT_TRUE(worker.Heartbeat({task->task_id()}, &heartbeat).ok());
  EXPECT_THAT(heartbeat.cancel_task_ids(), ElementsAre(task->task_id()));
  v1::ReportProgressResponse progress;
  ASSERT_TRUE(worker.Progress(task->task_id(), 1, 2, 1, &progress).ok());
  EXPECT_TRUE(progress.cancel());
  EXPECT_EQ(worker.Complete(task->task_id()).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_FALSE(worker.Lease(0).has_value());  // the other part is cancelled too: the worker is free
}

TEST_F(SchedulerTest, LostRankRestartsTheWholeGang) {
  TestWorker a(&coordinator_, "a"), b(&coordinator_, "b"), c(&coordinator_, "c");
  ASSERT_TRUE(a.Register().ok());
  ASSERT_TRUE(b.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/1);
  RunHarvest(a, *a.Lease());
  auto merge = a.Lease();
  ASSERT_TRUE(merge.has_value());
  ASSERT_TRUE(a.Complete(merge->task_id()).ok());
  auto ta = a.Lease();
  auto tb = b.Lease();
  ASSERT_TRUE(ta.has_value() && tb.has_value());
  EXPECT_EQ(ta->train().rendezvous().generation(), 0);
  // b dies; a keeps heart-beating and is told to stop once b's lease expires.
  ASSERT_TRUE(c.Register().ok());
  bool told = false;
  for (int i = 0; i < 150 && !told; ++i) {
    v1::HeartbeatResponse response;
    ASSERT_TRUE(a.Heartbeat({ta->task_id()}, &response).ok());
    told = response.cancel_task_ids_size() == 1;
    v1::HeartbeatResponse idle;
    ASSERT_TRUE(c.Heartbeat({}, &idle).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(told);
  // The new gang (a and c) trains under generation 1.
  auto na = a.Lease();
  auto nc = c.Lease();
  ASSERT_TRUE(na.has_value() && nc.has_value());
  EXPECT_EQ(na->kind(), v1::TASK_KIND_TRAIN);
  EXPECT_EQ(na->train().rendezvous().generation(), 1);
  EXPECT_NE(na->task_id(), ta->task_id());  // a new gang, new task ids
  EXPECT_EQ(na->attempt(), 2);
  EXPECT_EQ(nc->train().rendezvous().generation(), 1);
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_TRAINING);
}

TEST_F(SchedulerTest, CoordinatorKilledMidJobFinishesIt) {
  TestWorker worker(&coordinator_, "survivor");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit(/*harvest_tasks=*/2, /*workers=*/1);
  auto first = worker.Lease();
  ASSERT_TRUE(first.has_value());
  RunHarvest(worker, *first);
  auto second = worker.Lease();
  ASSERT_TRUE(second.has_value());
  coordinator_.Restart();  // SIGKILL + start on the same state directory
  // The worker's registration and lease survived; it finishes its task and the rest of the job.
  RunHarvest(worker, *second);
  for (v1::TaskKind kind : {v1::TASK_KIND_MERGE, v1::TASK_KIND_TRAIN, v1::TASK_KIND_ANALYZE}) {
    auto task = worker.Lease();
    ASSERT_TRUE(task.has_value()) << TaskKind_Name(kind);
    ASSERT_EQ(task->kind(), kind);
    if (kind == v1::TASK_KIND_ANALYZE)
      WriteFile(task->analyze().output_dir() + "/report.json", FixtureReportJson());
    ASSERT_TRUE(worker.Complete(task->task_id()).ok());
  }
  EXPECT_EQ(StateOf(job_id), v1::JOB_STATE_SUCCEEDED);
  auto events = AllEvents(*coordinator_.Client(), job_id);
  for (size_t i = 0; i < events.size(); ++i)
    ASSERT_EQ(events[i].sequence(), static_cast<int64_t>(i + 1));
}

}  // namespace
}  // namespace crossdiff::testing
