#include "core/data/document_source.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::data {

absl::StatusOr<std::unique_ptr<DocumentSource>> DocumentSource::Open(const std::string& path,
                                                                     DataFormat format,
                                                                     ChatFormat chat_format) {
  std::unique_ptr<DocumentSource> source(new DocumentSource());
  ASSIGN_OR_RETURN(source->reader_, JsonlReader::Open(path));
  source->format_ = format;
  source->chat_format_ = chat_format;
  return source;
}

absl::StatusOr<bool> DocumentSource::Next(std::string* text) {
  nlohmann::json value;
  ASSIGN_OR_RETURN(bool more, reader_->Next(&value));
  if (!more) return false;
  if (!value.is_object()) return reader_->LineError("expected a JSON object");
  if (format_ == DataFormat::kText) {
    auto it = value.find("text");
    if (it == value.end() || !it->is_string()) {
      return reader_->LineError("missing string field \"text\"");
    }
    *text = it->get<std::string>();
    return true;
  }
  auto it = value.find("messages");
  if (it == value.end() || !it->is_array()) {
    return reader_->LineError("missing array field \"messages\"");
  }
  std::vector<ChatMessage> messages;
  messages.reserve(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    const auto& m = (*it)[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string()) {
      return reader_->LineError(
          absl::StrCat("messages[", i, "] needs string fields \"role\" and \"content\""));
    }
    messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  auto rendered = RenderChat(chat_format_, messages);
  if (!rendered.ok()) return reader_->LineError(std::string(rendered.status().message()));
  *text = std::move(*rendered);
  return true;
}

}  // namespace crossdiff::data
