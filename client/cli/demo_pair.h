// The demo's model pair, made from the golden Llama fixture (DESIGN.md 6): a base model and a
// "fine-tune" that differ in known ways, a byte-level BPE tokenizer that fits their 512-token
// vocabulary (the fixture tokenizer truncated to 512 ids), and a small text dataset.
//
// The base model carries one planted direction on the embeddings of tokens typical of licence text;
// the fine-tune drops it and carries another on tokens typical of assistant/instruction text, plus a
// small shared drift of its first MLP. A crosscoder trained on the pair should find base-only and
// fine-tune-only latents for those token groups.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace crossdiff::cli {

struct DemoPairPaths {
  std::string base_dir;       // DATA_ROOT/models/base
  std::string finetune_dir;   // DATA_ROOT/models/finetune
  std::string dataset;        // DATA_ROOT/data/demo.jsonl
  std::string probes;         // DATA_ROOT/data/categories.json (capability categories)
};

// Writes the pair under `data_root` (created if needed). `fixtures_dir` is ../shared/fixtures.
absl::Status MakeDemoPair(const std::string& fixtures_dir, const std::string& data_root,
                          DemoPairPaths* paths);

// Where the fixtures are: $CROSSDIFF_FIXTURES, else the directory the build was configured with.
std::string DefaultFixturesDir();

}  // namespace crossdiff::cli
