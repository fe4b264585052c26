#include "core/data/packed_reader.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/data/document_source.h"

namespace crossdiff::data {
namespace {

class PackedReader : public SequenceReader {
 public:
  PackedReader(std::unique_ptr<DocumentSource> docs, const DatasetOptions& options,
               const TextEncoder& encoder, SequenceRange range)
      : docs_(std::move(docs)),
        encoder_(encoder),
        skip_first_(options.skip_first),
        range_(range),
        first_returned_(range.begin),
        stream_per_sequence_(options.seq_len - (encoder.bos_id ? 1 : 0)) {}

  absl::StatusOr<bool> Next(TokenSequence* out) override {
    while (next_index_ < range_.end) {
      RETURN_IF_ERROR(Fill());
      const int64_t available = static_cast<int64_t>(buffer_.size() - head_);
      if (available == 0) return false;
      const int64_t take = std::min(available, stream_per_sequence_);
      const int64_t index = next_index_++;
      const int32_t* first = buffer_.data() + head_;
      head_ += take;
      if (index < first_returned_) continue;  // before the range or skipped: tokenised only

      out->sequence_id = index;
      out->token_ids.clear();
      if (encoder_.bos_id) out->token_ids.push_back(*encoder_.bos_id);
      out->token_ids.insert(out->token_ids.end(), first, first + take);
      const size_t n = out->token_ids.size();
      out->attention.assign(n, 1);
      out->stored.assign(n, 1);
      for (size_t j = 0; j < n && static_cast<int64_t>(j) < skip_first_; ++j) out->stored[j] = 0;
      return true;
    }
    return false;
  }

  void SkipTo(int64_t sequence_id) override {
    first_returned_ = std::max(first_returned_, sequence_id);
  }

 private:
  // Reads documents until the buffer holds one sequence's worth of stream tokens or the file ends.
  absl::Status Fill() {
    if (head_ > 0 && head_ * 2 >= buffer_.size()) {
      buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(head_));
      head_ = 0;
    }
    while (!eof_ && static_cast<int64_t>(buffer_.size() - head_) < stream_per_sequence_) {
      ASSIGN_OR_RETURN(bool more, docs_->Next(&text_));
      if (!more) {
        eof_ = true;
        break;
      }
      auto ids = encoder_.encode(text_);
      if (!ids.ok()) {
        return absl::Status(ids.status().code(),
                            absl::StrCat(docs_->path(), ": document ", documents_ + 1, ": ",
                                         ids.status().message()));
      }
      if (documents_ > 0 && encoder_.eos_id) buffer_.push_back(*encoder_.eos_id);
      buffer_.insert(buffer_.end(), ids->begin(), ids->end());
      content_tokens_ += static_cast<int64_t>(ids->size());
      ++documents_;
    }
    if (eof_ && content_tokens_ == 0) {
      return absl::InvalidArgumentError(absl::StrCat(docs_->path(), ": dataset is empty (",
                                                     documents_, " documents, no tokens)"));
    }
    return absl::OkStatus();
  }

  std::unique_ptr<DocumentSource> docs_;
  TextEncoder encoder_;
  const int64_t skip_first_;
  const SequenceRange range_;
  int64_t first_returned_;             // sequences before it are packed but not returned
  const int64_t stream_per_sequence_;  // stream tokens per sequence (seq_len minus the BOS slot)
  std::vector<int32_t> buffer_;        // stream tokens not yet in a sequence, from head_
  size_t head_ = 0;
  std::string text_;
  int64_t next_index_ = 0;
  int64_t documents_ = 0;
  int64_t content_tokens_ = 0;
  bool eof_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceReader>> OpenPackedReader(const DatasetOptions& options,
                                                                 const TextEncoder& encoder,
                                                                 SequenceRange range) {
  if (!encoder.encode) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.path, ": a tokenizer is needed to read a text or chat dataset"));
  }
  const int64_t min_len = encoder.bos_id ? 2 : 1;
  if (options.seq_len < min_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("seq_len must be at least ", min_len, ", got ", options.seq_len));
  }
  ASSIGN_OR_RETURN(auto docs,
                   DocumentSource::Open(options.path, options.format, options.chat_format));
  return std::unique_ptr<SequenceReader>(
      new PackedReader(std::move(docs), options, encoder, range));
}

}  // namespace crossdiff::data
