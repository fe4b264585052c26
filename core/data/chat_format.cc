#include "core/data/chat_format.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace crossdiff::data {

absl::StatusOr<ChatFormat> ParseChatFormat(std::string_view name) {
  std::string lower = absl::AsciiStrToLower(std::string(name));
  if (lower == "gemma") return ChatFormat::kGemma;
  if (lower == "llama3" || lower == "llama-3") return ChatFormat::kLlama3;
  if (lower == "chatml") return ChatFormat::kChatML;
  return absl::InvalidArgumentError(absl::StrCat("unknown chat format \"", std::string(name),
                                                 "\" (known: gemma, llama3, chatml)"));
}

std::string_view ChatFormatName(ChatFormat format) {
  switch (format) {
    case ChatFormat::kGemma:
      return "gemma";
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kChatML:
      return "chatml";
  }
  return "?";
}

absl::StatusOr<ChatFormat> DetectChatFormatFromTemplate(std::string_view chat_template) {
  if (chat_template.find("<start_of_turn>") != std::string_view::npos) return ChatFormat::kGemma;
  if (chat_template.find("<|start_header_id|>") != std::string_view::npos) {
    return ChatFormat::kLlama3;
  }
  if (chat_template.find("<|im_start|>") != std::string_view::npos) return ChatFormat::kChatML;
  return absl::NotFoundError(
      "chat template has none of the markers <start_of_turn>, <|start_header_id|>, <|im_start|>");
}

absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& model_dir) {
  const std::string path = model_dir + "/tokenizer_config.json";
  const std::string hint = " (pass --chat-format gemma|llama3|chatml)";
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(absl::StrCat(path, ": not found, cannot pick a chat format", hint));
  nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  }
  std::string chat_template;
  auto it = config.find("chat_template");
  if (it != config.end() && it->is_string()) {
    chat_template = it->get<std::string>();
  } else if (it != config.end() && it->is_array()) {
    // [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
    for (const auto& entry : *it) {
      if (!entry.is_object() || !entry.contains("template") || !entry["template"].is_string()) {
        continue;
      }
      bool is_default = entry.value("name", "") == "default";
      if (chat_template.empty() || is_default) chat_template = entry["template"].get<std::string>();
      if (is_default) break;
    }
  }
  if (chat_template.empty()) {
    return absl::NotFoundError(absl::StrCat(path, ": no chat_template", hint));
  }
  auto format = DetectChatFormatFromTemplate(chat_template);
  if (!format.ok()) {
    return absl::NotFoundError(absl::StrCat(path, ": ", format.status().message(), hint));
  }
  return *format;
}

namespace {

enum class Role { kSystem, kUser, kAssistant };

absl::StatusOr<Role> ParseRole(const std::string& role) {
  if (role == "system") return Role::kSystem;
  if (role == "user") return Role::kUser;
  if (role == "assistant" || role == "model") return Role::kAssistant;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat role \"", role, "\" (expected system, user or assistant)"));
}

// Llama-3's template strips surrounding whitespace from every message.
std::string Trimmed(const std::string& s) { return std::string(absl::StripAsciiWhitespace(s)); }

}  // namespace

absl::StatusOr<std::string> RenderChat(ChatFormat format,
                                       const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return absl::InvalidArgumentError("chat has no messages");
  std::string out;
  std::string pending_system;  // Gemma only
  for (const ChatMessage& m : messages) {
    auto role = ParseRole(m.role);
    if (!role.ok()) return role.status();
    switch (format) {
      case ChatFormat::kGemma: {
        if (*role == Role::kSystem) {
          absl::StrAppend(&pending_system, pending_system.empty() ? "" : "\n\n", m.content);
          break;
        }
        std::string content = m.content;
        if (*role == Role::kUser && !pending_system.empty()) {
          content = absl::StrCat(pending_system, "\n\n", content);
          pending_system.clear();
        }
        absl::StrAppend(&out, "<start_of_turn>", *role == Role::kUser ? "user" : "model", "\n",
                        content, "<end_of_turn>\n");
        break;
      }
      case ChatFormat::kLlama3:
        absl::StrAppend(&out, "<|start_header_id|>",
                        *role == Role::kSystem ? "system"
                        : *role == Role::kUser ? "user"
                                               : "assistant",
                        "<|end_header_id|>\n\n", Trimmed(m.content), "<|eot_id|>");
        break;
      case ChatFormat::kChatML:
        absl::StrAppend(&out, "<|im_start|>",
                        *role == Role::kSystem ? "system"
                        : *role == Role::kUser ? "user"
                                               : "assistant",
                        "\n", m.content, "<|im_end|>\n");
        break;
    }
  }
  if (!pending_system.empty()) {
    // A trailing system message with no user turn after it: keep its text as a user turn.
    absl::StrAppend(&out, "<start_of_turn>user\n", pending_system, "<end_of_turn>\n");
  }
  return out;
}

}  // namespace crossdiff::data
