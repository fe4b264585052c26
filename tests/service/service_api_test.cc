// DiffService over a real coordinator process: submit/get/list/cancel, validation, authentication,
// team isolation, path confinement, limits, health checking.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <filesystem>
#include <mutex>

#include "tests/service/coordinator_process.h"

namespace crossdiff::testing {
namespace {

using ::testing::HasSubstr;

#define EXPECT_STATUS(expr, expected_code, substring)                  \
  do {                                                                 \
    auto status_ = (expr);                                             \
    EXPECT_EQ(status_.code(), expected_code) << status_.message();     \
    EXPECT_THAT(std::string(status_.message()), HasSubstr(substring)); \
  } while (0)

class ServiceApiTest : public ::testing::Test {
 protected:
  void SetUp() override { coordinator_.Start(); }
  CoordinatorProcess coordinator_;
  grpc::Status finish_status_;
};

TEST_F(ServiceApiTest, SubmitGetListCancel) {
  auto client = coordinator_.Client("tok-a");
  auto job = client->SubmitJob(ExampleJobSpec());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_THAT(job->id(), ::testing::StartsWith("j-"));
  EXPECT_EQ(job->team(), "alpha");
  EXPECT_EQ(job->state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job->spec().crosscoder().k(), 8);
  EXPECT_EQ(job->last_event_sequence(), 1);
  // 20000 tokens / 64 = 313 sequences over 2 workers: 4 harvest parts by default.
  EXPECT_EQ(job->task_counts().at("pending"), 4);

  auto got = client->GetJob(job->id());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->spec().name(), "llama-vs-ft");

  auto second = client->SubmitJob(ExampleJobSpec("second"));
  ASSERT_TRUE(second.ok());
  auto list = client->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->jobs_size(), 2);
  EXPECT_EQ(list->jobs(0).id(), second->id());  // newest first

  v1::ListJobsRequest paged;
  paged.set_page_size(1);
  auto page1 = client->ListJobs(paged);
  ASSERT_TRUE(page1.ok());
  ASSERT_EQ(page1->jobs_size(), 1);
  ASSERT_FALSE(page1->next_page_token().empty());
  paged.set_page_token(page1->next_page_token());
  auto page2 = client->ListJobs(paged);
  ASSERT_TRUE(page2.ok());
  ASSERT_EQ(page2->jobs_size(), 1);
  EXPECT_EQ(page2->jobs(0).id(), job->id());
  EXPECT_TRUE(page2->next_page_token().empty());

  auto cancelled = client->CancelJob(job->id(), "not needed");
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_THAT(cancelled->error(), HasSubstr("not needed"));
  EXPECT_EQ(cancelled->task_counts().at("cancelled"), 4);
  // Cancelling again is harmless.
  EXPECT_TRUE(client->CancelJob(job->id()).ok());
}

TEST_F(ServiceApiTest, SubmitWithSameRequestIdReturnsTheFirstJob) {
  auto client = coordinator_.Client();
  auto first = client->SubmitJob(ExampleJobSpec(), "retry-key");
  auto again = client->SubmitJob(ExampleJobSpec(), "retry-key");
  ASSERT_TRUE(first.ok() && again.ok());
  EXPECT_EQ(first->id(), again->id());
}

TEST_F(ServiceApiTest, ValidationErrorsNameTheField) {
  auto client = coordinator_.Client();
  v1::JobSpec spec = ExampleJobSpec();
  spec.mutable_crosscoder()->set_k(300);
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "crosscoder.k: must be between 1 and dict_size");
  spec = ExampleJobSpec();
  spec.mutable_harvest()->set_dtype("float16");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "harvest.dtype");
  spec = ExampleJobSpec();
  spec.mutable_dataset()->set_format("csv");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "dataset.format");
  spec = ExampleJobSpec();
  spec.set_layer(2);  // the fixture models have 2 blocks: 0 and 1
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "layer: must be between 0 and 1");
  spec = ExampleJobSpec();
  spec.set_base_model("models/missing");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "base_model:");
  spec = ExampleJobSpec();
  spec.set_name("");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "name: required");
}

TEST_F(ServiceApiTest, PathEscapesAreRejected) {
  auto client = coordinator_.Client();
  v1::JobSpec spec = ExampleJobSpec();
  spec.set_finetune_model("models/../../state");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "finetune_model: 'models/../../state' must not contain '..'");
  spec = ExampleJobSpec();
  spec.mutable_dataset()->set_path("/etc/passwd");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "dataset.path: '/etc/passwd' is outside the data root");
  // A symlink inside the data root that points outside it.
  std::filesystem::create_directory_symlink(coordinator_.root() + "/state",
                                            coordinator_.data_root() + "/models/escape");
  spec = ExampleJobSpec();
  spec.set_base_model("models/escape");
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "base_model: 'models/escape' resolves outside the data root");
  // A symlink that stays inside is fine.
  std::filesystem::create_directory_symlink(coordinator_.data_root() + "/models/base",
                                            coordinator_.data_root() + "/models/alias");
  spec = ExampleJobSpec();
  spec.set_base_model("models/alias");
  EXPECT_TRUE(client->SubmitJob(spec).ok());
}

TEST_F(ServiceApiTest, WrongOrMissingTokenIsUnauthenticated) {
  EXPECT_STATUS(coordinator_.Client("nope")->SubmitJob(ExampleJobSpec()).status(),
                absl::StatusCode::kUnauthenticated, "unknown token");
  EXPECT_STATUS(coordinator_.Client("")->ListJobs(v1::ListJobsRequest()).status(),
                absl::StatusCode::kUnauthenticated, "authorization");
  auto stream =
      coordinator_.Client("nope")->WatchJob("j-0", 1, [](const v1::JobEvent&) { return true; });
  EXPECT_EQ(stream.code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(ServiceApiTest, AnotherTeamsJobIsNotFound) {
  auto alpha = coordinator_.Client("tok-a");
  auto beta = coordinator_.Client("tok-b");
  auto job = alpha->SubmitJob(ExampleJobSpec());
  ASSERT_TRUE(job.ok());
  EXPECT_STATUS(beta->GetJob(job->id()).status(), absl::StatusCode::kNotFound, "not found");
  EXPECT_STATUS(beta->CancelJob(job->id()).status(), absl::StatusCode::kNotFound, "not found");
  EXPECT_EQ(beta->WatchJob(job->id(), 1, [](const v1::JobEvent&) { return true; }).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(beta->GetReport(job->id(), v1::REPORT_FORMAT_JSON).status().code(),
            absl::StatusCode::kNotFound);
  auto list = beta->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->jobs_size(), 0);
  // The owner still sees it, unchanged.
  auto mine = alpha->GetJob(job->id());
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(mine->state(), v1::JOB_STATE_QUEUED);
}

TEST_F(ServiceApiTest, ReportOfAnUnfinishedJobIsFailedPrecondition) {
  auto client = coordinator_.Client();
  auto job = client->SubmitJob(ExampleJobSpec());
  ASSERT_TRUE(job.ok());
  EXPECT_STATUS(client->GetReport(job->id(), v1::REPORT_FORMAT_JSON).status(),
                absl::StatusCode::kFailedPrecondition, "has no report");
}

TEST_F(ServiceApiTest, WorkerServiceNeedsTheSecret) {
  auto stub = coordinator_.WorkerStub();
  v1::RegisterRequest request;
  request.mutable_info()->set_name("w");
  v1::RegisterResponse response;
  auto wrong = WorkerContext("not-the-secret");
  EXPECT_EQ(stub->Register(wrong.get(), request, &response).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  auto right = WorkerContext(coordinator_.worker_secret());
  EXPECT_TRUE(stub->Register(right.get(), request, &response).ok());
  EXPECT_THAT(response.worker_id(), ::testing::StartsWith("w-"));
}

TEST_F(ServiceApiTest, HealthCheckIsServing) {
  auto channel = coordinator_.Channel();
  grpc::GenericStub generic(channel);
  // grpc.health.v1.Health/Check with an empty HealthCheckRequest; the reply's status field 1 =
  // SERVING.
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request_buffer;  // empty message
  grpc::Slice empty("");
  request_buffer = grpc::ByteBuffer(&empty, 1);
  grpc::ByteBuffer reply;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  generic.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request_buffer,
                    &reply, [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = s;
                      done = true;
                      cv.notify_all();
                    });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(reply.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING
}

TEST_F(ServiceApiTest, ReflectionListsTheServices) {
  // grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo with `list_services: ""`
  // (field 7, an empty string), over the generic async API.
  grpc::GenericStub generic(coordinator_.Channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](void* expected) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(tag, expected);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(reinterpret_cast<void*>(1)));
  grpc::Slice request(std::string("\x3a\x00", 2));
  grpc::ByteBuffer request_buffer(&request, 1);
  call->Write(request_buffer, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(reinterpret_cast<void*>(2)));
  grpc::ByteBuffer reply;
  call->Read(&reply, reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(reinterpret_cast<void*>(3)));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(reply.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_THAT(bytes, HasSubstr("crossdiff.v1.DiffService"));
  EXPECT_THAT(bytes, HasSubstr("crossdiff.v1.WorkerService"));
  context.TryCancel();
  call->Finish(&finish_status_, reinterpret_cast<void*>(4));
  step(reinterpret_cast<void*>(4));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST(ServiceLimitsTest, ConcurrentJobsPerTeamAreLimited) {
  CoordinatorProcess coordinator(true, {"--max-jobs-per-team", "1", "--max-dict-size", "128"});
  coordinator.Start();
  auto client = coordinator.Client();
  v1::JobSpec spec = ExampleJobSpec();
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kInvalidArgument,
                "crosscoder.dict_size: exceeds this coordinator's limit of 128");
  spec.mutable_crosscoder()->set_dict_size(128);
  ASSERT_TRUE(client->SubmitJob(spec).ok());
  EXPECT_STATUS(client->SubmitJob(spec).status(), absl::StatusCode::kResourceExhausted,
                "unfinished jobs");
  // Another team has its own allowance.
  EXPECT_TRUE(coordinator.Client("tok-b")->SubmitJob(spec).ok());
}

TEST(ServiceNoTokensTest, LoopbackClientsAreServedAsTeamLocal) {
  CoordinatorProcess coordinator(/*with_tokens=*/false);
  coordinator.Start();
  auto job = coordinator.Client("")->SubmitJob(ExampleJobSpec());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->team(), "local");
}

TEST(ServiceShutdownTest, SigtermExitsCleanly) {
  CoordinatorProcess coordinator;
  coordinator.Start();
  ASSERT_TRUE(coordinator.Client()->SubmitJob(ExampleJobSpec()).ok());
  EXPECT_EQ(coordinator.Terminate(), 0);
}

}  // namespace
}  // namespace crossdiff::testing
