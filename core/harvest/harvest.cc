#include "core/harvest/harvest.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/activations/store.h"
#include "core/common/compute_threads.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/data/dataset.h"
#include "core/data/sequence_range.h"
#include "core/harvest/pairing.h"
#include "core/models/causal_lm.h"

namespace crossdiff::harvest {
namespace {

absl::Status ValidateOptions(const HarvestOptions& o) {
  if (o.base_dir.empty()) return absl::InvalidArgumentError("no base model directory given");
  if (o.finetune_dir.empty()) return absl::InvalidArgumentError("no fine-tune directory given");
  if (o.data_path.empty()) return absl::InvalidArgumentError("no dataset given");
  if (o.out_dir.empty()) return absl::InvalidArgumentError("no output store directory given");
  if (o.dtype != "float32" && o.dtype != "bfloat16") {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype \"", o.dtype, "\" is not float32 or bfloat16"));
  }
  if (o.batch_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch size must be positive, got ", o.batch_size));
  }
  if (o.rows_per_shard <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows per shard must be positive, got ", o.rows_per_shard));
  }
  if (o.max_tokens < 0) return absl::InvalidArgumentError("max tokens must not be negative");
  if (o.skip_first < 0) return absl::InvalidArgumentError("skip_first must not be negative");
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", o.rank, " is outside [0, world size ", o.world_size, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Device> ParseDevice(const std::string& name) {
  try {
    return at::Device(name);
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat("device \"", name, "\" is not cpu, cuda or cuda:N"));
  }
}

absl::StatusOr<data::ChatFormat> ChooseChatFormat(const HarvestOptions& o, const ModelPair& pair) {
  if (!o.chat_format.empty()) return data::ParseChatFormat(o.chat_format);
  if (pair.tokenizer != nullptr && !pair.tokenizer->chat_template().empty()) {
    auto format = data::DetectChatFormatFromTemplate(pair.tokenizer->chat_template());
    if (format.ok()) return format;
    return absl::InvalidArgumentError(absl::StrCat(o.base_dir, ": ", format.status().message(),
                                                   " (pass --chat-format gemma|llama3|chatml)"));
  }
  return data::DetectChatFormat(o.base_dir);
}

std::string ProvenanceJson(const HarvestOptions& o, const data::DatasetOptions& dataset,
                           const ModelPair& pair, const HarvestResult& r) {
  nlohmann::json extra = {
      {"dataset", o.data_path},
      {"data_format", std::string(data::DataFormatName(dataset.format))},
      {"seq_len", dataset.seq_len},
      {"skip_first", o.skip_first},
      {"max_tokens", o.max_tokens},
      {"sequences", r.end_sequence - r.first_sequence},
      {"tokens_run", r.tokens_run},
  };
  if (dataset.format == data::DataFormat::kChat) {
    extra["chat_format"] = std::string(data::ChatFormatName(dataset.chat_format));
  }
  if (pair.tokenizer != nullptr) {
    extra["tokenizer"] = o.base_dir;
    extra["tokenizer_fingerprint"] = pair.tokenizer_fingerprint;
  } else {
    extra["tokenizer"] = nullptr;
  }
  if (o.world_size > 1) {
    extra["rank"] = o.rank;
    extra["world_size"] = o.world_size;
    extra["first_sequence"] = r.first_sequence;
    extra["end_sequence"] = r.end_sequence;
  }
  return extra.dump();
}

// The rows of one padded batch that are stored: flat indices into [B * T] plus their metadata.
struct StoredRows {
  std::vector<int64_t> flat_index;
  std::vector<int32_t> token_ids;
  std::vector<int64_t> sequence_ids;
  std::vector<int32_t> positions;
  void clear() {
    flat_index.clear();
    token_ids.clear();
    sequence_ids.clear();
    positions.clear();
  }
};

template <typename T>
at::Tensor CopyToTensor(const std::vector<T>& v, at::ScalarType type) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(type));
  std::copy(v.begin(), v.end(), t.data_ptr<T>());
  return t;
}

absl::StatusOr<HarvestResult> RunHarvestImpl(const HarvestOptions& o,
                                             ProgressMeter::Callback progress) {
  RETURN_IF_ERROR(ValidateOptions(o));
  ASSIGN_OR_RETURN(at::Device device, ParseDevice(o.device));
  ASSIGN_OR_RETURN(ModelPair pair, LoadModelPair(o.base_dir, o.finetune_dir, o.layer));

  // The dataset, tokenised once with the (shared) tokenizer.
  data::DatasetOptions dataset;
  dataset.path = o.data_path;
  if (o.data_format.empty() || o.data_format == "auto") {
    ASSIGN_OR_RETURN(dataset.format, data::DetectDataFormat(o.data_path));
  } else {
    ASSIGN_OR_RETURN(dataset.format, data::ParseDataFormat(o.data_format));
  }
  dataset.skip_first = o.skip_first;
  dataset.seq_len = o.seq_len;
  data::TextEncoder encoder;
  if (dataset.format != data::DataFormat::kTokens) {
    if (pair.tokenizer == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(o.base_dir, " has no tokenizer (tokenizer.json / tokenizer.model): a ",
                       std::string(data::DataFormatName(dataset.format)),
                       " dataset needs one; use a pre-tokenized (tokens) dataset instead"));
    }
    if (dataset.format == data::DataFormat::kChat) {
      ASSIGN_OR_RETURN(dataset.chat_format, ChooseChatFormat(o, pair));
    }
    const tokenizer::Tokenizer* tok = pair.tokenizer.get();
    encoder.encode = [tok](std::string_view text) { return tok->Encode(text, false); };
    encoder.bos_id = tok->bos_id();
    encoder.eos_id = tok->eos_id();
  }
  ASSIGN_OR_RETURN(const int64_t seq_len, data::EffectiveSequenceLength(dataset));
  dataset.seq_len = seq_len;
  ASSIGN_OR_RETURN(const int64_t budget,
                   data::SequencesForTokenBudget(o.max_tokens, seq_len, o.skip_first));

  // This process's part of the dataset. A single process needs no count (it streams to the end);
  // ranks need the total to split it (a tokenising pass for text/chat, capped at the budget).
  data::SequenceRange range{0, budget};
  if (o.sequence_end >= 0) {
    if (o.world_size > 1 || o.sequence_begin < 0 || o.sequence_end < o.sequence_begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence range [", o.sequence_begin, ", ", o.sequence_end,
                       ") is invalid (or combined with several ranks)"));
    }
    range = {o.sequence_begin, std::min(o.sequence_end, budget)};
    range.begin = std::min(range.begin, range.end);
  } else if (o.world_size > 1 || dataset.format == data::DataFormat::kTokens) {
    // What a single process would harvest: the token budget, capped by the dataset.
    ASSIGN_OR_RETURN(int64_t total, data::CountSequences(dataset, encoder, budget));
    ASSIGN_OR_RETURN(range, data::RankRange(total, o.rank, o.world_size));
  }
  ASSIGN_OR_RETURN(auto reader, data::OpenSequenceReader(dataset, encoder, range));

  const int64_t d_model = pair.base.hidden_size;
  const int64_t vocab = pair.base.vocab_size;
  const at::ScalarType store_type = o.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  SetComputeThreads(static_cast<int>(o.threads));

  activations::StoreWriter::Options store;
  store.models = {o.base_dir, o.finetune_dir};
  store.layer = o.layer;
  store.d_model = d_model;
  store.dtype = o.dtype;
  store.rows_per_shard = o.rows_per_shard;
  store.shard_prefix = ShardPrefix(o.rank, o.world_size);
  // The store first: a directory holding a complete store is refused before the slow loads.
  ASSIGN_OR_RETURN(auto writer, activations::StoreWriter::Create(o.out_dir, store));
  // Blocks after o.layer never run, so they are not loaded.
  ASSIGN_OR_RETURN(auto base, models::CausalLM::Load(o.base_dir, device, std::nullopt, o.layer));
  ASSIGN_OR_RETURN(auto finetune,
                   models::CausalLM::Load(o.finetune_dir, device, std::nullopt, o.layer));

  HarvestResult result;
  result.first_sequence = range.begin;
  const int64_t stored_per_sequence = seq_len - o.skip_first;
  const bool range_known = range.end != data::kUnboundedSequences;
  ProgressMeter meter("harvest", "tokens", range_known ? range.size() * stored_per_sequence : 0,
                      /*out=*/nullptr, o.progress_interval_s);
  if (progress) meter.set_callback(progress);

  c10::InferenceMode inference_mode;
  std::vector<data::TokenSequence> batch(o.batch_size);
  StoredRows rows;
  const auto start = std::chrono::steady_clock::now();
  int64_t last_sequence = range.begin - 1;
  bool done = false;
  while (!done) {
    if (o.cancel != nullptr && o.cancel->load()) {
      return absl::CancelledError(absl::StrCat("harvest into ", o.out_dir, " cancelled after ",
                                               result.rows, " rows; no manifest written"));
    }
    int64_t n = 0;
    while (n < o.batch_size) {
      ASSIGN_OR_RETURN(bool more, reader->Next(&batch[n]));
      if (!more) {
        done = true;
        break;
      }
      ++n;
    }
    if (n == 0) break;

    int64_t width = 0;
    for (int64_t b = 0; b < n; ++b) width = std::max(width, batch[b].length());
    at::Tensor ids = at::zeros({n, width}, at::kLong);  // padding id 0: any valid id will do
    at::Tensor mask = at::zeros({n, width}, at::kLong);
    int64_t* ids_p = ids.data_ptr<int64_t>();
    int64_t* mask_p = mask.data_ptr<int64_t>();
    rows.clear();
    for (int64_t b = 0; b < n; ++b) {
      const data::TokenSequence& s = batch[b];
      for (int64_t t = 0; t < s.length(); ++t) {
        if (!s.attention[t]) continue;
        const int32_t id = s.token_ids[t];
        if (id < 0 || id >= vocab) {
          return absl::InvalidArgumentError(absl::StrCat(
              o.data_path, ": sequence ", s.sequence_id, " position ", t, ": token id ", id,
              " is outside the vocabulary [0, ", vocab, ") of ", o.base_dir));
        }
        ids_p[b * width + t] = id;
        mask_p[b * width + t] = 1;
        ++result.tokens_run;
        if (!s.stored[t]) continue;
        rows.flat_index.push_back(b * width + t);
        rows.token_ids.push_back(id);
        rows.sequence_ids.push_back(s.sequence_id);
        rows.positions.push_back(static_cast<int32_t>(t));
      }
      last_sequence = s.sequence_id;
    }
    result.sequences += n;
    if (rows.flat_index.empty()) continue;  // every token skipped or padding

    at::Tensor ids_dev = ids.to(device);
    at::Tensor mask_dev = mask.to(device);
    ASSIGN_OR_RETURN(at::Tensor base_out, base->ResidualAfterBlock(ids_dev, mask_dev, o.layer));
    ASSIGN_OR_RETURN(at::Tensor ft_out, finetune->ResidualAfterBlock(ids_dev, mask_dev, o.layer));
    at::Tensor index = CopyToTensor(rows.flat_index, at::kLong).to(device);
    at::Tensor both = at::stack({base_out.reshape({n * width, d_model}).index_select(0, index),
                                 ft_out.reshape({n * width, d_model}).index_select(0, index)},
                                /*dim=*/1);
    activations::ActivationBatch out;
    out.activations = both.to(at::kCPU, store_type).contiguous();
    out.token_ids = CopyToTensor(rows.token_ids, at::kInt);
    out.sequence_ids = CopyToTensor(rows.sequence_ids, at::kLong);
    out.positions = CopyToTensor(rows.positions, at::kInt);
    RETURN_IF_ERROR(writer->Append(out));
    result.rows += out.rows();
    meter.Update(result.rows, absl::StrFormat("%d sequences", result.sequences));
  }
  result.end_sequence = result.sequences > 0 ? last_sequence + 1 : range.begin;
  if (o.world_size == 1 && result.rows == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.data_path, ": no token to harvest (", result.sequences,
                     " sequences, every token skipped by skip_first or padding)"));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.rows_per_second = result.seconds > 0 ? result.rows / result.seconds : 0;

  // Flush the last shard, then write the manifest (single process) or this rank's part manifest.
  // Either goes last: its presence is what makes the store (or the part) complete.
  ASSIGN_OR_RETURN(result.manifest, writer->Finish(/*write_manifest=*/false));
  result.manifest.extra_json = ProvenanceJson(o, dataset, pair, result);
  if (o.world_size == 1) {
    RETURN_IF_ERROR(result.manifest.Save(o.out_dir));
  } else {
    RETURN_IF_ERROR(result.manifest.SaveFile(PartManifestPath(o.out_dir, o.rank, o.world_size)));
  }
  meter.Finish(result.rows, absl::StrFormat("%d sequences", result.sequences));
  return result;
}

}  // namespace

std::string PartManifestPath(const std::string& out_dir, int rank, int world_size) {
  return absl::StrFormat("%s/manifest.part-%05d-of-%05d.json", out_dir, rank, world_size);
}

std::string ShardPrefix(int rank, int world_size) {
  return world_size > 1 ? absl::StrFormat("shard-r%05d-", rank) : std::string("shard-");
}

absl::StatusOr<HarvestResult> RunHarvest(const HarvestOptions& options,
                                         ProgressMeter::Callback progress) {
  return GuardTorch(absl::StrCat("harvest into ", options.out_dir),
                    [&]() { return RunHarvestImpl(options, progress); });
}

}  // namespace crossdiff::harvest
