// The `crossdiff` client commands (client/lib/client_commands.h, what cmd_client.cc runs) against a
// real coordinator: job file checks before sending, output formats, exit codes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <thread>

#include "absl/strings/str_split.h"
#include "client/lib/client_commands.h"
#include "tests/service/coordinator_process.h"
#include "tests/service/test_worker.h"

namespace crossdiff::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

struct CommandResult {
  int exit_code = -1;
  std::string out, err;
};

std::string ReadBack(FILE* file) {
  std::fflush(file);
  std::rewind(file);
  std::string text;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) text.append(buffer, n);
  std::fclose(file);
  return text;
}

using Command = int (*)(int, char**, FILE*, FILE*);

CommandResult RunCommand(Command command, const char* name, std::vector<std::string> args) {
  args.insert(args.begin(), std::string("crossdiff ") + name);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  FILE* out = std::tmpfile();
  FILE* err = std::tmpfile();
  CommandResult result;
  result.exit_code = command(static_cast<int>(args.size()), argv.data(), out, err);
  result.out = ReadBack(out);
  result.err = ReadBack(err);
  return result;
}

// Plays a worker that runs every task of the coordinator's jobs to success (writing a tiny report).
void RunWorkerUntilIdle(const CoordinatorProcess* coordinator, int idle_polls) {
  TestWorker worker(coordinator, "cli-worker");
  ASSERT_TRUE(worker.Register().ok());
  int idle = 0;
  while (idle < idle_polls) {
    auto task = worker.Lease(300);
    if (!task.has_value()) {
      ++idle;
      continue;
    }
    idle = 0;
    if (task->kind() == v1::TASK_KIND_ANALYZE) {
      WriteFile(
          task->analyze().output_dir() + "/report.json",
          R"({"latents": [{"index": 0, "delta": 0.05, "dec_cos": 0.1, "freq": 0.1, "max_act": 1.0, "tag": "finetune_only"},
                                {"index": 1, "delta": 0.5, "dec_cos": 0.9, "freq": 0.2, "max_act": 2.0, "tag": "shared"}],
                    "summary": {"counts": {"finetune_only": 1, "shared": 1}}, "capabilities": []})");
      WriteFile(task->analyze().output_dir() + "/report.md", "# report\n");
      WriteFile(task->analyze().output_dir() + "/report.html", "<html></html>\n");
    }
    if (task->kind() == v1::TASK_KIND_HARVEST) {
      v1::ReportProgressResponse progress;
      ASSERT_TRUE(worker.Progress(task->task_id(), 10, 20, 100, &progress).ok());
    }
    ASSERT_TRUE(worker.Complete(task->task_id()).ok());
  }
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    coordinator_.Start();
    server_ = "--server=" + coordinator_.address();
  }

  std::string JobFile(const std::string& name, const std::string& text) {
    std::string path = coordinator_.root() + "/" + name;
    WriteFile(path, text);
    return path;
  }

  int JobCount() {
    auto list = coordinator_.Client()->ListJobs(v1::ListJobsRequest());
    EXPECT_TRUE(list.ok());
    return list.ok() ? list->jobs_size() : -1;
  }

  CoordinatorProcess coordinator_;
  std::string server_;
};

TEST_F(CliTest, MalformedJobFilesFailBeforeAnythingIsSent) {
  struct Case {
    std::string file, text, message;
  };
  const std::vector<Case> cases = {
      {"broken.json", "{\"name\": \"x\", ", "broken.json: invalid JSON"},
      {"typo.json", R"({"name": "x", "crosscoder": {"dict_sz": 4}})", "dict_sz"},
      {"tabs.yaml", "name: x\n\tlayer: 1\n", "tabs.yaml:"},
      {"big_k.yaml",
       "name: y\nbase_model: models/base\nfinetune_model: models/ft\ndataset: {path: "
       "data/train.jsonl}\n"
       "layer: 1\nharvest: {max_tokens: 1000}\ncrosscoder: {dict_size: 16, k: 32}\n",
       "big_k.yaml: crosscoder.k: must be between 1 and dict_size (16), got 32"},
      {"list.yaml", "- a\n- b\n", "must be a mapping"},
      {"empty.json", "  \n", "empty.json: the job file is empty"},
  };
  for (const auto& c : cases) {
    auto result = RunCommand(client::SubmitCommand, "submit",
                             {JobFile(c.file, c.text), server_, "--token=tok-a"});
    EXPECT_EQ(result.exit_code, 2) << c.file;
    EXPECT_THAT(result.err, HasSubstr(c.message)) << c.file;
    EXPECT_EQ(std::count(result.err.begin(), result.err.end(), '\n'), 1)
        << "one line: " << result.err;
    EXPECT_TRUE(result.out.empty());
  }
  auto missing =
      RunCommand(client::SubmitCommand, "submit", {coordinator_.root() + "/nope.json", server_});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_THAT(missing.err, HasSubstr("nope.json: cannot read the job file"));
  EXPECT_EQ(JobCount(), 0);
}

TEST_F(CliTest, SubmitYamlPrintsTheJobIdOnTheFirstLine) {
  std::string yaml =
      "name: yaml-job\nbase_model: models/base\nfinetune_model: models/ft\n"
      "dataset:\n  path: data/train.jsonl\n  format: text\nlayer: 1\n"
      "harvest:\n  max_tokens: 20000\n  seq_len: 64\n  batch_size: 8\n  dtype: float32\n"
      "crosscoder:\n  architecture: batch_top_k\n  dict_size: 256\n  k: 8\n  steps: 300\n  "
      "batch_size: 256\n  lr: 0.004\n"
      "workers: 2\nlabels:\n  owner: \"42\"\n";
  auto result = RunCommand(client::SubmitCommand, "submit",
                           {JobFile("job.yaml", yaml), server_, "--token", "tok-a"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  std::vector<std::string> lines = absl::StrSplit(result.out, '\n');
  ASSERT_FALSE(lines.empty());
  EXPECT_THAT(lines[0], StartsWith("j-"));
  auto job = coordinator_.Client()->GetJob(lines[0]);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->spec().crosscoder().k(), 8);
  EXPECT_DOUBLE_EQ(job->spec().crosscoder().lr(), 0.004);
  EXPECT_EQ(job->spec().labels().at("owner"), "42");

  // JSON works the same; the token may come from the environment.
  setenv("CROSSDIFF_TOKEN", "tok-a", 1);
  auto json =
      RunCommand(client::SubmitCommand, "submit", {JobFile("job.json", ExampleJobJson()), server_});
  unsetenv("CROSSDIFF_TOKEN");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  auto jobs = RunCommand(client::JobsCommand, "jobs", {server_, "--token=tok-a"});
  ASSERT_EQ(jobs.exit_code, 0) << jobs.err;
  EXPECT_THAT(jobs.out, HasSubstr("yaml-job"));
  EXPECT_THAT(jobs.out, HasSubstr("llama-vs-ft"));
}

TEST_F(CliTest, ServerErrorsAreOneLineWithTheCode) {
  auto wrong = RunCommand(client::SubmitCommand, "submit",
                          {JobFile("job.json", ExampleJobJson()), server_, "--token=bad"});
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_THAT(wrong.err, HasSubstr("UNAUTHENTICATED: unknown token"));
  std::string escape = ExampleJobJson();
  escape.replace(escape.find("models/base"), 11, "../outside");
  auto escaped = RunCommand(client::SubmitCommand, "submit",
                            {JobFile("escape.json", escape), server_, "--token=tok-a"});
  EXPECT_EQ(escaped.exit_code, 1);
  EXPECT_THAT(escaped.err,
              HasSubstr("INVALID_ARGUMENT: base_model: '../outside' must not contain '..'"));
  auto cancel =
      RunCommand(client::CancelCommand, "cancel", {"j-0000000000000000", server_, "--token=tok-a"});
  EXPECT_EQ(cancel.exit_code, 1);
  EXPECT_THAT(cancel.err, HasSubstr("NOT_FOUND"));
}

TEST_F(CliTest, SubmitWatchExitsZeroOnlyWhenTheJobSucceeds) {
  std::thread worker([&] { RunWorkerUntilIdle(&coordinator_, 10); });
  std::string spec = ExampleJobJson();
  spec.replace(spec.find("\"workers\": 2"), 12, "\"workers\": 1");
  auto result = RunCommand(client::SubmitCommand, "submit",
                           {JobFile("job.json", spec), server_, "--token=tok-a", "--watch"});
  worker.join();
  EXPECT_EQ(result.exit_code, 0) << result.err;
  std::vector<std::string> lines = absl::StrSplit(result.out, '\n');
  ASSERT_GT(lines.size(), 5u);
  const std::string job_id = lines[0];
  EXPECT_THAT(job_id, StartsWith("j-"));
  EXPECT_THAT(result.out, HasSubstr("state HARVESTING"));
  EXPECT_THAT(result.out, HasSubstr("tokens/s"));  // plain progress lines (not a terminal)
  EXPECT_THAT(result.out, HasSubstr("state SUCCEEDED"));

  auto latents = RunCommand(client::LatentsCommand, "latents",
                            {job_id, server_, "--token=tok-a", "--tag=finetune_only"});
  ASSERT_EQ(latents.exit_code, 0) << latents.err;
  EXPECT_THAT(latents.out, HasSubstr("0\t0.0500"));
  EXPECT_THAT(latents.out, ::testing::Not(HasSubstr("shared")));
  auto report = RunCommand(client::ReportCommand, "report",
                           {job_id, server_, "--token=tok-a", "--format=md"});
  ASSERT_EQ(report.exit_code, 0) << report.err;
  EXPECT_EQ(report.out, "# report\n");
  const std::string out_dir = coordinator_.root() + "/report-out";
  auto saved = RunCommand(client::ReportCommand, "report",
                          {job_id, server_, "--token=tok-a", "--out", out_dir});
  ASSERT_EQ(saved.exit_code, 0) << saved.err;
  EXPECT_THAT(saved.out, HasSubstr(out_dir + "/report.html"));
  auto watch = RunCommand(client::WatchCommand, "watch", {job_id, server_, "--token=tok-a"});
  EXPECT_EQ(watch.exit_code, 0) << watch.err;
}

TEST_F(CliTest, WatchOfACancelledJobExitsNonZero) {
  auto submitted = RunCommand(client::SubmitCommand, "submit",
                              {JobFile("job.json", ExampleJobJson()), server_, "--token=tok-a"});
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::string job_id = submitted.out.substr(0, submitted.out.find('\n'));
  auto unreachable = RunCommand(client::SubmitCommand, "submit",
                                {JobFile("job.json", ExampleJobJson()), "--server=127.0.0.1:1",
                                 "--token=tok-a", "--timeout-ms=300"});
  EXPECT_EQ(unreachable.exit_code, 1);
  EXPECT_THAT(unreachable.err, HasSubstr("(coordinator 127.0.0.1:1)"));
  auto cancel = RunCommand(client::CancelCommand, "cancel",
                           {job_id, server_, "--token=tok-a", "--reason=changed my mind"});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_EQ(cancel.out, job_id + " CANCELLED\n");
  auto watch = RunCommand(client::WatchCommand, "watch", {job_id, server_, "--token=tok-a"});
  EXPECT_EQ(watch.exit_code, 1);
  EXPECT_THAT(watch.err, HasSubstr("CANCELLED: cancelled: changed my mind"));
}

}  // namespace
}  // namespace crossdiff::testing
