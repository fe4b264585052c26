// Random access to the token metadata of an activation store (token_ids, sequence_ids, positions)
// without loading activations: the shards are memory-mapped and single elements read in place.
// Used for the context windows of top examples and for matching probe categories.
//
// Immutable after Open; safe to share across threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/activations/manifest.h"
#include "core/tensor_io/safetensors.h"

namespace crossdiff::analysis {

struct TokenRow {
  int32_t token_id = 0;
  int64_t sequence_id = 0;
  int32_t position = 0;
};

class StoreTokens {
 public:
  // Opens every shard named by `manifest` under `dir`. INVALID_ARGUMENT naming the shard and tensor
  // when token_ids / sequence_ids / positions are missing, not 1-D of the shard's rows, or of a
  // non-integer dtype.
  static absl::StatusOr<std::unique_ptr<StoreTokens>> Open(const std::string& dir,
                                                           const activations::Manifest& manifest);

  int64_t rows() const { return total_rows_; }
  // Global row -> metadata. Precondition: 0 <= row < rows().
  TokenRow Row(int64_t row) const;
  // The rows of `row`'s sequence within `radius` positions of it (looked up among the rows at most
  // `radius` away in store order, which holds every neighbour when sequences are stored
  // contiguously), sorted by position. `*center` receives the index of `row` in the result.
  std::vector<TokenRow> Window(int64_t row, int64_t radius, int32_t* center) const;

 private:
  struct Column {
    const tensor_io::SafetensorsFile* file = nullptr;
    const tensor_io::TensorInfo* info = nullptr;
    int64_t Get(int64_t i) const;
  };
  struct Shard {
    std::unique_ptr<tensor_io::SafetensorsFile> file;
    Column tokens, sequences, positions;
    int64_t start = 0, rows = 0;
  };
  std::vector<Shard> shards_;
  int64_t total_rows_ = 0;
};

}  // namespace crossdiff::analysis
