// Test helpers that build model directories and datasets from the fixtures: a fine-tune with
// perturbed weights, variants that cannot be paired, and a small byte-level BPE tokenizer whose ids
// fit the fixtures' 512-token vocabulary.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace crossdiff::harvest::testing {

// The Llama fixture (../shared/fixtures/hf/llama): hidden 64, 3 blocks, vocab 512.
std::string LlamaFixtureDir();

// Copies config.json and writes model.safetensors with every floating tensor t replaced by
// t + scale * N(0, 1) (seeded).
absl::Status WritePerturbedCopy(const std::string& src, const std::string& dst, double scale,
                                uint64_t seed);

// Copies config.json with `key` set to `value` (an integer) and the weights unchanged.
absl::Status WriteConfigVariant(const std::string& src, const std::string& dst,
                                const std::string& key, int64_t value);

// A copy whose vocabulary is cut to `vocab` ids (config vocab_size, embed_tokens and lm_head rows).
absl::Status WriteVocabVariant(const std::string& src, const std::string& dst, int64_t vocab);

// Writes tokenizer.json + tokenizer_config.json into `dir`: the bpe-gpt2 fixture tokenizer cut to
// its 256 byte tokens and first `merges` merges (ids < 256 + merges), then <|endoftext|> (BOS/EOS),
// <|im_start|>, <|im_end|>; the config has a ChatML chat_template.
absl::Status WriteSmallTokenizer(const std::string& dir, int merges = 240);

// Writes a tokens dataset: input_ids [S, T] I64 and, when defined, attention_mask [S, T] I64.
absl::Status WriteTokensDataset(const std::string& path, const at::Tensor& input_ids,
                                const at::Tensor& attention_mask);

}  // namespace crossdiff::harvest::testing
