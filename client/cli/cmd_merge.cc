// `crossdiff merge-stores --out STORE PART...`: joins activation stores harvested from consecutive
// sequence ranges (the coordinator's harvest tasks) into one store, in the order given. Shards are
// hard-linked where possible (copied across file systems); the manifest is written last, so an
// interrupted merge never reads as complete.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "core/activations/manifest.h"
#include "core/activations/store.h"
#include "core/common/cli_args.h"
#include "core/common/status_macros.h"

namespace crossdiff::cli {
namespace {
namespace fs = std::filesystem;

absl::StatusOr<activations::Manifest> MergeStores(const std::vector<std::string>& parts,
                                                  const std::string& out) {
  if (parts.empty()) return absl::InvalidArgumentError("merge-stores: no part given");
  if (fs::exists(fs::path(out) / "manifest.json")) {
    return absl::FailedPreconditionError(
        absl::StrCat(out, ": already holds a complete activation store"));
  }
  std::error_code ec;
  fs::remove_all(out, ec);
  fs::create_directories(out, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(out, ": ", ec.message()));

  activations::Manifest merged;
  int64_t shard_index = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    // Opening validates every shard of the part against its manifest.
    ASSIGN_OR_RETURN(auto reader, activations::StoreReader::Open(parts[p]));
    const activations::Manifest& m = reader->manifest();
    if (p == 0) {
      merged = m;
      merged.rows = 0;
      merged.shards.clear();
    } else if (m.models != merged.models || m.layer != merged.layer ||
               m.d_model != merged.d_model || m.dtype != merged.dtype || m.site != merged.site) {
      return absl::InvalidArgumentError(absl::StrCat(
          parts[p], ": models, layer, site, d_model or dtype differ from ", parts[0]));
    }
    for (const auto& shard : m.shards) {
      std::string name = absl::StrFormat("shard-%06d.safetensors", shard_index++);
      fs::path src = fs::path(parts[p]) / shard.file, dst = fs::path(out) / name;
      fs::create_hard_link(src, dst, ec);
      if (ec) {
        ec.clear();
        fs::copy_file(src, dst, fs::copy_options::overwrite_existing, ec);
        if (ec) return absl::InternalError(absl::StrCat(src.string(), " -> ", dst.string(), ": ", ec.message()));
      }
      merged.shards.push_back({name, shard.rows});
      merged.rows += shard.rows;
    }
  }
  RETURN_IF_ERROR(merged.Save(out));
  // Re-open: the merged store must validate like any other.
  ASSIGN_OR_RETURN(auto check, activations::StoreReader::Open(out));
  return check->manifest();
}

}  // namespace

int RunMergeStores(int argc, char** argv) {
  CommandLine cl("crossdiff merge-stores",
                 "Joins activation stores of consecutive sequence ranges into one store (in order).");
  cl.SetPositionalHelp("PART...", 1, 0);
  auto& out = cl.AddString("out", "", "the store to create", true);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto merged = MergeStores(cl.positional(), out);
  if (!merged.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(merged.status().message()).c_str());
    return 1;
  }
  std::printf("%s: %lld rows in %zu shards from %zu parts\n", out.c_str(),
              static_cast<long long>(merged->rows), merged->shards.size(), cl.positional().size());
  return 0;
}

}  // namespace crossdiff::cli
