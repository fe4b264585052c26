// Shuffled, resumable, rank-sharded batches from an activation store, with bounded memory.
//
// How rows are shuffled (deterministic for a given seed; see docs/activation-store.md):
//   The row range [row_begin, row_end) is cut into chunks of `chunk_rows` consecutive rows. Every
//   epoch e, the chunks are permuted (seeded by seed and e) and taken `buffer_rows / chunk_rows` at
//   a time as one window; the rows of a window (drawn from chunks anywhere in the store, so from
//   many shards) are permuted again (seeded by seed, e and the window). The concatenation of the
//   windows is the epoch's row stream. Memory is one window's row index (8 bytes a row) plus the
//   batch; rows are copied straight from the memory-mapped shards, and the mapped pages of a window
//   are dropped when the reader leaves it, so resident memory does not grow with the store. When a
//   window becomes current, its chunks and the next window's are prefetched into the page cache
//   (large sequential reads in the background), so random row reads rarely wait on the disk.
//
// How ranks share the work (data parallel): the stream is cut into global batches of
//   batch_size * world_size rows; rank r receives rows [r * batch_size, (r + 1) * batch_size) of
//   every global batch. So the union of the ranks' batches at step s is exactly the batch a single
//   process with batch_size * world_size would get at step s, and ranks never see the same row in
//   an epoch. All ranks must use the same options apart from `rank`. (For latent-sharded training,
//   where every rank needs the same batch, give every rank world_size = 1.)
//
// Epochs: an epoch holds floor(L / G) global batches (L rows in range, G the global batch). With
//   drop_last = false the remaining S rows also form a final, smaller batch, split evenly over the
//   ranks (rank r gets rows [S*r/W, S*(r+1)/W)); it is skipped when S < world_size. Epochs repeat
//   forever with fresh permutations; Next() never reports an end.
//
// Resume: State() is a small JSON string holding the epoch and batch index (and the options that
//   the stream depends on, to refuse a mismatched restore). Restore(State()) on a reader created
//   with the same options over the same store continues with exactly the batches the original
//   reader would have returned next.
//
// Not thread-safe: one reader per consumer thread. The StoreReader may be shared.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/activations/store.h"

namespace crossdiff::activations {

struct ShufflingReaderOptions {
  int64_t batch_size = 1024;      // rows per Next() on this rank
  int64_t buffer_rows = 1 << 16;  // rows shuffled together (the window); bounds memory
  int64_t chunk_rows = 0;         // consecutive rows read together; 0 = max(1, buffer_rows / 16)
  uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
  int64_t row_begin = 0;  // the rows this reader draws from: [row_begin, row_end)
  int64_t row_end = -1;   // -1 = the end of the store
  bool drop_last = true;  // see "Epochs" above
  bool shuffle = true;    // false: rows in store order (e.g. a validation pass)
  bool as_float = true;   // activations as float32; false keeps the stored dtype
};

// Where a reader stands: the next batch is batch `batch` of epoch `epoch`.
struct ShufflingReaderCursor {
  int64_t epoch = 0;
  int64_t batch = 0;
};

class ShufflingReader {
 public:
  // `store` must outlive the reader. INVALID_ARGUMENT for bad options (naming the option), or when
  // the row range holds too few rows for one batch on every rank.
  static absl::StatusOr<std::unique_ptr<ShufflingReader>> Create(const StoreReader* store,
                                                                 ShufflingReaderOptions options);
  // Opens the store at `dir` (owned by the reader) and creates a reader over it.
  static absl::StatusOr<std::unique_ptr<ShufflingReader>> Open(const std::string& dir,
                                                               ShufflingReaderOptions options);

  // The next batch of this rank: activations [B, n_models, d_model] (float32 unless
  // options.as_float is false), with the rows' token_ids, sequence_ids and positions.
  absl::StatusOr<ActivationBatch> Next();

  // As Next, the activations only, converted to float32 into `out` ([rows, n_models, d_model]
  // for this rank's rows of the batch: batch_size of them with drop_last): nothing allocated per
  // batch.
  absl::Status NextActivations(float* out);

  // Serialisable position (JSON text); see "Resume" above.
  std::string State() const;
  // FAILED_PRECONDITION when the state was saved with different options or another store size;
  // INVALID_ARGUMENT when it is not a state of this reader.
  absl::Status Restore(const std::string& state);

  ShufflingReaderCursor cursor() const { return cursor_; }
  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  int64_t rows_in_range() const { return row_end_ - row_begin_; }
  const ShufflingReaderOptions& options() const { return options_; }
  const StoreReader& store() const { return *store_; }

 private:
  ShufflingReader() = default;
  // Builds the chunk permutation and window boundaries of `epoch`.
  void PlanEpoch(int64_t epoch);
  // Makes `window` of the planned epoch current (its shuffled global row ids).
  void LoadWindow(int64_t window);
  // The global row ids of this rank's next batch into batch_rows_ (advancing the epoch when it is
  // done; the cursor moves once the rows are read).
  void NextBatchRows();
  // Global row id of stream position `p` of the planned epoch.
  int64_t RowAt(int64_t p);

  std::unique_ptr<StoreReader> owned_store_;
  const StoreReader* store_ = nullptr;
  ShufflingReaderOptions options_;
  int64_t row_begin_ = 0;
  int64_t row_end_ = 0;
  int64_t chunk_rows_ = 1;
  int64_t num_chunks_ = 0;
  int64_t chunks_per_window_ = 1;
  int64_t batches_per_epoch_ = 0;
  ShufflingReaderCursor cursor_;

  int64_t planned_epoch_ = -1;
  std::vector<int64_t> chunk_order_;   // chunk ids in epoch order
  std::vector<int64_t> window_start_;  // stream position of each window's first row, then L
  int64_t current_window_ = -1;
  std::vector<int64_t> window_rows_;  // shuffled global row ids of the current window
  std::vector<int64_t> batch_rows_;   // the next batch's row ids (reused)
};

}  // namespace crossdiff::activations
