#include "core/data/sequence_range.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace crossdiff::data {

absl::StatusOr<SequenceRange> RankRange(int64_t total, int rank, int world_size) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world_size));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is outside [0, ", world_size, ")"));
  }
  if (total < 0) return absl::InvalidArgumentError("negative sequence count");
  // 128-bit products: total may be large and W a few thousand at most, but stay exact anyway.
  auto split = [&](int64_t r) {
    return static_cast<int64_t>(static_cast<__int128>(total) * r / world_size);
  };
  return SequenceRange{split(rank), split(rank + 1)};
}

absl::StatusOr<std::vector<SequenceRange>> GuidedChunks(int64_t total, int world_size,
                                                        int64_t batch) {
  if (total < 0) return absl::InvalidArgumentError("negative sequence count");
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world_size));
  }
  if (batch < 1) return absl::InvalidArgumentError(absl::StrCat("batch must be >= 1, got ", batch));
  const int64_t smallest = (batch + 1) / 2;
  std::vector<SequenceRange> chunks;
  for (int64_t begin = 0; begin < total;) {
    const int64_t remaining = total - begin;
    int64_t size = (remaining + 2 * world_size - 1) / (2 * world_size);
    if (size >= batch) size = (size + batch - 1) / batch * batch;
    size = std::min(std::max(size, smallest), remaining);
    chunks.push_back({begin, begin + size});
    begin += size;
  }
  return chunks;
}

absl::StatusOr<int64_t> SequencesForTokenBudget(int64_t max_tokens, int64_t seq_len,
                                                int64_t skip_first) {
  if (seq_len <= 0) return absl::InvalidArgumentError("seq_len must be positive");
  if (skip_first < 0 || skip_first >= seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("skip_first (", skip_first, ") must be in [0, seq_len = ", seq_len, ")"));
  }
  if (max_tokens <= 0) return kUnboundedSequences;
  const int64_t per_sequence = seq_len - skip_first;
  return (max_tokens + per_sequence - 1) / per_sequence;
}

}  // namespace crossdiff::data
