// MergeHarvestParts (declared in core/harvest/harvest.h): the last step of a sharded harvest.
#include <filesystem>
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
  std::vector<activations::Manifest> parts;
  int64_t sequences = 0, tokens_run = 0;
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
    if (extra.is_object()) {
      sequences += extra.value("sequences", int64_t{0});
      tokens_run += extra.value("tokens_run", int64_t{0});
    }
    parts.push_back(std::move(part));
  }
  // Rank order = sequence order, so the merged shard list reads like a single-process store.
  ASSIGN_OR_RETURN(activations::Manifest merged, activations::MergeManifests(parts));
  nlohmann::json extra = nlohmann::json::parse(merged.extra_json, nullptr, false);
  if (!extra.is_object()) extra = nlohmann::json::object();
  for (const char* key : {"rank", "first_sequence", "end_sequence"}) extra.erase(key);
  extra["world_size"] = world_size;
  extra["sequences"] = sequences;
  extra["tokens_run"] = tokens_run;
  merged.extra_json = extra.dump();
  RETURN_IF_ERROR(merged.Save(out_dir));
  return merged;
}

}  // namespace crossdiff::harvest
