// MergeHarvestParts (declared in core/harvest/harvest.h): the last step of a sharded harvest.
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/harvest/harvest.h"

namespace crossdiff::harvest {

absl::StatusOr<activations::Manifest> MergeHarvestParts(const std::string& out_dir,
                                                        int world_size) {
  namespace fs = std::filesystem;
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world_size));
  }
  if (fs::exists(fs::path(out_dir) / "manifest.json")) {
    return absl::FailedPreconditionError(
        absl::StrCat(out_dir, "/manifest.json already exists: the store is complete"));
  }
  // Every part's shards, cut into its chunks; then the chunks in schedule order.
  struct Taken {
    int rank = 0;
    activations::Manifest shards;  // the part's manifest with only this chunk's shards
  };
  std::map<int64_t, Taken> by_chunk;
  int64_t chunk_count = -1;
  int64_t sequences = 0, tokens_run = 0;
  activations::Manifest rank0;  // its provenance becomes the store's
  for (int rank = 0; rank < world_size; ++rank) {
    const std::string path = PartManifestPath(out_dir, rank, world_size);
    if (!fs::exists(path)) {
      return absl::NotFoundError(absl::StrCat("rank ", rank, " of ", world_size,
                                              " has not finished: ", path, " is missing"));
    }
    ASSIGN_OR_RETURN(activations::Manifest part, activations::Manifest::LoadFile(path));
    for (const activations::ShardInfo& shard : part.shards) {
      if (!fs::exists(fs::path(out_dir) / shard.file)) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": shard ", shard.file, " is missing from ", out_dir));
      }
    }
    nlohmann::json extra = nlohmann::json::parse(part.extra_json, nullptr, false);
    if (!extra.is_object() || !extra.contains("chunks") || !extra["chunks"].is_array() ||
        !extra.value("chunk_count", nlohmann::json()).is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": extra has no chunk list (chunks, chunk_count)"));
    }
    const int64_t count = extra["chunk_count"].get<int64_t>();
    if (chunk_count >= 0 && count != chunk_count) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": chunk_count ", count, " differs from rank 0's ", chunk_count));
    }
    chunk_count = count;
    if (rank == 0) rank0 = part;
    sequences += extra.value("sequences", int64_t{0});
    tokens_run += extra.value("tokens_run", int64_t{0});
    size_t next_shard = 0;
    for (const nlohmann::json& c : extra["chunks"]) {
      const int64_t index = c.value("index", int64_t{-1});
      const int64_t shards = c.value("shards", int64_t{-1});
      if (index < 0 || index >= count || shards < 0 ||
          next_shard + static_cast<size_t>(shards) > part.shards.size()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": chunk entry ", c.dump(),
                                                       " is malformed or lists more shards than ",
                                                       "the part has (", part.shards.size(), ")"));
      }
      if (auto it = by_chunk.find(index); it != by_chunk.end()) {
        return absl::InvalidArgumentError(absl::StrCat("chunk ", index, " of ", count,
                                                       " was harvested by rank ", it->second.rank,
                                                       " and by rank ", rank, " (", path, ")"));
      }
      Taken t{rank, part};
      t.shards.shards.assign(
          part.shards.begin() + static_cast<std::ptrdiff_t>(next_shard),
          part.shards.begin() + static_cast<std::ptrdiff_t>(next_shard + shards));
      next_shard += static_cast<size_t>(shards);
      by_chunk.emplace(index, std::move(t));
    }
    if (next_shard != part.shards.size()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": its chunks list ", next_shard,
                                                     " shards but it has ", part.shards.size()));
    }
  }
  for (int64_t c = 0; c < chunk_count; ++c) {
    if (!by_chunk.count(c)) {
      return absl::InvalidArgumentError(absl::StrCat("chunk ", c, " of ", chunk_count,
                                                     " is in no rank's part manifest: its "
                                                     "sequences were never harvested"));
    }
  }
  // Chunk order = sequence order, so the merged shard list reads like a single-process store.
  std::vector<activations::Manifest> parts;
  for (auto& [index, taken] : by_chunk) parts.push_back(std::move(taken.shards));
  if (parts.empty()) {
    rank0.shards.clear();
    rank0.rows = 0;
    parts.push_back(rank0);
  }
  ASSIGN_OR_RETURN(activations::Manifest merged, activations::MergeManifests(parts));
  // Rank 0's provenance, made store-wide.
  nlohmann::json extra = nlohmann::json::parse(rank0.extra_json, nullptr, false);
  if (!extra.is_object()) extra = nlohmann::json::object();
  for (const char* key : {"rank", "chunks"}) extra.erase(key);
  extra["world_size"] = world_size;
  extra["sequences"] = sequences;
  extra["tokens_run"] = tokens_run;
  merged.extra_json = extra.dump();
  RETURN_IF_ERROR(merged.Save(out_dir));
  return merged;
}

}  // namespace crossdiff::harvest
