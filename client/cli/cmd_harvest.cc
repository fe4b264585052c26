// `crossdiff harvest`: paired activation harvest into an activation store (DESIGN.md 3.1, 3.2).
#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "core/comm/launch.h"
#include "core/common/cli_args.h"
#include "core/common/progress.h"
#include "core/harvest/harvest.h"

namespace crossdiff::cli {
namespace {

// Prints the live progress line: redrawn in place on a terminal, one line per update otherwise.
void PrintProgress(const ProgressUpdate& u) {
  static const bool tty = isatty(fileno(stderr));
  std::string line = absl::StrFormat("[harvest] %d tokens, %.0f tokens/s", u.done, u.rate);
  if (u.total > 0) {
    line += absl::StrFormat(" (%.1f%% of ~%d) ETA %s",
                            100.0 * static_cast<double>(u.done) / static_cast<double>(u.total),
                            u.total, ProgressMeter::FormatDuration(u.eta_s));
  }
  if (!u.extra.empty()) line += "  " + u.extra;
  if (tty) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), u.final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

}  // namespace

int RunHarvest(int argc, char** argv) {
  CommandLine cl("crossdiff harvest",
                 "Runs a base model and its fine-tune on the same tokens and writes the residual "
                 "stream after block --layer of both to an activation store (docs/datasets.md).");
  harvest::HarvestOptions o;
  auto& base = cl.AddString("base", "", "base model directory (HF checkpoint)", true);
  auto& finetune = cl.AddString("finetune", "", "fine-tuned model directory", true);
  auto& data = cl.AddString("data", "", "dataset: JSONL text/chat or tokens .safetensors", true);
  auto& layer = cl.AddInt("layer", -1, "block whose output is harvested (0-based)", true);
  auto& out = cl.AddString("out", "", "output activation store directory", true);
  auto& data_format = cl.AddString("data-format", "auto", "text | chat | tokens | auto");
  auto& chat_format =
      cl.AddString("chat-format", "",
                   "gemma | llama3 | chatml (default: from the base's tokenizer_config.json)");
  auto& max_tokens = cl.AddInt("max-tokens", 0,
                               "tokens (rows) to harvest, rounded up to whole sequences; 0 = all");
  auto& seq_len = cl.AddInt("seq-len", 1024, "packed sequence length (tokens: cap on row length)");
  auto& batch = cl.AddInt("batch", 8, "sequences per forward pass");
  auto& dtype = cl.AddString("dtype", "float32", "stored activations: float32 | bfloat16");
  auto& skip_first = cl.AddInt("skip-first", 0, "leading tokens of each sequence not stored");
  auto& rows_per_shard = cl.AddInt("rows-per-shard", 65536, "rows per store shard");
  auto& device = cl.AddString("device", "cpu", "cpu | cuda | cuda:N");
  auto& threads = cl.AddInt("threads", 0, "LibTorch threads (0 = default)");
  auto& quiet = cl.AddBool("quiet", "no progress line");
  auto& sequence_begin =
      cl.AddInt("sequence-begin", 0, "with --sequence-end: first sequence of the part to harvest");
  auto& sequence_end = cl.AddInt("sequence-end", -1,
                                 "harvest only sequences [begin, end) into a store of their own "
                                 "(joined by crossdiff merge-stores); -1: all");
  auto& fixed_ranges =
      cl.AddBool("fixed-ranges",
                 "with several ranks: rank r harvests the r-th of W equal ranges instead of "
                 "claiming chunks of the data as it goes");
  // Sharded harvest: --nproc N (local ranks) or --rank/--world-size/--rendezvous. Ranks claim
  // chunks of the sequences from a counter in the rendezvous store (or take fixed ranges); after a
  // barrier rank 0 merges the part manifests into one store.
  // The barrier waits for the slowest rank, hence the long default timeout (a rank that dies is
  // noticed at once: its connections close).
  comm::LaunchFlags launch = comm::AddLaunchFlags(cl, /*default_timeout_s=*/7 * 24 * 3600.0);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  absl::StatusOr<std::optional<int>> launched = comm::MaybeLaunchLocal(launch);
  if (!launched.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(launched.status().message()).c_str());
    return 1;
  }
  if (launched->has_value()) return **launched;  // this process launched the ranks
  absl::StatusOr<std::unique_ptr<comm::Communicator>> comm = comm::ConnectFromFlags(launch);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(comm.status().message()).c_str());
    return 1;
  }
  const int rank = (*comm)->rank();
  const int world_size = (*comm)->world_size();

  o.base_dir = base;
  o.finetune_dir = finetune;
  o.data_path = data;
  o.layer = static_cast<int>(layer);
  o.out_dir = out;
  o.data_format = data_format;
  o.chat_format = chat_format;
  o.max_tokens = max_tokens;
  o.seq_len = seq_len;
  o.batch_size = batch;
  o.dtype = dtype;
  o.skip_first = skip_first;
  o.rows_per_shard = rows_per_shard;
  o.device = device;
  o.threads = static_cast<int>(threads);
  o.sequence_begin = sequence_begin;
  o.sequence_end = sequence_end;
  o.rank = rank;
  o.world_size = world_size;
  if (world_size > 1 && !fixed_ranges) {
    comm::Communicator* c = comm->get();
    o.claim_chunk = [c]() -> absl::StatusOr<int64_t> {
      absl::StatusOr<int64_t> claimed = c->AddToCounter("harvest/next_chunk", 1);
      if (!claimed.ok()) return claimed.status();
      return *claimed - 1;
    };
  }

  auto result =
      harvest::RunHarvest(o, quiet || rank != 0 ? ProgressMeter::Callback() : PrintProgress);
  if (!result.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  if (world_size > 1) {
    // Every rank's rows, loop seconds and chunks; gathering them is also the barrier after which
    // every part manifest is written. Its wait is rank 0's wait for the slowest rank, so rank 0's
    // loop plus this gather is the span every rank's rows took.
    const auto barrier_start = std::chrono::steady_clock::now();
    at::Tensor mine = at::tensor({static_cast<double>(result->rows), result->seconds,
                                  static_cast<double>(result->chunks.size())},
                                 at::kDouble);
    at::Tensor all = at::empty({3 * world_size}, at::kDouble);
    if (absl::Status st = (*comm)->AllGather(mine, all); !st.ok()) {
      std::fprintf(stderr, "error: waiting for the other ranks: %s\n",
                   std::string(st.message()).c_str());
      return 1;
    }
    if (rank != 0) return 0;
    auto merged = harvest::MergeHarvestParts(o.out_dir, world_size);
    if (!merged.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(merged.status().message()).c_str());
      return 1;
    }
    const double span =
        result->seconds +
        std::chrono::duration<double>(std::chrono::steady_clock::now() - barrier_start).count();
    const double* per_rank = all.data_ptr<double>();
    for (int r = 0; r < world_size; ++r) {
      const double rows = per_rank[3 * r], seconds = per_rank[3 * r + 1];
      std::printf("rank %d: %.0f rows in %.1f s (%.0f rows/s), %.0f chunks\n", r, rows, seconds,
                  seconds > 0 ? rows / seconds : 0.0, per_rank[3 * r + 2]);
    }
    std::printf(
        "wrote %lld rows (layer %d, d_model %lld, %s) in %zu shards from %d ranks to %s: "
        "%.0f tokens/s over all ranks (rank 0 %.0f tokens/s)\n",
        static_cast<long long>(merged->rows), o.layer, static_cast<long long>(merged->d_model),
        o.dtype.c_str(), merged->shards.size(), world_size, o.out_dir.c_str(),
        span > 0 ? static_cast<double>(merged->rows) / span : 0.0, result->rows_per_second);
    return 0;
  }
  std::printf("wrote %lld rows (layer %d, d_model %lld, %s) in %zu shards to %s: %.0f tokens/s\n",
              static_cast<long long>(result->rows), o.layer,
              static_cast<long long>(result->manifest.d_model), o.dtype.c_str(),
              result->manifest.shards.size(), o.out_dir.c_str(), result->rows_per_second);
  return 0;
}

}  // namespace crossdiff::cli
