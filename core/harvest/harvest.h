// The paired harvest: runs a base model and its fine-tune on exactly the same tokens and streams
// the residual stream after block `layer` of both into an activation store (DESIGN.md 3.2).
//
//   HarvestOptions o;  o.base_dir = ...; o.finetune_dir = ...; o.data_path = ...; o.layer = 4;
//   o.out_dir = "store";
//   ASSIGN_OR_RETURN(HarvestResult r, RunHarvest(o, /*progress=*/nullptr));
//
// RunHarvest is the engine entry point shared by `crossdiff harvest` and the worker daemon: it
// never prints and never exits; progress goes to the callback.
//
// Pipeline: check that the models can be paired (same d_model, vocabulary size and tokenizer, see
// core/harvest/pairing.h) -> tokenise the dataset once (core/data) -> for each batch of
// `batch_size` sequences, right-pad to the longest, run CausalLM::ResidualAfterBlock on both models
// (blocks after `layer` never run) -> drop padding and the first `skip_first` tokens of each
// sequence -> append to a StoreWriter (memory bounded by one shard; shards written atomically).
// manifest.json is written last, so an interrupted or failed harvest never reads as complete.
//
// Sharded harvest (several ranks filling one store, DESIGN.md 5, docs/datasets.md "Sharding"):
// with world_size W > 1 the ranks split the sequences a single process would harvest (`total`)
// into chunks that tile [0, total) in order, and each chunk's rows go to shards of their own:
//   - claiming (`claim_chunk` set, what `crossdiff harvest` does): the chunks are
//     GuidedChunks(total, W, batch_size) (core/data/sequence_range.h); each rank asks claim_chunk
//     for the next unclaimed chunk until none is left, so a faster rank takes more of them.
//     Chunk c's shards are `shard-cCCCCCC-NNNNNN.safetensors`.
//   - fixed (`claim_chunk` empty): chunk r = RankRange(total, r, W) is rank r's; its shards are
//     `shard-rRRRRR-NNNNNN.safetensors`.
// Instead of manifest.json a rank writes a part manifest, PartManifestPath(out_dir, r, W) (same
// format as manifest.json, shard names relative to out_dir, `extra.chunks` listing the chunks it
// took). Once every rank has finished (the caller's barrier), one process calls
// MergeHarvestParts, which checks that every chunk was harvested exactly once and writes
// out_dir/manifest.json listing the shards in chunk order: the store then holds, row for row,
// what a single-process harvest writes (only the shard boundaries differ).
//
// Thread-safety: RunHarvest may run concurrently on different out_dirs, but it sets LibTorch's
// global intra-op thread count when `threads` > 0.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/activations/manifest.h"
#include "core/common/progress.h"

namespace crossdiff::harvest {

struct HarvestOptions {
  std::string base_dir;      // HF checkpoint directory of the base model
  std::string finetune_dir;  // ... and of its fine-tune
  std::string data_path;
  std::string data_format = "auto";  // "text" | "chat" | "tokens" | "auto" (by extension/content)
  std::string chat_format;  // "gemma" | "llama3" | "chatml"; empty: from the base's template
  int layer = -1;           // block whose output (resid_post) is harvested, 0-based
  std::string out_dir;
  int64_t max_tokens = 0;  // rows to harvest, rounded up to whole sequences; 0 = whole dataset
  int64_t seq_len = 1024;  // packed sequence length (text/chat); tokens: cap on the row length
  int64_t batch_size = 8;  // sequences per forward pass
  std::string dtype = "float32";  // stored activations: "float32" | "bfloat16"
  int64_t skip_first = 0;         // leading tokens of each sequence not stored
  int64_t rows_per_shard = 65536;
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N"
  int threads = 0;             // LibTorch intra-op threads; 0 = leave as is
  int rank = 0;
  int world_size = 1;
  // world_size > 1: returns the index of the next chunk this rank harvests, from one counter that
  // all ranks share (0, 1, 2, ... across the ranks together, each index to one caller; an index
  // past the last chunk means none is left). Empty: fixed ranges. Called from RunHarvest's thread.
  std::function<absl::StatusOr<int64_t>()> claim_chunk;
  // An explicit part of the dataset's sequences, [sequence_begin, sequence_end), harvested into a
  // store of its own (the coordinator's harvest tasks; their stores are joined by
  // `crossdiff merge-stores`). sequence_end < 0: not used. Exclusive with world_size > 1.
  int64_t sequence_begin = 0;
  int64_t sequence_end = -1;
  // Seconds between progress callbacks (the final one is always sent).
  double progress_interval_s = 1.0;
  // When non-null and set, the harvest stops before its next batch and returns CANCELLED; the
  // shards already written stay, the manifest is not written.
  const std::atomic<bool>* cancel = nullptr;
};

// A chunk of the dataset's sequences that this process harvested.
struct HarvestedChunk {
  int64_t index = 0;           // in the chunk schedule
  int64_t first_sequence = 0;  // [first_sequence, end_sequence)
  int64_t end_sequence = 0;
  int64_t shards = 0;  // its shards, consecutive in the process's manifest
};

struct HarvestResult {
  // world_size 1: the store's manifest. Otherwise this rank's part manifest.
  activations::Manifest manifest;
  int64_t rows = 0;                    // activation rows written by this process
  int64_t sequences = 0;               // sequences run through both models
  int64_t tokens_run = 0;              // non-padding tokens fed to each model (stored or skipped)
  std::vector<HarvestedChunk> chunks;  // in the order harvested (increasing index)
  double seconds = 0;                  // wall time of the harvest loop (after loading)
  double rows_per_second = 0;          // rows / seconds
};

// Runs the harvest described above. Errors (each one line naming the input):
//   INVALID_ARGUMENT: bad options (layer out of range for either model, unknown dtype/format,
//     skip_first >= seq_len, rank outside [0, world_size)), models that cannot be paired (message
//     names both directories and the differing property), malformed or empty dataset, token ids
//     outside the vocabulary;
//   NOT_FOUND: missing model directory / config / dataset;
//   FAILED_PRECONDITION: out_dir already holds a complete store (manifest.json);
//   CANCELLED: `cancel` was set;
//   INTERNAL: a LibTorch failure, with context.
absl::StatusOr<HarvestResult> RunHarvest(const HarvestOptions& options,
                                         ProgressMeter::Callback progress);

// Rank `rank`'s part manifest: OUT/manifest.part-RRRRR-of-WWWWW.json.
std::string PartManifestPath(const std::string& out_dir, int rank, int world_size);
// The shard file prefix rank `rank` uses when world_size > 1 ("shard-rRRRRR-"); "shard-" otherwise.
std::string ShardPrefix(int rank, int world_size);
// The shard file prefix of chunk `chunk` of a claiming harvest ("shard-cCCCCCC-").
std::string ChunkShardPrefix(int64_t chunk);

// Combines the part manifests of ranks 0..world_size-1 into OUT/manifest.json, shards in chunk
// order, and returns it. NOT_FOUND naming the rank when a part is missing (that rank has not
// finished); INVALID_ARGUMENT when parts disagree (models, layer, d_model, dtype, chunk count), a
// chunk is in no part or in two, a part's chunk list does not match its shards, or a listed shard
// file is missing;
// FAILED_PRECONDITION when OUT/manifest.json already exists. The part manifests are kept (they
// record each rank's sequence range); the store's readers ignore them.
absl::StatusOr<activations::Manifest> MergeHarvestParts(const std::string& out_dir, int world_size);

}  // namespace crossdiff::harvest
