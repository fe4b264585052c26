// Activation store shards (DESIGN.md 3.2): writing while harvesting, reading for training.
//
// Each shard `shard-NNNNNN.safetensors` holds `activations` [rows, n_models, d_model] (F32 or
// BF16), `token_ids` [rows] I32, `sequence_ids` [rows] I64, `positions` [rows] I32. The manifest is
// written last, so a store without a manifest (an interrupted harvest) never reads as complete.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

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

// Streams rows into fixed-size shards: activations go to the open shard's temporary file as they are
// appended (memory: the batch being appended, and 16 bytes of ids per row of the open shard). Every
// shard is installed atomically (tmp + fsync + rename) as soon as it is full, and the manifest
// last, so an interrupted harvest leaves shards (and perhaps a `.tmp-PID` file) but no manifest:
// it never reads as complete. Activations are converted to the store dtype, token_ids/positions to I32 and
// sequence_ids to I64 (values outside int32 are INVALID_ARGUMENT). Not thread-safe.
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
  // Without it (one part of a sharded harvest) returns the part's manifest for MergeManifests().
  // A store with 0 rows gets a valid manifest with no shards (readers decide if that is an error).
  // Calling Append or Finish after Finish is FAILED_PRECONDITION.
  absl::StatusOr<Manifest> Finish(bool write_manifest = true);
  // Rows appended so far (written to shards or pending).
  int64_t rows_written() const { return rows_written_; }
  const std::string& dir() const { return dir_; }

 private:
  StoreWriter() = default;
  absl::Status OpenShard();
  absl::Status FinishShard();
  std::string dir_;
  Options opts_;
  std::unique_ptr<tensor_io::SafetensorsRowWriter> shard_;  // the open shard, if any
  std::string shard_file_;
  int64_t rows_written_ = 0;
  int64_t next_shard_ = 0;
  std::vector<ShardInfo> shards_;
  bool finished_ = false;
};

// Opens a complete store and validates every shard against the manifest (names, dtypes, shapes,
// row counts) before use. Shards are memory-mapped; every read copies into new tensors and then
// drops the mapped pages it touched, so resident memory does not grow with the store.
// Thread-safe: all const methods may be called concurrently.
//
// Open() errors: NOT_FOUND when manifest.json is missing (incomplete store) or a shard file is
// missing; INVALID_ARGUMENT naming the file and field for anything malformed (a shard whose
// `activations` dtype differs from the manifest's, shape other than [rows, n_models, d_model],
// token_ids/positions not I32 [rows], sequence_ids not I64 [rows], missing tensors).
// A store with one model, or with 0 rows, is valid here: the trainer decides what it accepts.
class StoreReader {
 public:
  static absl::StatusOr<std::unique_ptr<StoreReader>> Open(const std::string& dir);
  const Manifest& manifest() const { return manifest_; }
  const std::string& dir() const { return dir_; }
  int64_t num_shards() const { return static_cast<int64_t>(manifest_.shards.size()); }
  int64_t rows() const { return manifest_.rows; }
  // Global index of the first row of shard i (0 <= i <= num_shards(); i == num_shards() -> rows()).
  int64_t shard_start(int64_t shard) const { return shard_start_[shard]; }
  // Loads shard i. Activations keep their stored dtype unless `as_float` (then float32).
  // OUT_OF_RANGE for a bad index.
  absl::StatusOr<ActivationBatch> ReadShard(int64_t shard, bool as_float = true) const;
  // Rows [begin, end) across shards (global row numbering), as float32. OUT_OF_RANGE unless
  // 0 <= begin <= end <= rows().
  absl::StatusOr<ActivationBatch> ReadRows(int64_t begin, int64_t end) const;
  // As ReadRows with the stored dtype kept unless `as_float`.
  absl::StatusOr<ActivationBatch> ReadRows(int64_t begin, int64_t end, bool as_float) const;
  // The given global rows, in the given order (repeats allowed). OUT_OF_RANGE for a bad index.
  absl::StatusOr<ActivationBatch> GatherRows(const std::vector<int64_t>& rows,
                                             bool as_float = true) const;
  // The activations of the given global rows, in order, converted to float32 into `out`
  // ([rows.size(), n_models, d_model], row-major): no other allocation. OUT_OF_RANGE for a bad
  // index.
  absl::Status GatherActivations(const std::vector<int64_t>& rows, float* out) const;
  // Drops the mapped pages of rows [begin, end) (a hint; see SafetensorsFile::ReleasePages).
  void ReleaseRows(int64_t begin, int64_t end) const;
  // Starts reading rows [begin, end) into the page cache in the background (a hint; see
  // SafetensorsFile::PrefetchPages).
  void PrefetchRows(int64_t begin, int64_t end) const;
  // Scans shard i for NaN/Inf activations: INVALID_ARGUMENT naming the shard file, the row within
  // the shard and the global row of the first one found.
  absl::Status CheckFinite(int64_t shard) const;

 private:
  std::string dir_;
  Manifest manifest_;
  std::vector<std::unique_ptr<tensor_io::SafetensorsFile>> files_;
  std::vector<int64_t> shard_start_;  // global index of each shard's first row, then rows()
  // Per shard: where each tensor's bytes start in the mapping (resolved once at Open).
  struct ShardData {
    const uint8_t* activations = nullptr;
    const uint8_t* token_ids = nullptr;
    const uint8_t* sequence_ids = nullptr;
    const uint8_t* positions = nullptr;
    uint64_t activations_offset = 0;  // within the file's data section
  };
  std::vector<ShardData> shard_data_;
  size_t row_bytes_ = 0;  // bytes of one row of `activations` in the stored dtype

  // Shard holding global row `row` (0 <= row < rows()).
  int64_t ShardOf(int64_t row) const;
  // OUT_OF_RANGE naming the first row outside [0, rows()).
  absl::Status CheckRowIndices(const std::vector<int64_t>& rows) const;
  // A batch of `n` rows in the store's dtype, to be filled by ReadRows / GatherRows.
  ActivationBatch UninitializedBatch(int64_t n) const;
  // Calls fn(file, from, to) with the activation bytes of rows [begin, end) in each shard they span
  // (offsets relative to the file's data section).
  void ForEachActivationRange(
      int64_t begin, int64_t end,
      const std::function<void(const tensor_io::SafetensorsFile&, uint64_t, uint64_t)>& fn) const;
  std::string ShardPath(int64_t shard) const;
};

}  // namespace crossdiff::activations
