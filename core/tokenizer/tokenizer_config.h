// Reading a model directory's tokenizer_config.json (and special_tokens_map.json): the BOS/EOS
// policy, special token strings and the chat template. Private to crossdiff_tokenizer.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace crossdiff::tokenizer {

struct TokenizerConfig {
  bool present = false;  // tokenizer_config.json exists
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  // Empty when absent or null. Both the plain string and the {"content": ...} form are accepted.
  std::string bos_token, eos_token, pad_token, unk_token;
  // A string; when the config holds a list of named templates, the one named "default" (else the
  // first).
  std::string chat_template;
};

// Reads DIR/tokenizer_config.json, filling token strings missing there from
// DIR/special_tokens_map.json. Missing files give a config with present = false (not an error).
// Errors: INVALID_ARGUMENT naming the file and field for malformed JSON or wrongly typed fields.
absl::StatusOr<TokenizerConfig> ReadTokenizerConfig(const std::string& model_dir);

// Reads a whole file. NOT_FOUND when it does not exist, INTERNAL on read errors (the path is
// named).
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace crossdiff::tokenizer
