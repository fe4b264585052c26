#include "core/tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <queue>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/nfc.h"
#include "core/tokenizer/sha256.h"
#include "core/tokenizer/unicode_tables.h"
#include "core/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace crossdiff::tokenizer {
namespace {

using nlohmann::json;

absl::Status Malformed(const std::string& path, const std::string& field,
                       const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field '", field, "' ", problem));
}

absl::Status Unsupported(const std::string& path, const std::string& field,
                         const std::string& what) {
  return absl::UnimplementedError(
      absl::StrCat(path, ": field '", field, "': unsupported ", what,
                   " (crossdiff reads byte-level BPE tokenizer.json files only)"));
}

bool BoolField(const json& j, const char* name, bool def) {
  auto it = j.find(name);
  if (it == j.end() || !it->is_boolean()) return def;
  return it->get<bool>();
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Code point ending just before byte `end` of `s` (whose start is `*start`), for whitespace scans.
uint32_t PreviousCodePoint(std::string_view s, size_t end, size_t* start) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80 && end - b < 4) --b;
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;
  utf8::Decode(s.substr(b, end - b), &cps, &offsets);
  if (cps.size() != 1) {  // not one well-formed character: treat the last byte alone
    *start = end - 1;
    return utf8::kInvalidByteBase + static_cast<unsigned char>(s[end - 1]);
  }
  *start = b;
  return cps[0];
}

uint32_t NextCodePoint(std::string_view s, size_t begin, size_t* end) {
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;
  utf8::Decode(s.substr(begin, std::min<size_t>(4, s.size() - begin)), &cps, &offsets);
  *end = begin + offsets[1];
  return cps[0];
}

// Debian's Abseil has its own string_view type: heterogeneous lookups need it.
absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsWordChar(uint32_t cp) {
  const auto c = unicode::Classify(cp);
  return c == unicode::CharClass::kLetter || c == unicode::CharClass::kNumber;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(const std::string& path,
                                                                   std::string_view json_text,
                                                                   const TokenizerConfig& config) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  if (!root.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": top level is not a JSON object"));
  if (!root.contains("model") || !root["model"].is_object())
    return Malformed(path, "model", "is missing");
  std::unique_ptr<BpeTokenizer> tok(new BpeTokenizer());
  RETURN_IF_ERROR(tok->ParseModel(path, root["model"]));

  // Normalizer: none, or NFC (Qwen2). SentencePiece-style tokenizer.json files use others (Replace,
  // Prepend...): those are reported as unsupported so that Load falls back to tokenizer.model.
  if (root.contains("normalizer") && !root["normalizer"].is_null()) {
    const json& n = root["normalizer"];
    const std::string type = n.is_object() && n.contains("type") && n["type"].is_string()
                                 ? n["type"].get<std::string>()
                                 : "?";
    if (type != "NFC")
      return Unsupported(path, "normalizer", absl::StrCat("normalizer type '", type, "'"));
    tok->nfc_ = true;
  }
  if (!root.contains("pre_tokenizer") || root["pre_tokenizer"].is_null()) {
    return Unsupported(path, "pre_tokenizer", "missing pre-tokenizer");
  }
  RETURN_IF_ERROR(tok->ParsePreTokenizer(path, root["pre_tokenizer"], "pre_tokenizer"));
  if (tok->pre_steps_.empty() || !tok->pre_steps_.back().byte_level) {
    return Unsupported(path, "pre_tokenizer", "pre-tokenizer without a final ByteLevel step");
  }
  if (root.contains("decoder") && !root["decoder"].is_null()) {
    const json& d = root["decoder"];
    if (!d.is_object() || !d.contains("type") || d["type"] != "ByteLevel") {
      return Unsupported(path, "decoder", "decoder (only ByteLevel)");
    }
  }
  RETURN_IF_ERROR(tok->ParseAddedTokens(path, root));
  if (root.contains("post_processor") && !root["post_processor"].is_null()) {
    RETURN_IF_ERROR(tok->ParsePostProcessor(path, root["post_processor"], "post_processor"));
  }
  RETURN_IF_ERROR(tok->ApplySpecialTokenPolicy(path, config));
  tok->ComputeFingerprint();
  return tok;
}

absl::Status BpeTokenizer::ParseModel(const std::string& path, const json& model) {
  if (!model.contains("type") || model["type"] != "BPE") {
    return Unsupported(path, "model.type",
                       absl::StrCat("model type ", model.value("type", json("?")).dump()));
  }
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(affix) && model[affix].is_string() &&
        !model[affix].get<std::string>().empty()) {
      return Unsupported(path, absl::StrCat("model.", affix), "non-empty affix");
    }
  }
  if (BoolField(model, "byte_fallback", false))
    return Unsupported(path, "model.byte_fallback", "byte fallback");
  ignore_merges_ = BoolField(model, "ignore_merges", false);

  if (!model.contains("vocab") || !model["vocab"].is_object())
    return Malformed(path, "model.vocab", "is not an object");
  int32_t max_id = -1;
  for (const auto& [token, id_json] : model["vocab"].items()) {
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0 ||
        id_json.get<int64_t>() > INT32_MAX) {
      return Malformed(path, absl::StrCat("model.vocab[\"", token, "\"]"), "is not a valid id");
    }
    const int32_t id = id_json.get<int32_t>();
    vocab_[token] = id;
    max_id = std::max(max_id, id);
  }
  id_to_token_.assign(max_id + 1, std::string());
  id_in_vocab_.assign(max_id + 1, false);
  for (const auto& [token, id] : vocab_) {
    if (id_in_vocab_[id])
      return Malformed(path, "model.vocab", absl::StrCat("has two tokens with id ", id));
    id_to_token_[id] = token;
    id_in_vocab_[id] = true;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(byte_level::ByteToToken(static_cast<uint8_t>(b)));
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = vocab_.find(model["unk_token"].get<std::string>());
    if (it != vocab_.end()) model_unk_id_ = it->second;
  }

  if (!model.contains("merges") || !model["merges"].is_array())
    return Malformed(path, "model.merges", "is not a list");
  const json& merges = model["merges"];
  merges_.reserve(merges.size());
  merge_pairs_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& m = merges[rank];
    std::string left, right;
    if (m.is_string()) {  // legacy "left right"
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Malformed(path, absl::StrCat("model.merges[", rank, "]"),
                         "is not of the form \"left right\"");
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return Malformed(path, absl::StrCat("model.merges[", rank, "]"),
                       "is neither \"a b\" nor [\"a\", \"b\"]");
    }
    auto l = vocab_.find(left), r = vocab_.find(right), result = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || result == vocab_.end()) {
      return Malformed(path, absl::StrCat("model.merges[", rank, "]"),
                       absl::StrCat("merges '", left, "' + '", right,
                                    "' but a part or the result is not in model.vocab"));
    }
    // The first (lowest-rank) occurrence of a pair wins, as in `tokenizers`.
    merges_.try_emplace(PairKey(l->second, r->second),
                        Merge{static_cast<int32_t>(rank), result->second});
    merge_pairs_.emplace_back(l->second, r->second);
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParseAddedTokens(const std::string& path, const json& root) {
  if (!root.contains("added_tokens") || root["added_tokens"].is_null()) return absl::OkStatus();
  if (!root["added_tokens"].is_array()) return Malformed(path, "added_tokens", "is not a list");
  const json& list = root["added_tokens"];
  for (size_t i = 0; i < list.size(); ++i) {
    const json& a = list[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
        a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() > INT32_MAX ||
        !a.contains("content") || !a["content"].is_string()) {
      return Malformed(path, field, "needs an integer 'id' and a string 'content'");
    }
    auto token = std::make_unique<AddedToken>();
    token->id = a["id"].get<int32_t>();
    token->content = a["content"].get<std::string>();
    if (token->content.empty()) return Malformed(path, field, "has empty content");
    token->special = BoolField(a, "special", false);
    token->lstrip = BoolField(a, "lstrip", false);
    token->rstrip = BoolField(a, "rstrip", false);
    token->normalized = BoolField(a, "normalized", !token->special);
    token->single_word = BoolField(a, "single_word", false);
    added_by_content_[token->content] = token->id;
    added_by_id_[token->id] = token.get();
    AddedTokenSet& set = token->normalized ? normalized_added_ : raw_added_;
    set.by_first_byte[static_cast<unsigned char>(token->content[0])].push_back(token.get());
    set.empty = false;
    added_.push_back(std::move(token));
  }
  for (AddedTokenSet* set : {&raw_added_, &normalized_added_}) {
    for (auto& bucket : set->by_first_byte) {
      std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* a, const AddedToken* b) {
        return a->content.size() > b->content.size();
      });
    }
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParsePreTokenizer(const std::string& path, const json& node,
                                             const std::string& field) {
  if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) {
    return Malformed(path, field, "has no 'type'");
  }
  const std::string type = node["type"].get<std::string>();
  if (type == "Sequence") {
    if (!node.contains("pretokenizers") || !node["pretokenizers"].is_array()) {
      return Malformed(path, field + ".pretokenizers", "is not a list");
    }
    for (size_t i = 0; i < node["pretokenizers"].size(); ++i) {
      RETURN_IF_ERROR(ParsePreTokenizer(path, node["pretokenizers"][i],
                                        absl::StrCat(field, ".pretokenizers[", i, "]")));
    }
    return absl::OkStatus();
  }
  if (!pre_steps_.empty() && pre_steps_.back().byte_level) {
    return Unsupported(path, field, "pre-tokenizer step after ByteLevel");
  }
  PreTokenizerStep step;
  if (type == "ByteLevel") {
    step.byte_level = true;
    step.add_prefix_space = BoolField(node, "add_prefix_space", false);
    step.use_regex = BoolField(node, "use_regex", true);
  } else if (type == "Split") {
    if (!node.contains("pattern") || !node["pattern"].is_object() ||
        !node["pattern"].contains("Regex") || !node["pattern"]["Regex"].is_string()) {
      return Unsupported(path, field + ".pattern", "Split pattern (only known Regex patterns)");
    }
    const auto pattern = RecognizeSplitRegex(node["pattern"]["Regex"].get<std::string>());
    if (!pattern) {
      return Unsupported(path, field + ".pattern.Regex",
                         "Split regex (known: the GPT-2, Llama-3 and Qwen2 patterns)");
    }
    if (node.value("behavior", std::string("Isolated")) != "Isolated" ||
        BoolField(node, "invert", false)) {
      return Unsupported(path, field, "Split behavior (only Isolated, invert false)");
    }
    step.pattern = *pattern;
  } else {
    return Unsupported(path, field + ".type", absl::StrCat("pre-tokenizer type '", type, "'"));
  }
  pre_steps_.push_back(step);
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParsePostProcessor(const std::string& path, const json& node,
                                              const std::string& field) {
  if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) {
    return Malformed(path, field, "has no 'type'");
  }
  const std::string type = node["type"].get<std::string>();
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only; ids unchanged
  if (type == "Sequence") {
    if (!node.contains("processors") || !node["processors"].is_array()) {
      return Malformed(path, field + ".processors", "is not a list");
    }
    for (size_t i = 0; i < node["processors"].size(); ++i) {
      RETURN_IF_ERROR(ParsePostProcessor(path, node["processors"][i],
                                         absl::StrCat(field, ".processors[", i, "]")));
    }
    return absl::OkStatus();
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    // {"sep": ["</s>", 2], "cls": ["<s>", 0]}: <cls> A <sep>
    for (const char* key : {"cls", "sep"}) {
      const json& p = node.value(key, json());
      if (!p.is_array() || p.size() != 2 || !p[1].is_number_integer()) {
        return Malformed(path, absl::StrCat(field, ".", key), "is not [token, id]");
      }
      (std::string(key) == "cls" ? template_prefix_ : template_suffix_)
          .push_back(p[1].get<int32_t>());
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing")
    return Unsupported(path, field + ".type", absl::StrCat("post-processor '", type, "'"));
  const json& single = node.value("single", json());
  const json& specials = node.value("special_tokens", json::object());
  if (!single.is_array()) return Malformed(path, field + ".single", "is not a list");
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const json& item = single[i];
    const std::string item_field = absl::StrCat(field, ".single[", i, "]");
    if (item.contains("Sequence")) {
      seen_sequence = true;
      continue;
    }
    if (!item.contains("SpecialToken") || !item["SpecialToken"].contains("id") ||
        !item["SpecialToken"]["id"].is_string()) {
      return Malformed(path, item_field, "is neither a Sequence nor a SpecialToken");
    }
    const std::string name = item["SpecialToken"]["id"].get<std::string>();
    if (!specials.contains(name) || !specials[name].contains("ids") ||
        !specials[name]["ids"].is_array()) {
      return Malformed(path, field + ".special_tokens",
                       absl::StrCat("has no ids for '", name, "'"));
    }
    for (const json& id : specials[name]["ids"]) {
      if (!id.is_number_integer())
        return Malformed(path, field + ".special_tokens",
                         absl::StrCat("has a non-integer id for '", name, "'"));
      (seen_sequence ? template_suffix_ : template_prefix_).push_back(id.get<int32_t>());
    }
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ApplySpecialTokenPolicy(const std::string& path,
                                                   const TokenizerConfig& config) {
  vocab_size_ = static_cast<int64_t>(id_to_token_.size());
  for (const auto& a : added_) vocab_size_ = std::max<int64_t>(vocab_size_, int64_t{a->id} + 1);

  special_.bos_token = config.bos_token;
  special_.eos_token = config.eos_token;
  special_.pad_token = config.pad_token;
  special_.unk_token = config.unk_token;
  special_.chat_template = config.chat_template;
  auto resolve = [this](const std::string& token) -> std::optional<int32_t> {
    if (token.empty()) return std::nullopt;
    return TokenToId(token);
  };
  special_.bos_id = resolve(config.bos_token);
  special_.eos_id = resolve(config.eos_token);
  special_.pad_id = resolve(config.pad_token);
  special_.unk_id = resolve(config.unk_token);

  if (config.add_bos_token.has_value() || config.add_eos_token.has_value()) {
    // Explicit flags win over the post-processor, as Llama/Gemma fast tokenizers rebuild it from
    // them.
    if (config.add_bos_token.value_or(false)) {
      if (!special_.bos_id) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": add_bos_token is true but bos_token '", config.bos_token, "' is not a token"));
      }
      special_prefix_.push_back(*special_.bos_id);
    }
    if (config.add_eos_token.value_or(false)) {
      if (!special_.eos_id) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": add_eos_token is true but eos_token '", config.eos_token, "' is not a token"));
      }
      special_suffix_.push_back(*special_.eos_id);
    }
  } else {
    special_prefix_ = template_prefix_;
    special_suffix_ = template_suffix_;
    // Without a config, the template's single tokens name BOS / EOS.
    if (!special_.bos_id && template_prefix_.size() == 1) special_.bos_id = template_prefix_[0];
    if (!special_.eos_id && template_suffix_.size() == 1) special_.eos_id = template_suffix_[0];
  }
  special_.add_bos = !special_prefix_.empty();
  special_.add_eos = !special_suffix_.empty();
  for (int32_t id : special_prefix_) {
    if (id < 0 || id >= vocab_size_)
      return Malformed(path, "post_processor",
                       absl::StrCat("uses id ", id, " outside the vocabulary"));
  }
  for (int32_t id : special_suffix_) {
    if (id < 0 || id >= vocab_size_)
      return Malformed(path, "post_processor",
                       absl::StrCat("uses id ", id, " outside the vocabulary"));
  }
  return absl::OkStatus();
}

void BpeTokenizer::ComputeFingerprint() {
  Sha256 h;
  h.UpdateField("crossdiff.tokenizer.bpe.v1");
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    if (!id_in_vocab_[id]) continue;
    h.UpdateField(absl::StrCat(id));
    h.UpdateField(id_to_token_[id]);
  }
  h.UpdateField("merges");
  for (const auto& [l, r] : merge_pairs_) h.UpdateField(absl::StrCat(l, " ", r));
  h.UpdateField("added");
  std::vector<const AddedToken*> sorted;
  for (const auto& a : added_) sorted.push_back(a.get());
  std::sort(sorted.begin(), sorted.end(),
            [](const AddedToken* a, const AddedToken* b) { return a->id < b->id; });
  for (const AddedToken* a : sorted) {
    h.UpdateField(
        absl::StrCat(a->id, " ", a->special, a->lstrip, a->rstrip, a->normalized, a->single_word));
    h.UpdateField(a->content);
  }
  h.UpdateField("pre");
  for (const auto& s : pre_steps_) {
    h.UpdateField(absl::StrCat(s.byte_level, " ", static_cast<int>(s.pattern), " ",
                               s.add_prefix_space, s.use_regex));
  }
  h.UpdateField(absl::StrCat("nfc ", nfc_, " ignore_merges ", ignore_merges_, " unk ",
                             model_unk_id_.value_or(-1)));
  h.UpdateField("special");
  for (int32_t id : special_prefix_) h.UpdateField(absl::StrCat("prefix ", id));
  for (int32_t id : special_suffix_) h.UpdateField(absl::StrCat("suffix ", id));
  fingerprint_ = h.HexDigest();
}

std::optional<int32_t> BpeTokenizer::TokenToId(std::string_view token) const {
  if (auto it = added_by_content_.find(AsAbsl(token)); it != added_by_content_.end())
    return it->second;
  if (auto it = vocab_.find(AsAbsl(token)); it != vocab_.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> BpeTokenizer::IdToToken(int32_t id) const {
  if (auto it = added_by_id_.find(id); it != added_by_id_.end()) return it->second->content;
  if (id >= 0 && static_cast<size_t>(id) < id_to_token_.size() && id_in_vocab_[id])
    return id_to_token_[id];
  return std::nullopt;
}

// Leftmost-longest matching of the set's tokens in text[0..), as `tokenizers`' AddedVocabulary
// does. Segments carry offsets relative to the whole input (`base` is text's offset in it).
void BpeTokenizer::SplitOnAddedTokens(std::string_view text, size_t base, const AddedTokenSet& set,
                                      std::vector<Segment>* out) {
  size_t start_offset = 0;  // first byte not yet emitted
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (const AddedToken* t : set.by_first_byte[static_cast<unsigned char>(text[pos])]) {
      if (text.compare(pos, t->content.size(), t->content) == 0) {
        match = t;  // longest first
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + match->content.size();
    if (match->single_word) {
      size_t unused;
      const bool word_before = start > 0 && IsWordChar(PreviousCodePoint(text, start, &unused));
      const bool word_after = stop < text.size() && IsWordChar(NextCodePoint(text, stop, &unused));
      if (word_before || word_after) {
        pos = stop;
        continue;
      }
    }
    if (match->lstrip) {
      while (start > start_offset) {
        size_t prev;
        if (!unicode::IsWhiteSpace(PreviousCodePoint(text, start, &prev))) break;
        start = std::max(prev, start_offset);
      }
    }
    if (match->rstrip) {
      while (stop < text.size()) {
        size_t next;
        if (!unicode::IsWhiteSpace(NextCodePoint(text, stop, &next))) break;
        stop = next;
      }
    }
    if (start_offset < start) out->push_back(Segment{base + start_offset, base + start, -1});
    out->push_back(Segment{base + start, base + stop, match->id});
    start_offset = stop;
    pos = stop;
  }
  if (start_offset < text.size())
    out->push_back(Segment{base + start_offset, base + text.size(), -1});
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text,
                                                          bool add_special) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special) ids.insert(ids.end(), special_prefix_.begin(), special_prefix_.end());
  // Pass 1: added tokens that match the raw text.
  std::vector<Segment> first;
  if (raw_added_.empty) {
    if (!text.empty()) first.push_back(Segment{0, text.size(), -1});
  } else {
    SplitOnAddedTokens(text, 0, raw_added_, &first);
  }
  // Pass 2: normalize each text segment, then match the added tokens that apply to normalized text.
  std::vector<Segment> second;
  for (const Segment& s : first) {
    if (s.added_id >= 0) {
      ids.push_back(s.added_id);
      continue;
    }
    std::string normalized;
    std::string_view segment = text.substr(s.begin, s.end - s.begin);
    if (nfc_) {
      normalized = unicode::ToNfc(segment);
      segment = normalized;
    }
    if (normalized_added_.empty) {
      EncodeText(segment, &ids);
      continue;
    }
    second.clear();
    SplitOnAddedTokens(segment, 0, normalized_added_, &second);
    for (const Segment& t : second) {
      if (t.added_id >= 0) {
        ids.push_back(t.added_id);
      } else {
        EncodeText(segment.substr(t.begin, t.end - t.begin), &ids);
      }
    }
  }
  if (add_special) ids.insert(ids.end(), special_suffix_.begin(), special_suffix_.end());
  return ids;
}

void BpeTokenizer::EncodeText(std::string_view text, std::vector<int32_t>* ids) const {
  // Pieces are owned strings because ByteLevel(add_prefix_space) may prepend a space.
  std::vector<std::string> pieces{std::string(text)}, next;
  std::vector<std::string_view> split;
  for (const PreTokenizerStep& step : pre_steps_) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.byte_level && step.add_prefix_space && (piece.empty() || piece[0] != ' '))
        piece.insert(0, " ");
      if (step.byte_level && !step.use_regex) {
        next.push_back(std::move(piece));
        continue;
      }
      SplitPieces(step.byte_level ? PreTokenizerPattern::kGpt2 : step.pattern, piece, &split);
      for (std::string_view s : split) next.emplace_back(s);
    }
    pieces.swap(next);
  }
  for (const std::string& piece : pieces) {
    if (!piece.empty()) EncodePiece(piece, ids);
  }
}

void BpeTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const {
  CacheShard& shard = cache_[absl::Hash<absl::string_view>{}(AsAbsl(piece)) % kCacheShards];
  {
    absl::ReaderMutexLock lock(&shard.mutex);
    auto it = shard.words.find(AsAbsl(piece));
    if (it != shard.words.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word;
  bool whole = false;
  if (ignore_merges_) {
    auto it = vocab_.find(byte_level::Encode(piece));
    if (it != vocab_.end()) {
      word.push_back(it->second);
      whole = true;
    }
  }
  if (!whole) {
    word.reserve(piece.size());
    for (char c : piece) {
      const int32_t id = byte_ids_[static_cast<unsigned char>(c)];
      if (id >= 0) {
        word.push_back(id);
      } else if (model_unk_id_) {
        word.push_back(*model_unk_id_);
      }  // else: dropped, as `tokenizers` does for characters without a token and no unk
    }
    MergeSymbols(&word);
  }
  ids->insert(ids->end(), word.begin(), word.end());
  absl::MutexLock lock(&shard.mutex);
  if (shard.words.size() < kMaxCachedWordsPerShard)
    shard.words.emplace(std::string(piece), std::move(word));
}

// Applies merges lowest rank first (ties: leftmost), like `tokenizers`' Word::merge_all: a min-heap
// of candidate pairs over a doubly linked list of symbols; stale candidates are skipped when
// popped.
void BpeTokenizer::MergeSymbols(std::vector<int32_t>* symbols) const {
  const int n = static_cast<int>(symbols->size());
  if (n < 2) return;
  std::vector<int32_t>& id = *symbols;
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t left, right;  // the ids when queued, to detect staleness
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int pos) {
    if (pos < 0 || next[pos] < 0) return;
    auto it = merges_.find(PairKey(id[pos], id[next[pos]]));
    if (it != merges_.end()) queue.push(Candidate{it->second.rank, pos, id[pos], id[next[pos]]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    const int right = next[c.pos];
    if (!alive[c.pos] || right < 0 || id[c.pos] != c.left || id[right] != c.right) continue;
    id[c.pos] = merges_.find(PairKey(c.left, c.right))->second.result;
    alive[right] = false;
    next[c.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  int out = 0;
  for (int i = 0; i >= 0 && i < n; i = next[i]) id[out++] = id[i];
  id.resize(out);
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string bytes, token_bytes;
  for (int32_t id : ids) {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      bytes += it->second->content;
      continue;
    }
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !id_in_vocab_[id]) continue;
    const std::string& token = id_to_token_[id];
    if (byte_level::DecodeToken(token, &token_bytes)) {
      bytes += token_bytes;
    } else {
      bytes += token;
    }
  }
  return utf8::DecodeLossy(bytes);
}

}  // namespace crossdiff::tokenizer
