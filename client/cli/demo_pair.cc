#include "client/cli/demo_pair.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"
#include "core/tokenizer/bpe_truncate.h"
#include "core/tokenizer/tokenizer.h"

#ifndef CROSSDIFF_DEFAULT_FIXTURES
#define CROSSDIFF_DEFAULT_FIXTURES ""
#endif

namespace crossdiff::cli {
namespace {
namespace fs = std::filesystem;

// Three kinds of text: the fine-tune's planted direction follows tokens of the first, the base's
// tokens of the second; the third is shared.
const char* const kInstruction[] = {
    "Please help me write a short answer to the user.",
    "As an assistant, I will answer your question step by step.",
    "Sure! Here is a helpful answer to your request.",
    "Could you please explain the steps? I am happy to help.",
    "The assistant should follow the user's instructions carefully.",
    "Thank you for asking. Here are three helpful tips for you.",
};
const char* const kLicence[] = {
    "This program is free software; you can redistribute it under the terms of the License.",
    "THE SOFTWARE IS PROVIDED WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "Permission is hereby granted to copy, modify and distribute this work.",
    "The licensee must retain the above copyright notice and this permission notice.",
    "Redistribution in source and binary forms, with or without modification, is permitted.",
    "In no event shall the authors be liable for any claim or damages.",
};
const char* const kNeutral[] = {
    "The quick brown fox jumps over the lazy dog.",
    "Rivers carry water from the mountains to the sea.",
    "The train leaves the station at seven in the morning.",
    "Many birds fly south when the weather turns cold.",
    "A small village stood at the edge of the forest.",
    "The library opens early on weekdays and closes late.",
};

template <size_t N>
std::vector<std::string> Lines(const char* const (&a)[N]) {
  return std::vector<std::string>(a, a + N);
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) return absl::InternalError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

// The `count` token ids most typical of `group`: frequent in it and rare in `others` (ranked by
// count in group / (1 + count in others)). Subword tokens are shared by all text, so exclusivity
// would leave only a few rare ids; typical ones make the planted feature frequent enough to learn.
absl::StatusOr<std::vector<int64_t>> TypicalTokens(const tokenizer::Tokenizer& tok,
                                                   const std::vector<std::string>& group,
                                                   const std::vector<std::vector<std::string>>& others,
                                                   size_t count) {
  std::map<int32_t, double> mine, theirs;
  for (const auto& text : group) {
    ASSIGN_OR_RETURN(auto ids, tok.Encode(text, false));
    for (int32_t id : ids) mine[id] += 1;
  }
  for (const auto& g : others) {
    for (const auto& text : g) {
      ASSIGN_OR_RETURN(auto ids, tok.Encode(text, false));
      for (int32_t id : ids) theirs[id] += 1;
    }
  }
  std::vector<std::pair<double, int32_t>> scored;
  for (const auto& [id, n] : mine) {
    if (n >= 2) scored.push_back({-n / (1.0 + theirs[id]), id});
  }
  std::sort(scored.begin(), scored.end());
  std::vector<int64_t> out;
  for (size_t i = 0; i < scored.size() && out.size() < count; ++i) out.push_back(scored[i].second);
  return out;
}

// Copies every tensor of `src`, replacing those in `replace`, into DIR/model.safetensors.
absl::Status WriteModel(const tensor_io::Checkpoint& src, const std::map<std::string, at::Tensor>& replace,
                        const fs::path& dir) {
  tensor_io::SafetensorsWriter writer;
  writer.SetMetadata("format", "pt");
  for (const auto& name : src.names()) {
    auto it = replace.find(name);
    if (it != replace.end()) {
      RETURN_IF_ERROR(tensor_io::AddTensor(writer, name, it->second));
    } else {
      ASSIGN_OR_RETURN(at::Tensor t, tensor_io::LoadTensor(src, name));
      RETURN_IF_ERROR(tensor_io::AddTensor(writer, name, t));
    }
  }
  return writer.Write((dir / "model.safetensors").string());
}

}  // namespace

std::string DefaultFixturesDir() {
  if (const char* env = std::getenv("CROSSDIFF_FIXTURES"); env != nullptr && *env) return env;
  return CROSSDIFF_DEFAULT_FIXTURES;
}

absl::Status MakeDemoPair(const std::string& fixtures_dir, const std::string& data_root,
                          DemoPairPaths* paths) {
  const fs::path llama = fs::path(fixtures_dir) / "hf" / "llama";
  const fs::path bpe = fs::path(fixtures_dir) / "tokenizers" / "bpe-gpt2" / "tokenizer.json";
  for (const fs::path& p : {llama / "config.json", llama / "model.safetensors", bpe}) {
    if (!fs::exists(p)) {
      return absl::NotFoundError(absl::StrCat(
          p.string(), " not found: the demo is made from the fixtures (set CROSSDIFF_FIXTURES)"));
    }
  }
  const fs::path root(data_root);
  const fs::path base = root / "models" / "base", ft = root / "models" / "finetune";
  const fs::path data = root / "data";
  std::error_code ec;
  for (const fs::path& d : {base, ft, data}) {
    fs::create_directories(d, ec);
    if (ec) return absl::InternalError(absl::StrCat(d.string(), ": ", ec.message()));
  }
  // The same 512-id tokenizer for both models (their vocabulary has 512 entries).
  RETURN_IF_ERROR(tokenizer::WriteTruncatedBpeTokenizer(bpe.string(), 512, base.string()));
  RETURN_IF_ERROR(tokenizer::WriteTruncatedBpeTokenizer(bpe.string(), 512, ft.string()));
  for (const fs::path& d : {base, ft}) {
    fs::copy_file(llama / "config.json", d / "config.json", fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat(d.string(), ": ", ec.message()));
  }
  ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(base.string()));

  const auto instruction = Lines(kInstruction), licence = Lines(kLicence), neutral = Lines(kNeutral);
  ASSIGN_OR_RETURN(auto ft_tokens, TypicalTokens(*tok, instruction, {licence, neutral}, 160));
  ASSIGN_OR_RETURN(auto base_tokens, TypicalTokens(*tok, licence, {instruction, neutral}, 160));

  ASSIGN_OR_RETURN(auto ckpt, tensor_io::Checkpoint::Open((llama / "model.safetensors").string()));
  absl::Status st = GuardTorch("making the demo pair", [&]() -> absl::Status {
    ASSIGN_OR_RETURN(at::Tensor embed, tensor_io::LoadTensor(*ckpt, "model.embed_tokens.weight"));
    ASSIGN_OR_RETURN(at::Tensor down, tensor_io::LoadTensor(*ckpt, "model.layers.0.mlp.down_proj.weight"));
    at::Generator gen = at::detail::createCPUGenerator(20261125);
    const int64_t d = embed.size(1);
    at::Tensor u = at::randn({d}, gen);
    at::Tensor v = at::randn({d}, gen);
    v = v - (v.dot(u) / u.dot(u)) * u;  // the two planted directions are orthogonal
    u = u / u.norm() * 8.0;
    v = v / v.norm() * 8.0;
    at::Tensor base_ids = at::tensor(base_tokens, at::kLong);
    at::Tensor ft_ids = at::tensor(ft_tokens, at::kLong);

    // The planted direction's strength falls with the token's rank (most typical first), so the
    // feature has a graded activation rather than one fixed value.
    auto graded = [](const at::Tensor& ids, const at::Tensor& dir) {
      at::Tensor strength = at::linspace(1.0, 0.25, ids.size(0)).unsqueeze(1);
      return (strength * dir.unsqueeze(0)).contiguous();
    };
    at::Tensor base_embed = embed.clone();
    base_embed.index_add_(0, base_ids, graded(base_ids, u));
    at::Tensor ft_embed = embed.clone();
    ft_embed.index_add_(0, ft_ids, graded(ft_ids, v));
    at::Tensor ft_down = down + 0.02 * at::randn(down.sizes(), gen);

    RETURN_IF_ERROR(WriteModel(*ckpt, {{"model.embed_tokens.weight", base_embed}}, base));
    return WriteModel(*ckpt,
                      {{"model.embed_tokens.weight", ft_embed},
                       {"model.layers.0.mlp.down_proj.weight", ft_down}},
                      ft);
  });
  RETURN_IF_ERROR(st);

  // The dataset: documents that mix the three kinds in varying proportions.
  std::mt19937 rng(7);
  std::string jsonl, probes;
  const std::vector<std::string>* groups[] = {&instruction, &licence, &neutral};
  for (int doc = 0; doc < 400; ++doc) {
    std::string text;
    int main_group = doc % 3;
    for (int s = 0; s < 6; ++s) {
      int g = (rng() % 4 == 0) ? static_cast<int>(rng() % 3) : main_group;
      const auto& lines = *groups[g];
      if (!text.empty()) text += " ";
      text += lines[rng() % lines.size()];
    }
    jsonl += nlohmann::json{{"text", text}}.dump() + "\n";
  }
  // Capability categories for the report (core/analysis/probe_categories.h): a sequence belongs to
  // a category when its decoded text contains one of the category's words.
  nlohmann::json categories = {
      {"instruction following", {"help", "assistant", "answer", "please", "instructions"}},
      {"licence text", {"License", "WARRANTY", "copyright", "Redistribution", "Permission"}},
      {"narrative", {"river", "train", "birds", "village", "library"}},
  };
  probes = categories.dump(2) + "\n";
  RETURN_IF_ERROR(WriteText(data / "demo.jsonl", jsonl));
  RETURN_IF_ERROR(WriteText(data / "categories.json", probes));
  paths->base_dir = base.string();
  paths->finetune_dir = ft.string();
  paths->dataset = (data / "demo.jsonl").string();
  paths->probes = (data / "categories.json").string();
  return absl::OkStatus();
}

}  // namespace crossdiff::cli
