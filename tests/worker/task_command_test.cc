#include "worker/task_command.h"

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/worker.h"

namespace crossdiff::worker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The value following `--flag` in argv, or "<absent>".
std::string FlagValue(const std::vector<std::string>& argv, const std::string& flag) {
  auto it = std::find(argv.begin(), argv.end(), "--" + flag);
  if (it == argv.end() || it + 1 == argv.end()) return "<absent>";
  return *(it + 1);
}

CommandContext Ctx() {
  CommandContext ctx;
  ctx.crossdiff_binary = "/bin/crossdiff";
  return ctx;
}

v1::Task BaseTask() {
  v1::Task t;
  t.set_task_id("t-1");
  t.set_job_id("j-1");
  auto* spec = t.mutable_spec();
  spec->set_layer(1);
  spec->mutable_dataset()->set_format("text");
  spec->mutable_harvest()->set_seq_len(64);
  spec->mutable_harvest()->set_batch_size(8);
  spec->mutable_harvest()->set_dtype("float32");
  spec->mutable_crosscoder()->set_architecture("batch_top_k");
  spec->mutable_crosscoder()->set_dict_size(256);
  spec->mutable_crosscoder()->set_k(8);
  spec->mutable_crosscoder()->set_steps(300);
  spec->mutable_crosscoder()->set_batch_size(256);
  spec->mutable_crosscoder()->set_lr(0.004);
  t.mutable_inputs()->set_base_model("/data/models/base");
  t.mutable_inputs()->set_finetune_model("/data/models/ft");
  t.mutable_inputs()->set_dataset("/data/train.jsonl");
  return t;
}

TEST(TaskCommandTest, HarvestTaskCarriesItsSequenceRangeAndSpec) {
  v1::Task t = BaseTask();
  t.set_kind(v1::TASK_KIND_HARVEST);
  t.mutable_harvest()->set_sequence_begin(10);
  t.mutable_harvest()->set_sequence_end(20);
  t.mutable_harvest()->set_output_dir("/store/parts/part-1");
  CommandContext ctx = Ctx();
  ctx.threads = 1;
  auto argv = BuildTaskCommand(t, ctx);
  ASSERT_TRUE(argv.ok()) << argv.status();
  EXPECT_EQ((*argv)[0], "/bin/crossdiff");
  EXPECT_EQ((*argv)[1], "harvest");
  EXPECT_EQ(FlagValue(*argv, "base"), "/data/models/base");
  EXPECT_EQ(FlagValue(*argv, "finetune"), "/data/models/ft");
  EXPECT_EQ(FlagValue(*argv, "layer"), "1");
  EXPECT_EQ(FlagValue(*argv, "sequence-begin"), "10");
  EXPECT_EQ(FlagValue(*argv, "sequence-end"), "20");
  EXPECT_EQ(FlagValue(*argv, "seq-len"), "64");
  EXPECT_EQ(FlagValue(*argv, "out"), "/store/parts/part-1");
  EXPECT_EQ(FlagValue(*argv, "threads"), "1");
  EXPECT_EQ(TaskOutputDir(t), "/store/parts/part-1");
}

TEST(TaskCommandTest, HarvestTaskWithEmptyRangeIsRejected) {
  v1::Task t = BaseTask();
  t.set_kind(v1::TASK_KIND_HARVEST);
  t.mutable_harvest()->set_sequence_begin(5);
  t.mutable_harvest()->set_sequence_end(5);
  t.mutable_harvest()->set_output_dir("/x");
  auto argv = BuildTaskCommand(t, Ctx());
  EXPECT_EQ(argv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(argv.status().message(), HasSubstr("empty sequence range [5, 5)"));
}

TEST(TaskCommandTest, MergeListsPartsInOrder) {
  v1::Task t = BaseTask();
  t.set_kind(v1::TASK_KIND_MERGE);
  t.mutable_merge()->add_part_dirs("/p0");
  t.mutable_merge()->add_part_dirs("/p1");
  t.mutable_merge()->set_output_dir("/store");
  auto argv = BuildTaskCommand(t, Ctx());
  ASSERT_TRUE(argv.ok());
  EXPECT_THAT(*argv, ElementsAre("/bin/crossdiff", "merge-stores", "--out", "/store", "/p0", "/p1"));
}

TEST(TaskCommandTest, TrainGangRankGetsRendezvousAndCrosscoderFlags) {
  v1::Task t = BaseTask();
  t.set_kind(v1::TASK_KIND_TRAIN);
  t.mutable_train()->set_activations_dir("/store");
  t.mutable_train()->set_output_dir("/nonexistent/crosscoder");
  t.mutable_train()->mutable_rendezvous()->set_rank(1);
  t.mutable_train()->mutable_rendezvous()->set_world_size(2);
  CommandContext ctx = Ctx();
  ctx.rendezvous = "10.0.0.5:29500";
  auto argv = BuildTaskCommand(t, ctx);
  ASSERT_TRUE(argv.ok()) << argv.status();
  EXPECT_EQ((*argv)[1], "train");
  EXPECT_EQ(FlagValue(*argv, "arch"), "batch-topk");
  EXPECT_EQ(FlagValue(*argv, "dict-size"), "256");
  EXPECT_EQ(FlagValue(*argv, "k"), "8");
  EXPECT_EQ(FlagValue(*argv, "lr"), "0.004");
  EXPECT_EQ(FlagValue(*argv, "rank"), "1");
  EXPECT_EQ(FlagValue(*argv, "world-size"), "2");
  EXPECT_EQ(FlagValue(*argv, "rendezvous"), "10.0.0.5:29500");
  EXPECT_EQ(std::count(argv->begin(), argv->end(), "--resume"), 0);

  // Without a rendezvous address a gang rank cannot start.
  ctx.rendezvous.clear();
  EXPECT_THAT(BuildTaskCommand(t, ctx).status().message(), HasSubstr("rendezvous address"));
}

TEST(TaskCommandTest, AnalyzeAndUnknownKinds) {
  v1::Task t = BaseTask();
  t.set_kind(v1::TASK_KIND_ANALYZE);
  t.mutable_analyze()->set_crosscoder_dir("/cc");
  t.mutable_analyze()->set_activations_dir("/store");
  t.mutable_analyze()->set_output_dir("/report");
  auto argv = BuildTaskCommand(t, Ctx());
  ASSERT_TRUE(argv.ok());
  EXPECT_EQ(FlagValue(*argv, "crosscoder"), "/cc");
  EXPECT_EQ(FlagValue(*argv, "out"), "/report");

  v1::Task empty;
  empty.set_task_id("t-9");
  EXPECT_THAT(BuildTaskCommand(empty, Ctx()).status().message(),
              HasSubstr("unknown task kind"));
}

TEST(TaskCommandTest, TrainingDetailParsesIntoMetrics) {
  v1::TrainingMetrics m = ParseTrainingDetail("loss 0.25 fvu 0.1/0.3 l0 7.5 dead 4", 120);
  EXPECT_EQ(m.step(), 120);
  EXPECT_DOUBLE_EQ(m.loss(), 0.25);
  ASSERT_EQ(m.fvu_size(), 2);
  EXPECT_DOUBLE_EQ(m.fvu(1), 0.3);
  EXPECT_DOUBLE_EQ(m.l0(), 7.5);
  EXPECT_EQ(m.dead_latents(), 4);
}

}  // namespace
}  // namespace crossdiff::worker
