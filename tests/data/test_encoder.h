// A byte-level encoder for dataset tests: byte b -> id b + 3, BOS = 1, EOS = 2. It stands in for a
// model tokenizer only inside these unit tests (the harvest tests use real tokenizer files).
#pragma once

#include <string_view>
#include <vector>

#include "core/data/dataset.h"

namespace crossdiff::data::testing {

inline TextEncoder ByteEncoder(bool with_bos = true, bool with_eos = true) {
  TextEncoder enc;
  enc.encode = [](std::string_view text) -> absl::StatusOr<std::vector<int32_t>> {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(static_cast<int32_t>(c) + 3);
    return ids;
  };
  if (with_bos) enc.bos_id = 1;
  if (with_eos) enc.eos_id = 2;
  return enc;
}

}  // namespace crossdiff::data::testing
