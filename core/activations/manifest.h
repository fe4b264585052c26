// The activation store's manifest.json (DESIGN.md 3.2, a contract). No LibTorch.
//
// {"format": "crossdiff.activations", "version": 1, "models": ["<base>", "<finetune>"],
//  "layer": 13, "site": "resid_post", "d_model": 2304, "dtype": "bfloat16", "rows": 1048576,
//  "shards": [{"file": "shard-000000.safetensors", "rows": 65536}]}
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::activations {

inline constexpr char kManifestFormat[] = "crossdiff.activations";
inline constexpr int kManifestVersion = 1;

struct ShardInfo {
  std::string file;  // relative to the store directory
  int64_t rows = 0;
};

struct Manifest {
  std::vector<std::string> models;  // [base, finetune, ...]
  int layer = 0;
  std::string site = "resid_post";
  int64_t d_model = 0;
  std::string dtype = "float32";  // "float32" or "bfloat16"
  int64_t rows = 0;
  std::vector<ShardInfo> shards;
  // Optional provenance (dataset path, seq_len, tokenizer of the first model, ...), kept as JSON text.
  std::string extra_json = "{}";

  // Reads and validates DIR/manifest.json: format, version, dtype, positive d_model, rows == sum of
  // shard rows, shard names without path separators. Errors name the file and the field.
  static absl::StatusOr<Manifest> Load(const std::string& dir);
  // Writes DIR/manifest.json atomically (tmp file + rename).
  absl::Status Save(const std::string& dir) const;
  std::string ToJson() const;
};

}  // namespace crossdiff::activations
