// Activation store shards (DESIGN.md 3.2): writing while harvesting, reading for training.
//
// Each shard `shard-NNNNNN.safetensors` holds `activations` [rows, n_models, d_model] (F32 or BF16),
// `token_ids` [rows] I32, `sequence_ids` [rows] I64, `positions` [rows] I32. The manifest is written
// last, so a store without a manifest (an interrupted harvest) never reads as complete.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "core/activations/manifest.h"
#include "core/tensor_io/safetensors.h"

namespace crossdiff::activations {

// Rows of a store in memory. `activations` is [rows, n_models, d_model].
struct ActivationBatch {
  at::Tensor activations;
  at::Tensor token_ids;     // I32 [rows]
  at::Tensor sequence_ids;  // I64 [rows]
  at::Tensor positions;     // I32 [rows]
  int64_t rows() const { return activations.defined() ? activations.size(0) : 0; }
};

// Streams rows into fixed-size shards; memory is bounded by one shard. Not thread-safe.
class StoreWriter {
 public:
  struct Options {
    std::vector<std::string> models;
    int layer = 0;
    int64_t d_model = 0;
    std::string dtype = "float32";  // or "bfloat16"
    int64_t rows_per_shard = 65536;
    std::string extra_json = "{}";
    // First shard number and file prefix, so several writers can fill one store (sharded harvest).
    int64_t first_shard_index = 0;
    std::string shard_prefix = "shard-";
  };
  // Creates DIR (must not hold a manifest already: FAILED_PRECONDITION).
  static absl::StatusOr<std::unique_ptr<StoreWriter>> Create(const std::string& dir, Options opts);
  // Appends rows; shapes and dtypes are checked (INVALID_ARGUMENT naming the field).
  absl::Status Append(const ActivationBatch& batch);
  // Flushes the last shard. With `write_manifest` (the default) writes manifest.json last.
  absl::StatusOr<Manifest> Finish(bool write_manifest = true);
  int64_t rows_written() const { return rows_written_; }

 private:
  StoreWriter() = default;
  absl::Status FlushShard();
  std::string dir_;
  Options opts_;
  std::vector<ActivationBatch> pending_;
  int64_t pending_rows_ = 0;
  int64_t rows_written_ = 0;
  int64_t next_shard_ = 0;
  std::vector<ShardInfo> shards_;
};

// Opens a complete store and validates every shard against the manifest (names, dtypes, shapes,
// row counts) before use. Thread-safe for concurrent ReadShard calls.
class StoreReader {
 public:
  static absl::StatusOr<std::unique_ptr<StoreReader>> Open(const std::string& dir);
  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }
  int64_t num_shards() const { return static_cast<int64_t>(manifest_.shards.size()); }
  // Loads shard i. Activations keep their stored dtype unless `as_float` (then float32).
  absl::StatusOr<ActivationBatch> ReadShard(int64_t shard, bool as_float = true) const;
  // Rows [begin, end) across shards (global row numbering), as float32.
  absl::StatusOr<ActivationBatch> ReadRows(int64_t begin, int64_t end) const;

 private:
  std::string dir_;
  Manifest manifest_;
  std::vector<std::unique_ptr<tensor_io::SafetensorsFile>> files_;
  std::vector<int64_t> shard_start_;  // global index of each shard's first row
};

}  // namespace crossdiff::activations
