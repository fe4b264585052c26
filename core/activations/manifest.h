// The activation store's manifest.json (DESIGN.md 3.2, a contract). No LibTorch.
//
// {"format": "crossdiff.activations", "version": 1, "models": ["<base>", "<finetune>"],
//  "layer": 13, "site": "resid_post", "d_model": 2304, "dtype": "bfloat16", "rows": 1048576,
//  "shards": [{"file": "shard-000000.safetensors", "rows": 65536}], "extra": {...}}
//
// `extra` (optional, an object) carries provenance; unknown top-level keys are ignored on load so
// later versions can add fields. See docs/activation-store.md. Plain value type, no shared state.
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
  // Optional provenance (dataset path, seq_len, tokenizer of the first model, ...), kept as JSON
  // text.
  std::string extra_json = "{}";

  int64_t n_models() const { return static_cast<int64_t>(models.size()); }

  // Reads and validates DIR/manifest.json: format, version, dtype, positive d_model, rows == sum of
  // shard rows, shard names without path separators. Errors name the file and the field.
  // A missing manifest is NOT_FOUND ("incomplete store"); a malformed one INVALID_ARGUMENT.
  static absl::StatusOr<Manifest> Load(const std::string& dir);
  // As Load() for any file name (e.g. the partial manifests of a sharded harvest).
  static absl::StatusOr<Manifest> LoadFile(const std::string& path);
  // Parses and validates manifest JSON text; `source` names it in errors.
  static absl::StatusOr<Manifest> FromJson(const std::string& text, const std::string& source);
  // Validates the fields (the same checks as Load); `source` names the manifest in errors.
  absl::Status Validate(const std::string& source) const;
  // Writes DIR/manifest.json atomically (tmp file + fsync + rename).
  absl::Status Save(const std::string& dir) const;
  // As Save() to any path.
  absl::Status SaveFile(const std::string& path) const;
  std::string ToJson() const;
};

// Joins the manifests of the parts of a sharded harvest (each written by a StoreWriter with its
// own first_shard_index / shard_prefix and Finish(false)) into the manifest of the whole store,
// shards in the order given. Parts must agree on models, layer, site, d_model and dtype, and
// shard file names must be unique (INVALID_ARGUMENT naming the part otherwise). `extra` is taken
// from the first part.
absl::StatusOr<Manifest> MergeManifests(const std::vector<Manifest>& parts);

}  // namespace crossdiff::activations
