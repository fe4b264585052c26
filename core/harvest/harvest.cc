#include "core/harvest/harvest.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <functional>
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
                           const ModelPair& pair, const HarvestResult& r, int64_t num_chunks) {
  nlohmann::json extra = {
      {"dataset", o.data_path},
      {"data_format", std::string(data::DataFormatName(dataset.format))},
      {"seq_len", dataset.seq_len},
      {"skip_first", o.skip_first},
      {"max_tokens", o.max_tokens},
      {"sequences", r.sequences},
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
    extra["chunk_count"] = num_chunks;
    nlohmann::json taken = nlohmann::json::array();
    for (const HarvestedChunk& c : r.chunks) {
      taken.push_back({{"index", c.index},
                       {"first_sequence", c.first_sequence},
                       {"end_sequence", c.end_sequence},
                       {"shards", c.shards}});
    }
    extra["chunks"] = std::move(taken);
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

// Right-pads batch[0, n) into `ids` / `mask` [n, width] and lists the rows to store; counts the
// attended tokens into `*tokens_run`. INVALID_ARGUMENT for a token id outside the vocabulary.
absl::Status PackBatch(const HarvestOptions& o, int64_t vocab,
                       const std::vector<data::TokenSequence>& batch, int64_t n, at::Tensor* ids,
                       at::Tensor* mask, StoredRows* rows, int64_t* tokens_run) {
  int64_t width = 0;
  for (int64_t b = 0; b < n; ++b) width = std::max(width, batch[b].length());
  *ids = at::zeros({n, width}, at::kLong);  // padding id 0: any valid id will do
  *mask = at::zeros({n, width}, at::kLong);
  int64_t* ids_p = ids->data_ptr<int64_t>();
  int64_t* mask_p = mask->data_ptr<int64_t>();
  rows->clear();
  for (int64_t b = 0; b < n; ++b) {
    const data::TokenSequence& s = batch[b];
    for (int64_t t = 0; t < s.length(); ++t) {
      if (!s.attention[t]) continue;
      const int32_t id = s.token_ids[t];
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat(o.data_path, ": sequence ", s.sequence_id, " position ", t, ": token id ",
                         id, " is outside the vocabulary [0, ", vocab, ") of ", o.base_dir));
      }
      ids_p[b * width + t] = id;
      mask_p[b * width + t] = 1;
      ++*tokens_run;
      if (!s.stored[t]) continue;
      rows->flat_index.push_back(b * width + t);
      rows->token_ids.push_back(id);
      rows->sequence_ids.push_back(s.sequence_id);
      rows->positions.push_back(static_cast<int32_t>(t));
    }
  }
  return absl::OkStatus();
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

  // What this process harvests: `chunks` tile the part of the dataset being harvested, in order,
  // and `next_chunk` says which of them this process takes next (an index past the end: done).
  // One process, or an explicit range: one chunk, streamed (no count needed). Ranks: the total a
  // single process would harvest (a tokenising pass for text/chat, capped at the budget), split
  // into W fixed ranges (chunk r is rank r's), or into guided chunks claimed as the ranks go.
  std::vector<data::SequenceRange> chunks{{0, budget}};
  const bool claiming = o.world_size > 1 && o.claim_chunk != nullptr;
  const int64_t own_chunk = o.world_size > 1 && !claiming ? o.rank : 0;
  if (o.sequence_end >= 0) {
    if (o.world_size > 1 || o.sequence_begin < 0 || o.sequence_end < o.sequence_begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence range [", o.sequence_begin, ", ", o.sequence_end,
                       ") is invalid (or combined with several ranks)"));
    }
    const int64_t end = std::min(o.sequence_end, budget);
    chunks[0] = {std::min(o.sequence_begin, end), end};
  } else if (o.world_size > 1 || dataset.format == data::DataFormat::kTokens) {
    ASSIGN_OR_RETURN(const int64_t total, data::CountSequences(dataset, encoder, budget));
    if (claiming) {
      ASSIGN_OR_RETURN(chunks, data::GuidedChunks(total, o.world_size, o.batch_size));
    } else {
      chunks.clear();
      for (int r = 0; r < o.world_size; ++r) {
        ASSIGN_OR_RETURN(data::SequenceRange part, data::RankRange(total, r, o.world_size));
        chunks.push_back(part);
      }
    }
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::function<absl::StatusOr<int64_t>()> next_chunk = o.claim_chunk;
  if (!claiming) {
    next_chunk = [own_chunk, num_chunks, taken = false]() mutable -> absl::StatusOr<int64_t> {
      if (taken) return num_chunks;
      taken = true;
      return own_chunk;
    };
  }
  // A claiming rank reads the whole range forwards, skipping the chunks others take.
  const data::SequenceRange reader_range =
      claiming ? data::SequenceRange{0, chunks.empty() ? 0 : chunks.back().end} : chunks[own_chunk];
  ASSIGN_OR_RETURN(auto reader, data::OpenSequenceReader(dataset, encoder, reader_range));

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
  // The store first: a directory holding a complete store is refused before the slow loads. This
  // writer takes the fixed chunk; a claiming rank opens one per chunk it claims.
  ASSIGN_OR_RETURN(auto writer, activations::StoreWriter::Create(o.out_dir, store));
  // Blocks after o.layer never run, so they are not loaded.
  ASSIGN_OR_RETURN(auto base, models::CausalLM::Load(o.base_dir, device, std::nullopt, o.layer));
  ASSIGN_OR_RETURN(auto finetune,
                   models::CausalLM::Load(o.finetune_dir, device, std::nullopt, o.layer));

  HarvestResult result;
  const int64_t stored_per_sequence = seq_len - o.skip_first;
  const int64_t covered = chunks.empty() ? 0 : chunks.back().end;
  int64_t expected = 0;  // sequences this process expects to harvest (0: unknown)
  if (covered != data::kUnboundedSequences) {
    expected = claiming ? covered / o.world_size : chunks[own_chunk].size();
  }
  ProgressMeter meter("harvest", "tokens", expected * stored_per_sequence, /*out=*/nullptr,
                      o.progress_interval_s);
  if (progress) meter.set_callback(progress);
  auto progress_note = [&](int64_t chunk) {
    std::string note = absl::StrFormat("%d sequences", result.sequences);
    if (claiming && chunk >= 0) {
      absl::StrAppendFormat(&note, ", chunk %d of %d", chunk + 1, num_chunks);
    }
    return note;
  };

  c10::InferenceMode inference_mode;
  std::vector<data::TokenSequence> batch(o.batch_size);
  StoredRows rows;
  std::vector<activations::Manifest> parts;  // one per chunk taken, in the order taken
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    ASSIGN_OR_RETURN(const int64_t c, next_chunk());
    if (c < 0 || c >= num_chunks) break;
    if (!result.chunks.empty() && c <= result.chunks.back().index) {
      return absl::InternalError(absl::StrCat("rank ", o.rank, " claimed chunk ", c,
                                              " after chunk ", result.chunks.back().index,
                                              ": the chunk counter is not shared or was reset"));
    }
    const data::SequenceRange chunk = chunks[c];
    if (claiming) {
      store.shard_prefix = ChunkShardPrefix(c);
      ASSIGN_OR_RETURN(writer, activations::StoreWriter::Create(o.out_dir, store));
    }
    reader->SkipTo(chunk.begin);
    HarvestedChunk taken{c, chunk.begin, chunk.begin, 0};
    bool done = false;
    while (!done && taken.end_sequence < chunk.end) {
      if (o.cancel != nullptr && o.cancel->load()) {
        return absl::CancelledError(absl::StrCat("harvest into ", o.out_dir, " cancelled after ",
                                                 result.rows, " rows; no manifest written"));
      }
      const int64_t want = std::min(o.batch_size, chunk.end - taken.end_sequence);
      int64_t n = 0;
      while (n < want) {
        ASSIGN_OR_RETURN(bool more, reader->Next(&batch[n]));
        if (!more) {
          done = true;
          break;
        }
        ++n;
      }
      if (n == 0) break;
      taken.end_sequence = batch[n - 1].sequence_id + 1;

      at::Tensor ids, mask;
      RETURN_IF_ERROR(PackBatch(o, vocab, batch, n, &ids, &mask, &rows, &result.tokens_run));
      const int64_t width = ids.size(1);
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
      meter.Update(result.rows, progress_note(c));
    }
    // A chunk's shards are complete before the next chunk is claimed.
    ASSIGN_OR_RETURN(activations::Manifest part, writer->Finish(/*write_manifest=*/false));
    taken.shards = static_cast<int64_t>(part.shards.size());
    parts.push_back(std::move(part));
    result.chunks.push_back(taken);
  }
  if (o.world_size == 1 && result.rows == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.data_path, ": no token to harvest (", result.sequences,
                     " sequences, every token skipped by skip_first or padding)"));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.rows_per_second = result.seconds > 0 ? result.rows / result.seconds : 0;

  // This process's manifest: its chunks' shards in the order taken (a rank that took none: no
  // shards). Written last: its presence is what makes the store (or the part) complete.
  if (parts.empty()) {
    ASSIGN_OR_RETURN(activations::Manifest empty, writer->Finish(/*write_manifest=*/false));
    parts.push_back(std::move(empty));
  }
  ASSIGN_OR_RETURN(result.manifest, activations::MergeManifests(parts));
  result.manifest.extra_json = ProvenanceJson(o, dataset, pair, result, num_chunks);
  if (o.world_size == 1) {
    RETURN_IF_ERROR(result.manifest.Save(o.out_dir));
  } else {
    RETURN_IF_ERROR(result.manifest.SaveFile(PartManifestPath(o.out_dir, o.rank, o.world_size)));
  }
  meter.Finish(result.rows, progress_note(result.chunks.empty() ? -1 : result.chunks.back().index));
  return result;
}

}  // namespace

std::string PartManifestPath(const std::string& out_dir, int rank, int world_size) {
  return absl::StrFormat("%s/manifest.part-%05d-of-%05d.json", out_dir, rank, world_size);
}

std::string ShardPrefix(int rank, int world_size) {
  return world_size > 1 ? absl::StrFormat("shard-r%05d-", rank) : std::string("shard-");
}

std::string ChunkShardPrefix(int64_t chunk) { return absl::StrFormat("shard-c%06d-", chunk); }

absl::StatusOr<HarvestResult> RunHarvest(const HarvestOptions& options,
                                         ProgressMeter::Callback progress) {
  return GuardTorch(absl::StrCat("harvest into ", options.out_dir),
                    [&]() { return RunHarvestImpl(options, progress); });
}

}  // namespace crossdiff::harvest
