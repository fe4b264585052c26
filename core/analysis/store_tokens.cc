#include "core/analysis/store_tokens.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::analysis {

using tensor_io::DType;

int64_t StoreTokens::Column::Get(int64_t i) const {
  const uint8_t* base = file->data(*info);
  switch (info->dtype) {
    case DType::kI64: {
      int64_t v;
      std::memcpy(&v, base + i * 8, 8);
      return v;
    }
    case DType::kI32: {
      int32_t v;
      std::memcpy(&v, base + i * 4, 4);
      return v;
    }
    case DType::kI16: {
      int16_t v;
      std::memcpy(&v, base + i * 2, 2);
      return v;
    }
    default:
      return 0;  // excluded by Open
  }
}

absl::StatusOr<std::unique_ptr<StoreTokens>> StoreTokens::Open(
    const std::string& dir, const activations::Manifest& manifest) {
  auto out = std::unique_ptr<StoreTokens>(new StoreTokens());
  int64_t start = 0;
  for (const activations::ShardInfo& info : manifest.shards) {
    Shard shard;
    const std::string path = dir + "/" + info.file;
    ASSIGN_OR_RETURN(shard.file, tensor_io::SafetensorsFile::Open(path));
    shard.start = start;
    shard.rows = info.rows;
    auto column = [&](const char* name, Column& col) -> absl::Status {
      ASSIGN_OR_RETURN(const tensor_io::TensorInfo* t, shard.file->Get(name));
      if (t->shape.size() != 1 || t->shape[0] != info.rows) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' must be [",
                                                       info.rows, "] (the shard's rows)"));
      }
      if (t->dtype != DType::kI64 && t->dtype != DType::kI32 && t->dtype != DType::kI16) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has dtype ",
                                                       std::string(tensor_io::DTypeName(t->dtype)),
                                                       ", expected an integer type"));
      }
      col.file = shard.file.get();
      col.info = t;
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(column("token_ids", shard.tokens));
    RETURN_IF_ERROR(column("sequence_ids", shard.sequences));
    RETURN_IF_ERROR(column("positions", shard.positions));
    start += info.rows;
    out->shards_.push_back(std::move(shard));
  }
  out->total_rows_ = start;
  return out;
}

TokenRow StoreTokens::Row(int64_t row) const {
  auto it = std::upper_bound(shards_.begin(), shards_.end(), row,
                             [](int64_t r, const Shard& s) { return r < s.start; });
  const Shard& s = *(it - 1);
  const int64_t i = row - s.start;
  TokenRow t;
  t.token_id = static_cast<int32_t>(s.tokens.Get(i));
  t.sequence_id = s.sequences.Get(i);
  t.position = static_cast<int32_t>(s.positions.Get(i));
  return t;
}

std::vector<TokenRow> StoreTokens::Window(int64_t row, int64_t radius, int32_t* center) const {
  const TokenRow self = Row(row);
  std::vector<TokenRow> out;
  const int64_t begin = std::max<int64_t>(0, row - radius);
  const int64_t end = std::min<int64_t>(total_rows_, row + radius + 1);
  for (int64_t r = begin; r < end; ++r) {
    if (r == row) {
      out.push_back(self);
      continue;
    }
    TokenRow t = Row(r);
    if (t.sequence_id == self.sequence_id && std::abs(t.position - self.position) <= radius &&
        t.position != self.position) {
      out.push_back(t);
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const TokenRow& a, const TokenRow& b) { return a.position < b.position; });
  *center = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].position == self.position) *center = static_cast<int32_t>(i);
  }
  return out;
}

}  // namespace crossdiff::analysis
