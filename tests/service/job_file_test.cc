// Job file parsing (JSON and YAML) and the field rules shared by the CLI and the coordinator.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "proto/jobspec/job_file.h"
#include "proto/jobspec/job_spec_validation.h"
#include "tests/service/coordinator_process.h"

namespace crossdiff::testing {
namespace {

using ::testing::HasSubstr;

absl::Status Check(v1::JobSpec spec) {
  jobspec::ApplyDefaults(spec);
  return jobspec::ValidateJobSpec(spec);
}

TEST(JobFileTest, TheIssueExampleParsesAndValidates) {
  auto spec = jobspec::ParseJobJson(ExampleJobJson(), "job.json");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->harvest().max_tokens(), 20000);
  EXPECT_EQ(spec->crosscoder().architecture(), "batch_top_k");
  EXPECT_DOUBLE_EQ(spec->crosscoder().lr(), 0.004);
  EXPECT_EQ(spec->workers(), 2);
  EXPECT_TRUE(Check(*spec).ok());
}

TEST(JobFileTest, CamelCaseNamesAreAcceptedToo) {
  auto spec = jobspec::ParseJobJson(R"({"name": "x", "harvest": {"maxTokens": "5"}})", "job.json");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->harvest().max_tokens(), 5);
}

TEST(JobFileTest, YamlScalarsKeepTheirMeaning) {
  auto json = jobspec::YamlToJson(
      "name: \"007\"\nlayer: 3\ncrosscoder:\n  lr: 1e-4\nlabels:\n  flag: 'true'\n  other: yes\n", "job.yaml");
  ASSERT_TRUE(json.ok()) << json.status();
  auto spec = jobspec::ParseJobJson(*json, "job.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "007");
  EXPECT_EQ(spec->layer(), 3);
  EXPECT_DOUBLE_EQ(spec->crosscoder().lr(), 1e-4);
  EXPECT_EQ(spec->labels().at("flag"), "true");
  EXPECT_EQ(spec->labels().at("other"), "yes");
}

TEST(JobFileTest, ErrorsNameTheFileAndTheProblem) {
  auto typo = jobspec::ParseJobJson(R"({"name": "x", "harvest": {"max_tokes": 5}})", "job.json");
  EXPECT_EQ(typo.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(typo.status().message()), HasSubstr("job.json: "));
  EXPECT_THAT(std::string(typo.status().message()), HasSubstr("max_tokes"));
  auto wrong_type = jobspec::ParseJobJson(R"({"name": "x", "layer": "one"})", "job.json");
  EXPECT_EQ(wrong_type.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_yaml = jobspec::YamlToJson("name: [unclosed\n", "job.yaml");
  EXPECT_EQ(bad_yaml.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_yaml.status().message()), HasSubstr("job.yaml:"));
}

TEST(JobSpecValidationTest, DefaultsAreFilledIn) {
  v1::JobSpec spec = ExampleJobSpec();
  spec.clear_crosscoder();
  spec.mutable_crosscoder()->set_dict_size(16);
  spec.clear_workers();
  jobspec::ApplyDefaults(spec);
  EXPECT_EQ(spec.crosscoder().architecture(), "batch_top_k");
  EXPECT_EQ(spec.crosscoder().k(), 16);  // min(32, dict_size)
  EXPECT_EQ(spec.crosscoder().steps(), 1000);
  EXPECT_EQ(spec.workers(), 1);
  EXPECT_EQ(spec.dataset().format(), "text");
  EXPECT_TRUE(jobspec::ValidateJobSpec(spec).ok());
}

TEST(JobSpecValidationTest, EachRuleNamesItsField) {
  struct Case {
    void (*mutate)(v1::JobSpec&);
    const char* message;
  };
  const Case cases[] = {
      {[](v1::JobSpec& s) { s.set_name("has space"); }, "name: only letters"},
      {[](v1::JobSpec& s) { s.clear_base_model(); }, "base_model: required"},
      {[](v1::JobSpec& s) { s.mutable_dataset()->clear_path(); }, "dataset.path: required"},
      {[](v1::JobSpec& s) { s.set_layer(-1); }, "layer: must be >= 0"},
      {[](v1::JobSpec& s) { s.mutable_harvest()->set_max_tokens(-5); }, "harvest.max_tokens"},
      {[](v1::JobSpec& s) { s.mutable_harvest()->set_seq_len(70000); }, "harvest.seq_len"},
      {[](v1::JobSpec& s) { s.mutable_crosscoder()->set_architecture("topk"); }, "crosscoder.architecture"},
      {[](v1::JobSpec& s) { s.mutable_crosscoder()->set_k(257); },
       "crosscoder.k: must be between 1 and dict_size (256), got 257"},
      {[](v1::JobSpec& s) { s.mutable_crosscoder()->set_lr(-1); }, "crosscoder.lr"},
      {[](v1::JobSpec& s) { s.set_workers(-2); }, "workers: must be >= 1"},
      {[](v1::JobSpec& s) {
         s.mutable_crosscoder()->set_parallelism("latent");
         s.set_workers(3);
       },
       "crosscoder.dict_size: must be divisible by workers (3)"},
  };
  for (const auto& c : cases) {
    v1::JobSpec spec = ExampleJobSpec();
    c.mutate(spec);
    absl::Status status = Check(spec);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace crossdiff::testing
