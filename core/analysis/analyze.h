// The diff analysis (DESIGN.md 3.5 and section 4): one streaming pass over an activation store with
// a trained crosscoder, producing the per-latent statistics, tags, latent scaling, top activating
// examples with context and the capability attribution. `crossdiff analyze` and the worker daemon's
// analysis task both call RunAnalysis.
//
// Memory is bounded whatever the store size: rows are read `batch_rows` at a time, the top examples
// are a [top_k, F] table merged batch by batch, and the context windows are read afterwards from
// the memory-mapped shards.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/status/statusor.h"
#include "core/analysis/report.h"
#include "core/common/progress.h"

namespace crossdiff::analysis {

enum class LatentScalingScope {
  kModelSpecific,  // latents tagged finetune_only or base_only (the default)
  kAll,            // every latent
  kNone,
};

struct AnalyzeOptions {
  std::string crosscoder_dir;   // DIR with crosscoder.safetensors + config.json (DESIGN.md 3.3)
  std::string activations_dir;  // activation store (DESIGN.md 3.2)
  // When non-empty, RunAnalysis also writes report.json / report.md / report.html there.
  std::string out_dir;

  int64_t batch_rows = 4096;   // rows encoded at a time
  int64_t max_rows = 0;        // analyse only the first max_rows rows; 0: all
  int64_t top_k = 10;          // top activating examples kept per latent
  int64_t context_tokens = 8;  // tokens kept on each side of an example's token
  LatentScalingScope latent_scaling = LatentScalingScope::kModelSpecific;

  // Optional JSON file of probe categories for capability attribution (docs/report.md):
  //   {"math": [3, 17, 20], "code": {"substrings": ["def ", "return "]}, ...}
  // A category maps to a list of sequence ids, a list of substrings (matched against each
  // sequence's decoded text; needs a tokenizer) or an object with "sequence_ids" and/or
  // "substrings".
  std::string categories_file;
  // Model directory whose tokenizer decodes the example contexts. Empty: found from the store's
  // manifest (extra "tokenizer_dir", "base_dir", "base_model_dir", or the first model name when it
  // is a directory); no decoded text when none is found. An explicit directory that fails to load
  // is an error.
  std::string tokenizer_dir;

  // Batches whose latent density (fraction of non-zero activations) is at most this are decoded
  // with a sparse product (cost proportional to the active latents) instead of the dense decoder
  // matmul.
  double sparse_decode_max_density = 0.05;

  int threads = 0;               // intra-op threads; 0 leaves LibTorch's setting
  FILE* progress_out = nullptr;  // where the progress line is printed (nullptr: not printed)
};

// Runs the analysis. `progress` (may be empty) receives "analyze" updates in tokens.
// Errors: NOT_FOUND for a missing crosscoder or store directory; INVALID_ARGUMENT when the store
// does not match the crosscoder (d_model, number of models), the crosscoder is not a two-model
// (base, fine-tune) one, options are out of range, or the categories file is malformed (naming the
// file and the category); FAILED_PRECONDITION for substring categories without a tokenizer; errors
// of the store reader, checkpoint loader and report writer as they come.
absl::StatusOr<Report> RunAnalysis(const AnalyzeOptions& options, ProgressMeter::Callback progress);

}  // namespace crossdiff::analysis
