#include "tests/harvest/model_dirs.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::harvest::testing {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": bad JSON"));
  return j;
}

absl::Status WriteJson(const std::string& path, const nlohmann::json& j) {
  std::ofstream out(path);
  out << j.dump(2);
  return out ? absl::OkStatus() : absl::InternalError(absl::StrCat(path, ": write failed"));
}

// Rewrites every tensor of src's checkpoint through `fn` into dst/model.safetensors.
template <typename Fn>
absl::Status RewriteWeights(const std::string& src, const std::string& dst, Fn fn) {
  fs::create_directories(dst);
  ASSIGN_OR_RETURN(auto ckpt, tensor_io::Checkpoint::Open(src));
  tensor_io::SafetensorsWriter writer;
  for (const std::string& name : ckpt->names()) {
    ASSIGN_OR_RETURN(at::Tensor t, tensor_io::LoadTensor(*ckpt, name));
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, name, fn(name, t)));
  }
  return writer.Write((fs::path(dst) / "model.safetensors").string());
}

}  // namespace

std::string LlamaFixtureDir() {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  std::string root = env != nullptr ? env : CROSSDIFF_SOURCE_DIR "/../shared/fixtures";
  return root + "/hf/llama";
}

absl::Status WritePerturbedCopy(const std::string& src, const std::string& dst, double scale,
                                uint64_t seed) {
  fs::create_directories(dst);
  fs::copy_file(fs::path(src) / "config.json", fs::path(dst) / "config.json",
                fs::copy_options::overwrite_existing);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return RewriteWeights(src, dst, [&](const std::string&, const at::Tensor& t) {
    if (!t.is_floating_point()) return t;
    return t + scale * at::randn(t.sizes(), gen, t.options());
  });
}

absl::Status WriteConfigVariant(const std::string& src, const std::string& dst,
                                const std::string& key, int64_t value) {
  fs::create_directories(dst);
  ASSIGN_OR_RETURN(nlohmann::json config, ReadJson(src + "/config.json"));
  config[key] = value;
  RETURN_IF_ERROR(WriteJson(dst + "/config.json", config));
  fs::copy_file(fs::path(src) / "model.safetensors", fs::path(dst) / "model.safetensors",
                fs::copy_options::overwrite_existing);
  return absl::OkStatus();
}

absl::Status WriteVocabVariant(const std::string& src, const std::string& dst, int64_t vocab) {
  fs::create_directories(dst);
  ASSIGN_OR_RETURN(nlohmann::json config, ReadJson(src + "/config.json"));
  config["vocab_size"] = vocab;
  RETURN_IF_ERROR(WriteJson(dst + "/config.json", config));
  return RewriteWeights(src, dst, [&](const std::string& name, const at::Tensor& t) {
    if (name == "model.embed_tokens.weight" || name == "lm_head.weight") {
      return t.slice(0, 0, vocab).contiguous();
    }
    return t;
  });
}

absl::Status WriteSmallTokenizer(const std::string& dir, int merges) {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  std::string root = env != nullptr ? env : CROSSDIFF_SOURCE_DIR "/../shared/fixtures";
  ASSIGN_OR_RETURN(nlohmann::json tok, ReadJson(root + "/tokenizers/bpe-gpt2/tokenizer.json"));
  ASSIGN_OR_RETURN(nlohmann::json config,
                   ReadJson(root + "/tokenizers/bpe-gpt2/tokenizer_config.json"));
  const int64_t keep = 256 + merges;  // ids below this survive
  nlohmann::json vocab = nlohmann::json::object();
  for (auto it = tok["model"]["vocab"].begin(); it != tok["model"]["vocab"].end(); ++it) {
    if (it.value().get<int64_t>() < keep) vocab[it.key()] = it.value();
  }
  const int64_t eot = keep, im_start = keep + 1, im_end = keep + 2;
  vocab["<|endoftext|>"] = eot;
  tok["model"]["vocab"] = vocab;
  nlohmann::json kept_merges = nlohmann::json::array();
  for (int i = 0; i < merges; ++i) kept_merges.push_back(tok["model"]["merges"][i]);
  tok["model"]["merges"] = kept_merges;
  tok["added_tokens"][0]["id"] = eot;
  tok["added_tokens"][1]["id"] = im_start;
  tok["added_tokens"][2]["id"] = im_end;

  nlohmann::json decoder = nlohmann::json::object();
  decoder[std::to_string(eot)] = config["added_tokens_decoder"]["1756"];
  decoder[std::to_string(im_start)] = config["added_tokens_decoder"]["1757"];
  decoder[std::to_string(im_end)] = config["added_tokens_decoder"]["1758"];
  config["added_tokens_decoder"] = decoder;
  config["chat_template"] =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
  fs::create_directories(dir);
  RETURN_IF_ERROR(WriteJson(dir + "/tokenizer.json", tok));
  return WriteJson(dir + "/tokenizer_config.json", config);
}

absl::Status WriteTokensDataset(const std::string& path, const at::Tensor& input_ids,
                                const at::Tensor& attention_mask) {
  tensor_io::SafetensorsWriter writer;
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "input_ids", input_ids.to(at::kLong)));
  if (attention_mask.defined()) {
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "attention_mask", attention_mask.to(at::kLong)));
  }
  return writer.Write(path);
}

}  // namespace crossdiff::harvest::testing
