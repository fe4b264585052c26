#include "core/data/tokens_reader.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"
#include "core/tensor_io/safetensors.h"

namespace crossdiff::data {
namespace {

using tensor_io::DType;
using tensor_io::SafetensorsFile;
using tensor_io::TensorInfo;

struct TokensFile {
  std::unique_ptr<SafetensorsFile> file;
  const TensorInfo* ids = nullptr;
  const TensorInfo* mask = nullptr;  // may be null
  int64_t rows = 0;
  int64_t columns = 0;  // stored row length
  int64_t length = 0;   // used row length (<= columns)
};

absl::StatusOr<TokensFile> OpenTokensFile(const DatasetOptions& options) {
  TokensFile tf;
  ASSIGN_OR_RETURN(tf.file, SafetensorsFile::Open(options.path));
  const std::string& path = options.path;
  tf.ids = tf.file->Find("input_ids");
  if (tf.ids == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": no tensor \"input_ids\" (a tokens dataset needs input_ids "
                     "[sequences, length] I32 or I64)"));
  }
  if (tf.ids->dtype != DType::kI32 && tf.ids->dtype != DType::kI64) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": input_ids has dtype ",
                                                   std::string(tensor_io::DTypeName(tf.ids->dtype)),
                                                   ", expected I32 or I64"));
  }
  if (tf.ids->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": input_ids has shape [",
                                                   absl::StrJoin(tf.ids->shape, ", "),
                                                   "], expected [sequences, length]"));
  }
  tf.rows = tf.ids->shape[0];
  tf.columns = tf.ids->shape[1];
  if (tf.rows == 0 || tf.columns == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": dataset is empty (input_ids [", tf.rows, ", ", tf.columns, "])"));
  }
  tf.mask = tf.file->Find("attention_mask");
  if (tf.mask != nullptr) {
    if (tf.mask->shape != tf.ids->shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": attention_mask has shape [", absl::StrJoin(tf.mask->shape, ", "),
                       "], input_ids [", absl::StrJoin(tf.ids->shape, ", "), "]"));
    }
    switch (tf.mask->dtype) {
      case DType::kI64:
      case DType::kI32:
      case DType::kI8:
      case DType::kU8:
      case DType::kBool:
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": attention_mask has dtype ", std::string(tensor_io::DTypeName(tf.mask->dtype)),
            ", expected an integer or BOOL type"));
    }
  }
  tf.length = options.seq_len > 0 ? std::min(options.seq_len, tf.columns) : tf.columns;
  if (options.skip_first < 0 || options.skip_first >= tf.length) {
    return absl::InvalidArgumentError(absl::StrCat("skip_first (", options.skip_first,
                                                   ") must be in [0, sequence length = ", tf.length,
                                                   ") for ", path));
  }
  return tf;
}

// Reads element `index` of an integer tensor (data may be unaligned: memcpy).
int64_t ReadInteger(const SafetensorsFile& file, const TensorInfo& info, int64_t index) {
  const uint8_t* p =
      file.data(info) + index * static_cast<int64_t>(tensor_io::DTypeSize(info.dtype));
  switch (info.dtype) {
    case DType::kI64: {
      int64_t v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    case DType::kI32: {
      int32_t v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    case DType::kI8:
      return static_cast<int8_t>(*p);
    default:  // U8, BOOL
      return *p;
  }
}

class TokensReader : public SequenceReader {
 public:
  TokensReader(TokensFile tf, const DatasetOptions& options, SequenceRange range)
      : tf_(std::move(tf)),
        skip_first_(options.skip_first),
        next_row_(std::max<int64_t>(range.begin, 0)),
        end_row_(std::min(range.end, tf_.rows)) {}

  absl::StatusOr<bool> Next(TokenSequence* out) override {
    if (next_row_ >= end_row_) return false;
    const int64_t row = next_row_++;
    const int64_t n = tf_.length;
    out->sequence_id = row;
    out->token_ids.resize(n);
    out->attention.assign(n, 1);
    out->stored.assign(n, 1);
    int64_t attended = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t flat = row * tf_.columns + j;
      const int64_t id = ReadInteger(*tf_.file, *tf_.ids, flat);
      if (tf_.mask != nullptr && ReadInteger(*tf_.file, *tf_.mask, flat) == 0) {
        out->attention[j] = 0;
        out->stored[j] = 0;
        out->token_ids[j] = 0;  // padding: never looked at, any valid id will do
        continue;
      }
      if (id < 0 || id > INT32_MAX) {
        return absl::InvalidArgumentError(absl::StrCat(tf_.file->path(), ": input_ids[", row, ", ",
                                                       j, "] = ", id, " is not a token id"));
      }
      out->token_ids[j] = static_cast<int32_t>(id);
      if (attended++ < skip_first_) out->stored[j] = 0;
    }
    return true;
  }

  void SkipTo(int64_t sequence_id) override { next_row_ = std::max(next_row_, sequence_id); }

 private:
  TokensFile tf_;
  const int64_t skip_first_;
  int64_t next_row_;
  const int64_t end_row_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceReader>> OpenTokensReader(const DatasetOptions& options,
                                                                 SequenceRange range) {
  ASSIGN_OR_RETURN(TokensFile tf, OpenTokensFile(options));
  return std::unique_ptr<SequenceReader>(new TokensReader(std::move(tf), options, range));
}

absl::StatusOr<TokensFileShape> ReadTokensFileShape(const DatasetOptions& options) {
  ASSIGN_OR_RETURN(TokensFile tf, OpenTokensFile(options));
  return TokensFileShape{tf.rows, tf.length};
}

}  // namespace crossdiff::data
