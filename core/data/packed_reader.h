// Internal to crossdiff_data: packs the documents of a text/chat JSONL file into fixed-length
// sequences (the rule is in core/data/dataset.h).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/data/dataset.h"

namespace crossdiff::data {

absl::StatusOr<std::unique_ptr<SequenceReader>> OpenPackedReader(const DatasetOptions& options,
                                                                 const TextEncoder& encoder,
                                                                 SequenceRange range);

}  // namespace crossdiff::data
