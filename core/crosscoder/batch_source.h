// Training rows for the crosscoder trainer: a row provider (an activation store, or a tensor in
// tests) and a deterministic shuffled stream over it with bounded memory.
//
// The stream is defined by (seed, rows, chunk_rows, buffer_rows) alone: epoch e visits the chunks
// of `chunk_rows` consecutive rows in a seeded random order, groups them into windows of about
// `buffer_rows` rows and visits each window's rows in a seeded random order. Stream position p is
// therefore a complete cursor: resuming at p (with any number of ranks) reproduces the same rows.
// Memory is one window (<= buffer_rows + chunk_rows rows).
//
// Every window is checked for NaN/Inf when loaded; the error names the store shard and row.
// Not thread-safe.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::crosscoder {

// This rank's rows of consecutive global batches. Not thread-safe.
class BatchStream {
 public:
  virtual ~BatchStream() = default;
  // Copies this rank's rows of global batch `step` (F32, rows x M*d) into `out`. Steps must be
  // requested in increasing order, starting anywhere (resume).
  virtual absl::Status Next(int64_t step, float* out) = 0;
};

struct BatchStreamOptions {
  int64_t train_rows = 0;  // the stream draws from rows [0, train_rows)
  int64_t global_batch = 0;
  int rank = 0, world_size = 1;
  uint64_t seed = 0;
  int64_t buffer_rows = 65536;
};

class RowProvider {
 public:
  virtual ~RowProvider() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t num_models() const = 0;
  virtual int64_t d_model() const = 0;
  // Rows [begin, end) as F32 [end - begin, M, d].
  virtual absl::StatusOr<at::Tensor> Read(int64_t begin, int64_t end) const = 0;
  // Where global row `row` lives, for error messages ("DIR/shard-000001.safetensors row 17").
  virtual std::string Locate(int64_t row) const = 0;
  // Model names (may be empty) and layer, for the checkpoint's config.json.
  virtual std::vector<std::string> models() const { return {}; }
  virtual int layer() const { return 0; }
  // The shuffled batches of this provider. The default streams through ShuffledRowStream; the
  // store provider uses crossdiff_activations' ShufflingReader (rows copied straight from the
  // mapped shards). Each rank's slice of global batch s is rows [rank * B/W, (rank + 1) * B/W) of
  // it.
  virtual absl::StatusOr<std::unique_ptr<BatchStream>> CreateBatchStream(
      const BatchStreamOptions& options) const;
  // The first NaN/Inf row of the provider (a full scan, for error reports): INVALID_ARGUMENT naming
  // it, OK when every row is finite.
  absl::Status FindNonFinite() const;
};

// Rows of an in-memory F32 tensor [N, M, d] (tests, planted problems). `name` appears in errors.
std::unique_ptr<RowProvider> MakeTensorRowProvider(at::Tensor rows, std::string name = "tensor");

// An activation store (DESIGN.md 3.2) through crossdiff_activations' StoreReader. UNIMPLEMENTED
// when this build has no store reader.
absl::StatusOr<std::unique_ptr<RowProvider>> OpenStoreRowProvider(const std::string& dir);

// Checks rows [begin, end) of `rows` (F32 [n, M*d] or [n, M, d], row i = global row first_row + i)
// for NaN/Inf: INVALID_ARGUMENT naming the first bad row through provider.Locate.
absl::Status CheckFinite(const RowProvider& provider, const at::Tensor& rows, int64_t first_row);

class ShuffledRowStream {
 public:
  // Streams rows [0, rows) of `provider` (not owned; must outlive the stream).
  ShuffledRowStream(const RowProvider* provider, int64_t rows, uint64_t seed, int64_t chunk_rows,
                    int64_t buffer_rows);

  // Copies stream positions [position, position + count) into out (F32, count rows of M*d values,
  // contiguous). Positions grow without bound (epochs repeat with new orders).
  absl::Status Fill(int64_t position, int64_t count, float* out);

  int64_t rows() const { return rows_; }

 private:
  absl::Status LoadWindow(int64_t epoch, int64_t window);
  void PlanEpoch(int64_t epoch);

  const RowProvider* provider_;
  int64_t rows_;
  uint64_t seed_;
  int64_t chunk_rows_;
  int64_t chunks_per_window_;
  int64_t row_width_;
  // The current epoch's plan.
  int64_t plan_epoch_ = -1;
  std::vector<int64_t> chunk_order_;   // chunk ids in visiting order
  std::vector<int64_t> window_start_;  // first epoch offset of each window (+ end)
  // The loaded window.
  int64_t win_epoch_ = -1, win_index_ = -1;
  at::Tensor window_rows_;            // [n, M*d]
  std::vector<int64_t> window_perm_;  // visiting order of the window's rows
};

// A seed derived from (seed, a, b) by SplitMix64 mixing.
uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b);

}  // namespace crossdiff::crosscoder
