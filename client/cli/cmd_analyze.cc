// `crossdiff analyze --crosscoder DIR --activations STORE --out DIR` (DESIGN.md 3.1): the diff
// report.
#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "core/analysis/analyze.h"
#include "core/common/cli_args.h"

namespace crossdiff::cli {

int RunAnalyze(int argc, char** argv) {
  CommandLine cl(
      "crossdiff analyze",
      "analyses an activation store with a trained crosscoder and writes the diff report "
      "(report.json, report.md, report.html; see docs/report.md)");
  auto& crosscoder = cl.AddString(
      "crosscoder", "", "crosscoder directory (crosscoder.safetensors + config.json)", true);
  auto& store = cl.AddString("activations", "", "activation store directory", true);
  auto& out = cl.AddString("out", "", "output directory for the report", true);
  auto& categories = cl.AddString(
      "categories", "",
      "JSON file of probe categories for capability attribution: "
      "{\"name\": [sequence ids] | [substrings] | {\"sequence_ids\": [..], \"substrings\": [..]}}");
  auto& tokenizer =
      cl.AddString("tokenizer", "",
                   "model directory whose tokenizer decodes example contexts (default: "
                   "found from the store's manifest)");
  auto& scaling = cl.AddString("latent-scaling", "model-specific",
                               "latents that get latent scaling (nu): model-specific, all or none");
  auto& batch = cl.AddInt("batch", 4096, "rows encoded at a time");
  auto& top_k = cl.AddInt("top-k", 10, "top activating examples kept per latent");
  auto& context = cl.AddInt("context", 8, "tokens of context on each side of an example");
  auto& max_rows = cl.AddInt("max-rows", 0, "analyse only the first N rows (0: all)");
  auto& threads = cl.AddInt("threads", 0, "intra-op threads (0: LibTorch's default)");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;

#ifdef CROSSDIFF_HAVE_ANALYSIS
  analysis::AnalyzeOptions o;
  o.crosscoder_dir = crosscoder;
  o.activations_dir = store;
  o.out_dir = out;
  o.categories_file = categories;
  o.tokenizer_dir = tokenizer;
  o.batch_rows = batch;
  o.top_k = top_k;
  o.context_tokens = context;
  o.max_rows = max_rows;
  o.threads = static_cast<int>(threads);
  o.progress_out = stderr;
  if (scaling == "model-specific") {
    o.latent_scaling = analysis::LatentScalingScope::kModelSpecific;
  } else if (scaling == "all") {
    o.latent_scaling = analysis::LatentScalingScope::kAll;
  } else if (scaling == "none") {
    o.latent_scaling = analysis::LatentScalingScope::kNone;
  } else {
    std::fprintf(stderr,
                 "error: --latent-scaling: expected model-specific, all or none, got '%s'\n",
                 scaling.c_str());
    return 2;
  }
  auto report = analysis::RunAnalysis(o, {});
  if (!report.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  const auto& c = report->summary.counts;
  auto count = [&](const char* tag) {
    auto it = c.find(tag);
    return it == c.end() ? int64_t{0} : it->second;
  };
  std::printf("%s", absl::StrFormat(
                        "wrote %s/report.json, report.md, report.html: %d latents "
                        "(%d finetune_only, %d base_only, %d shared, %d other) over %d rows\n",
                        out, report->summary.num_latents, count("finetune_only"),
                        count("base_only"), count("shared"), count("other"), report->summary.rows)
                        .c_str());
  return 0;
#else
  (void)crosscoder, (void)store, (void)out, (void)categories, (void)tokenizer, (void)scaling;
  (void)batch, (void)top_k, (void)context, (void)max_rows, (void)threads;
  std::fprintf(stderr,
               "error: crossdiff analyze: this build has no analysis engine (core/crosscoder "
               "or core/activations missing)\n");
  return 1;
#endif
}

}  // namespace crossdiff::cli
