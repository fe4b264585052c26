// Chat formats: how a conversation ({"messages": [{"role", "content"}]}) becomes one string that
// the model's tokenizer encodes. Three built-in formats cover the common model families:
//   gemma   <start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...<end_of_turn>\n
//   llama3  <|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>
//   chatml  <|im_start|>user\n...<|im_end|>\n                        (Qwen, many fine-tunes)
// The rendered text never contains the BOS token: the packer (core/data/dataset.h) puts BOS at the
// start of every packed sequence instead, so a conversation is encoded the same wherever it lands.
// No LibTorch. Stateless functions; thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::data {

enum class ChatFormat { kGemma, kLlama3, kChatML };

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (Gemma's "model" is accepted as "assistant")
  std::string content;
};

// "gemma", "llama3" (also "llama-3"), "chatml". INVALID_ARGUMENT listing the known names otherwise.
absl::StatusOr<ChatFormat> ParseChatFormat(std::string_view name);
std::string_view ChatFormatName(ChatFormat format);

// Picks the format whose marker string appears in a Jinja chat template (`<start_of_turn>`,
// `<|start_header_id|>`, `<|im_start|>`). NOT_FOUND when none does.
absl::StatusOr<ChatFormat> DetectChatFormatFromTemplate(std::string_view chat_template);

// Reads MODEL_DIR/tokenizer_config.json's "chat_template" (a string, or a list of {name, template}
// where "default" is preferred) and detects the format from it. NOT_FOUND (naming the directory and
// suggesting --chat-format) when there is no config, no template, or no known marker.
absl::StatusOr<ChatFormat> DetectChatFormat(const std::string& model_dir);

// Renders a conversation. Gemma has no system role: a system message is prepended to the next user
// turn, separated by a blank line. INVALID_ARGUMENT for an empty conversation or a role the format
// cannot express (anything other than system/user/assistant/model).
absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages);

}  // namespace crossdiff::data
