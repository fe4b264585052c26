// Internal to crossdiff_data: the documents of a text or chat JSONL file, as strings to encode.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/data/chat_format.h"
#include "core/data/dataset.h"
#include "core/data/jsonl_reader.h"

namespace crossdiff::data {

class DocumentSource {
 public:
  // `format` must be kText or kChat.
  static absl::StatusOr<std::unique_ptr<DocumentSource>> Open(const std::string& path,
                                                              DataFormat format,
                                                              ChatFormat chat_format);
  // The next document's text (chat: rendered). False at end of file. A line without the expected
  // fields gives INVALID_ARGUMENT "PATH:LINE: ...".
  absl::StatusOr<bool> Next(std::string* text);
  const std::string& path() const { return reader_->path(); }

 private:
  DocumentSource() = default;
  std::unique_ptr<JsonlReader> reader_;
  DataFormat format_ = DataFormat::kText;
  ChatFormat chat_format_ = ChatFormat::kChatML;
};

}  // namespace crossdiff::data
