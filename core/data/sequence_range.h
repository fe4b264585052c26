// Deterministic sharding of a dataset's sequences over ranks (docs/datasets.md, "Sharding").
//
// A dataset is a numbered list of sequences 0, 1, 2, ... that depends only on the data and the
// packing options, never on the number of ranks. A rank harvests a contiguous index range [begin,
// end); the ranges of ranks 0..W-1 tile [0, total) in order, so concatenating the ranks' outputs in
// rank order gives exactly the single-process output. Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::data {

inline constexpr int64_t kUnboundedSequences = std::numeric_limits<int64_t>::max();

struct SequenceRange {
  int64_t begin = 0;
  int64_t end = kUnboundedSequences;  // exclusive
  int64_t size() const { return end - begin; }
  bool Contains(int64_t i) const { return i >= begin && i < end; }
};

// The part of [0, total) that rank `rank` of `world_size` harvests: [total*r/W, total*(r+1)/W).
// INVALID_ARGUMENT when world_size < 1, rank outside [0, world_size) or total < 0.
absl::StatusOr<SequenceRange> RankRange(int64_t total, int rank, int world_size);

// The chunks of [0, total) that ranks claim one at a time when they harvest as fast as each can
// (guided scheduling): chunk i has size ceil(remaining / (2 * world_size)), rounded up to whole
// batches of `batch` sequences while that is at least one batch (so that the batches are those of
// a single process), never smaller than half a batch, never past the end. Large chunks first keep
// claims rare; small ones last let a faster rank take the tail instead of waiting for a slower
// one. Depends only on (total, world_size, batch); the chunks tile [0, total) in order.
// INVALID_ARGUMENT when total < 0, world_size < 1 or batch < 1.
absl::StatusOr<std::vector<SequenceRange>> GuidedChunks(int64_t total, int world_size,
                                                        int64_t batch);

// How many sequences a token budget covers: ceil(max_tokens / stored_per_sequence), where
// stored_per_sequence = seq_len - skip_first (the rows a full sequence contributes). Whole
// sequences only, so that the selection does not depend on the number of ranks. max_tokens <= 0
// means no limit (kUnboundedSequences). INVALID_ARGUMENT when skip_first >= seq_len.
absl::StatusOr<int64_t> SequencesForTokenBudget(int64_t max_tokens, int64_t seq_len,
                                                int64_t skip_first);

}  // namespace crossdiff::data
