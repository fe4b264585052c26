// WatchJob: numbered events, resuming from event N, several watchers, and persistence across a
// coordinator killed with SIGKILL.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "tests/service/coordinator_process.h"
#include "tests/service/test_worker.h"

namespace crossdiff::testing {
namespace {

using ::testing::ElementsAreArray;

std::vector<int64_t> Sequences(const std::vector<v1::JobEvent>& events) {
  std::vector<int64_t> sequences;
  for (const auto& e : events) sequences.push_back(e.sequence());
  return sequences;
}

std::vector<int64_t> Range(int64_t first, int64_t last) {
  std::vector<int64_t> r;
  for (int64_t i = first; i <= last; ++i) r.push_back(i);
  return r;
}

class WatchTest : public ::testing::Test {
 protected:
  void SetUp() override { coordinator_.Start(); }

  std::string Submit() {
    v1::JobSpec spec = ExampleJobSpec();
    spec.mutable_harvest()->set_tasks(2);
    auto job = coordinator_.Client()->SubmitJob(spec);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->id() : "";
  }

  // Generates a few events: a lease (phase change + message) and progress reports.
  void MakeEvents(TestWorker& worker, int progress_reports) {
    auto task = worker.Lease();
    ASSERT_TRUE(task.has_value());
    for (int i = 1; i <= progress_reports; ++i) {
      v1::ReportProgressResponse response;
      ASSERT_TRUE(worker.Progress(task->task_id(), 100 * i, 10000, 50.0, &response).ok());
    }
  }

  std::vector<v1::JobEvent> Watch(const std::string& job_id, int64_t from) {
    std::vector<v1::JobEvent> events;
    auto status = coordinator_.Client()->WatchJob(job_id, from, [&](const v1::JobEvent& e) {
      events.push_back(e);
      return true;
    });
    EXPECT_TRUE(status.ok()) << status;
    return events;
  }

  int64_t LastSequence(const std::string& job_id) {
    auto job = coordinator_.Client()->GetJob(job_id);
    EXPECT_TRUE(job.ok());
    return job.ok() ? job->last_event_sequence() : -1;
  }

  CoordinatorProcess coordinator_;
};

TEST_F(WatchTest, ResumesFromEventN) {
  TestWorker worker(&coordinator_, "w");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit();
  MakeEvents(worker, 3);
  ASSERT_TRUE(coordinator_.Client()->CancelJob(job_id).ok());
  const int64_t last = LastSequence(job_id);
  ASSERT_GE(last, 7);  // queued, harvesting, started, 3 x progress, cancelled

  auto all = Watch(job_id, 0);
  EXPECT_THAT(Sequences(all), ElementsAreArray(Range(1, last)));
  EXPECT_EQ(all.front().phase_change().to(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(all.back().phase_change().to(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(all.back().state(), v1::JOB_STATE_CANCELLED);

  auto resumed = Watch(job_id, 4);
  EXPECT_THAT(Sequences(resumed), ElementsAreArray(Range(4, last)));
  for (size_t i = 0; i < resumed.size(); ++i)
    EXPECT_EQ(resumed[i].SerializeAsString(), all[i + 3].SerializeAsString());

  // Past the end of a finished job: the stream ends at once, empty.
  EXPECT_TRUE(Watch(job_id, last + 1).empty());
}

TEST_F(WatchTest, TwoWatchersOneAttachedMidJob) {
  TestWorker worker(&coordinator_, "w");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit();
  std::vector<v1::JobEvent> early, late;
  std::atomic<int> early_seen{0};
  std::thread first([&] {
    auto status = coordinator_.Client()->WatchJob(job_id, 1, [&](const v1::JobEvent& e) {
      early.push_back(e);
      ++early_seen;
      return true;
    });
    EXPECT_TRUE(status.ok()) << status;
  });
  MakeEvents(worker, 2);
  const int64_t attach_from = LastSequence(job_id) + 1;  // the second watcher joins here
  std::thread second([&] {
    auto status = coordinator_.Client()->WatchJob(job_id, attach_from, [&](const v1::JobEvent& e) {
      late.push_back(e);
      return true;
    });
    EXPECT_TRUE(status.ok()) << status;
  });
  TestWorker other(&coordinator_, "w2");
  ASSERT_TRUE(other.Register().ok());
  MakeEvents(other, 3);
  ASSERT_TRUE(coordinator_.Client()->CancelJob(job_id).ok());
  first.join();
  second.join();
  const int64_t last = LastSequence(job_id);
  EXPECT_THAT(Sequences(early), ElementsAreArray(Range(1, last)));
  EXPECT_THAT(Sequences(late), ElementsAreArray(Range(attach_from, last)));
  EXPECT_EQ(late.back().phase_change().to(), v1::JOB_STATE_CANCELLED);
}

TEST_F(WatchTest, SigkillAndRestartKeepJobsAndEvents) {
  TestWorker worker(&coordinator_, "w");
  ASSERT_TRUE(worker.Register().ok());
  const std::string running = Submit();
  MakeEvents(worker, 2);
  const std::string cancelled = Submit();
  ASSERT_TRUE(coordinator_.Client()->CancelJob(cancelled).ok());
  const int64_t running_last = LastSequence(running);
  auto cancelled_events = Watch(cancelled, 1);

  coordinator_.Restart();  // SIGKILL

  auto client = coordinator_.Client();
  auto job = client->GetJob(running);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_HARVESTING);
  EXPECT_EQ(job->last_event_sequence(), running_last);
  auto after = Watch(cancelled, 1);
  ASSERT_EQ(after.size(), cancelled_events.size());
  for (size_t i = 0; i < after.size(); ++i)
    EXPECT_EQ(after[i].SerializeAsString(), cancelled_events[i].SerializeAsString());
  auto list = client->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->jobs_size(), 2);
  // New events continue the numbering.
  ASSERT_TRUE(client->CancelJob(running).ok());
  EXPECT_EQ(LastSequence(running), running_last + 1);
}

TEST_F(WatchTest, ReconnectingWatcherSeesEveryEventExactlyOnce) {
  TestWorker worker(&coordinator_, "w");
  ASSERT_TRUE(worker.Register().ok());
  const std::string job_id = Submit();
  std::vector<v1::JobEvent> seen;
  std::mutex mu;
  std::thread watcher([&] {
    auto status = coordinator_.Client()->FollowJob(
        job_id, 1,
        [&](const v1::JobEvent& e) {
          std::lock_guard<std::mutex> lock(mu);
          seen.push_back(e);
          return true;
        },
        /*reconnect_window_ms=*/30000);
    EXPECT_TRUE(status.ok()) << status;
  });
  MakeEvents(worker, 2);
  coordinator_.Restart();                  // SIGKILL: the stream breaks mid-job
  MakeEvents(worker, 0);                   // the second harvest part: more events after the restart
  ASSERT_EQ(coordinator_.Terminate(), 0);  // graceful: the stream ends with UNAVAILABLE
  coordinator_.Start();
  ASSERT_TRUE(coordinator_.Client()->CancelJob(job_id).ok());
  watcher.join();
  EXPECT_THAT(Sequences(seen), ElementsAreArray(Range(1, LastSequence(job_id))));
}

}  // namespace
}  // namespace crossdiff::testing
