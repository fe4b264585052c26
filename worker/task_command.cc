#include "worker/task_command.h"

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace crossdiff::worker {
namespace {

void AddFlag(std::vector<std::string>& argv, const std::string& name, const std::string& value) {
  argv.push_back("--" + name);
  argv.push_back(value);
}

std::string FormatDouble(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string ArchitectureFlag(const std::string& arch) {
  // Job files use the checkpoint's names (batch_top_k / relu_l1); the CLI uses dashes.
  if (arch == "relu_l1" || arch == "relu-l1") return "relu-l1";
  return "batch-topk";
}

}  // namespace

std::string TaskOutputDir(const v1::Task& task) {
  switch (task.params_case()) {
    case v1::Task::kHarvest:
      return task.harvest().output_dir();
    case v1::Task::kMerge:
      return task.merge().output_dir();
    case v1::Task::kTrain:
      return task.train().output_dir();
    case v1::Task::kAnalyze:
      return task.analyze().output_dir();
    default:
      return "";
  }
}

absl::StatusOr<std::vector<std::string>> BuildTaskCommand(const v1::Task& task,
                                                          const CommandContext& ctx) {
  std::vector<std::string> argv{ctx.crossdiff_binary};
  const v1::JobSpec& spec = task.spec();
  auto missing = [&](const char* field) {
    return absl::InvalidArgumentError(
        absl::StrCat("task ", task.task_id(), ": ", field, " is empty"));
  };
  auto add_threads = [&] {
    if (ctx.threads > 0) AddFlag(argv, "threads", std::to_string(ctx.threads));
  };
  switch (task.params_case()) {
    case v1::Task::kHarvest: {
      const auto& h = task.harvest();
      if (task.inputs().base_model().empty()) return missing("inputs.base_model");
      if (task.inputs().finetune_model().empty()) return missing("inputs.finetune_model");
      if (task.inputs().dataset().empty()) return missing("inputs.dataset");
      if (h.output_dir().empty()) return missing("harvest.output_dir");
      if (h.sequence_end() <= h.sequence_begin()) {
        return absl::InvalidArgumentError(absl::StrCat("task ", task.task_id(),
                                                       ": empty sequence range [",
                                                       h.sequence_begin(), ", ",
                                                       h.sequence_end(), ")"));
      }
      argv.push_back("harvest");
      AddFlag(argv, "base", task.inputs().base_model());
      AddFlag(argv, "finetune", task.inputs().finetune_model());
      AddFlag(argv, "data", task.inputs().dataset());
      if (!spec.dataset().format().empty()) AddFlag(argv, "data-format", spec.dataset().format());
      AddFlag(argv, "layer", std::to_string(spec.layer()));
      AddFlag(argv, "out", h.output_dir());
      if (spec.harvest().seq_len() > 0) {
        AddFlag(argv, "seq-len", std::to_string(spec.harvest().seq_len()));
      }
      if (spec.harvest().batch_size() > 0) {
        AddFlag(argv, "batch", std::to_string(spec.harvest().batch_size()));
      }
      if (!spec.harvest().dtype().empty()) AddFlag(argv, "dtype", spec.harvest().dtype());
      AddFlag(argv, "sequence-begin", std::to_string(h.sequence_begin()));
      AddFlag(argv, "sequence-end", std::to_string(h.sequence_end()));
      AddFlag(argv, "device", ctx.device);
      add_threads();
      return argv;
    }
    case v1::Task::kMerge: {
      const auto& m = task.merge();
      if (m.output_dir().empty()) return missing("merge.output_dir");
      if (m.part_dirs().empty()) return missing("merge.part_dirs");
      argv.push_back("merge-stores");
      AddFlag(argv, "out", m.output_dir());
      for (const auto& p : m.part_dirs()) argv.push_back(p);
      return argv;
    }
    case v1::Task::kTrain: {
      const auto& t = task.train();
      const auto& cc = spec.crosscoder();
      if (t.activations_dir().empty()) return missing("train.activations_dir");
      if (t.output_dir().empty()) return missing("train.output_dir");
      argv.push_back("train");
      AddFlag(argv, "activations", t.activations_dir());
      AddFlag(argv, "out", t.output_dir());
      AddFlag(argv, "arch", ArchitectureFlag(cc.architecture()));
      if (cc.dict_size() > 0) AddFlag(argv, "dict-size", std::to_string(cc.dict_size()));
      if (cc.k() > 0) AddFlag(argv, "k", std::to_string(cc.k()));
      if (cc.steps() > 0) AddFlag(argv, "steps", std::to_string(cc.steps()));
      if (cc.batch_size() > 0) AddFlag(argv, "batch", std::to_string(cc.batch_size()));
      if (cc.lr() > 0) AddFlag(argv, "lr", FormatDouble(cc.lr()));
      AddFlag(argv, "seed", std::to_string(cc.seed()));
      if (cc.l1_coefficient() > 0) AddFlag(argv, "l1-coeff", FormatDouble(cc.l1_coefficient()));
      if (cc.checkpoint_every() > 0) {
        AddFlag(argv, "checkpoint-every", std::to_string(cc.checkpoint_every()));
      }
      // A checkpoint left by an earlier attempt is continued, not overwritten.
      if (std::filesystem::exists(std::filesystem::path(t.output_dir()) / "checkpoint")) {
        argv.push_back("--resume");
      }
      const auto& rv = t.rendezvous();
      if (rv.world_size() > 1) {
        if (ctx.rendezvous.empty()) return missing("rendezvous address");
        AddFlag(argv, "rank", std::to_string(rv.rank()));
        AddFlag(argv, "world-size", std::to_string(rv.world_size()));
        AddFlag(argv, "rendezvous", ctx.rendezvous);
        if (cc.parallelism() == "latent") AddFlag(argv, "sharding", "latent");
      }
      add_threads();
      return argv;
    }
    case v1::Task::kAnalyze: {
      const auto& a = task.analyze();
      if (a.crosscoder_dir().empty()) return missing("analyze.crosscoder_dir");
      if (a.activations_dir().empty()) return missing("analyze.activations_dir");
      if (a.output_dir().empty()) return missing("analyze.output_dir");
      argv.push_back("analyze");
      AddFlag(argv, "crosscoder", a.crosscoder_dir());
      AddFlag(argv, "activations", a.activations_dir());
      AddFlag(argv, "out", a.output_dir());
      if (!task.inputs().probes().empty()) AddFlag(argv, "categories", task.inputs().probes());
      return argv;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("task ", task.task_id(), ": unknown task kind ", task.kind()));
  }
}

}  // namespace crossdiff::worker
