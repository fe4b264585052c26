// Internal to crossdiff_data: the rows of a pre-tokenized safetensors file as sequences.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/data/dataset.h"

namespace crossdiff::data {

absl::StatusOr<std::unique_ptr<SequenceReader>> OpenTokensReader(const DatasetOptions& options,
                                                                 SequenceRange range);

// Rows and (capped) row length of the file; validates `input_ids` / `attention_mask`.
struct TokensFileShape {
  int64_t rows = 0;
  int64_t length = 0;
};
absl::StatusOr<TokensFileShape> ReadTokensFileShape(const DatasetOptions& options);

}  // namespace crossdiff::data
