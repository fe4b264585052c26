#include "core/activations/shuffling_reader.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::activations {
namespace {

using Json = nlohmann::json;

// splitmix64: a well-mixed 64-bit sequence from any seed. Its own implementation (not <random>
// distributions, not at::randperm) so the stream is identical across compilers and LibTorch
// versions, which resuming a run on another machine relies on.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) by multiply-shift (bias below n / 2^64, negligible here).
  uint64_t Below(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >> 64);
  }

 private:
  uint64_t state_;
};

uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b) {
  SplitMix64 g(seed ^ (a * 0xd1b54a32d192ed03ull) ^ (b * 0x8cb92ba72f3d8dd7ull));
  g.Next();
  return g.Next();
}

template <typename T>
void Shuffle(std::vector<T>& v, uint64_t seed) {
  SplitMix64 g(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[g.Below(i)]);
}

constexpr uint64_t kChunkStream = 0;
constexpr uint64_t kWindowStream = 1;

}  // namespace

absl::StatusOr<std::unique_ptr<ShufflingReader>> ShufflingReader::Create(
    const StoreReader* store, ShufflingReaderOptions options) {
  if (store == nullptr) return absl::InvalidArgumentError("shuffling reader: null store");
  const std::string what = absl::StrCat("shuffling reader over ", store->dir());
  auto bad = [&](const std::string& option, const std::string& problem) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": option '", option, "' ", problem));
  };
  if (options.batch_size <= 0) {
    return bad("batch_size", absl::StrCat("is ", options.batch_size, ", must be > 0"));
  }
  if (options.buffer_rows <= 0) {
    return bad("buffer_rows", absl::StrCat("is ", options.buffer_rows, ", must be > 0"));
  }
  if (options.chunk_rows < 0) {
    return bad("chunk_rows", absl::StrCat("is ", options.chunk_rows, ", must be >= 0"));
  }
  if (options.world_size <= 0) {
    return bad("world_size", absl::StrCat("is ", options.world_size, ", must be > 0"));
  }
  if (options.rank < 0 || options.rank >= options.world_size) {
    return bad("rank",
               absl::StrCat("is ", options.rank, ", must be in [0, ", options.world_size, ")"));
  }
  const int64_t end = options.row_end < 0 ? store->rows() : options.row_end;
  if (options.row_begin < 0 || options.row_begin > end || end > store->rows()) {
    return bad("row_begin/row_end",
               absl::StrCat("give [", options.row_begin, ", ", end,
                            "), not inside the store's [0, ", store->rows(), ")"));
  }
  std::unique_ptr<ShufflingReader> r(new ShufflingReader());
  r->store_ = store;
  r->options_ = options;
  r->row_begin_ = options.row_begin;
  r->row_end_ = end;
  r->chunk_rows_ =
      options.chunk_rows > 0 ? options.chunk_rows : std::max<int64_t>(1, options.buffer_rows / 16);
  r->chunk_rows_ = std::min(r->chunk_rows_, options.buffer_rows);
  r->chunks_per_window_ = std::max<int64_t>(1, options.buffer_rows / r->chunk_rows_);
  const int64_t rows = end - options.row_begin;
  r->num_chunks_ = (rows + r->chunk_rows_ - 1) / r->chunk_rows_;
  const int64_t global = options.batch_size * options.world_size;
  r->batches_per_epoch_ = rows / global;
  if (!options.drop_last && rows % global >= options.world_size) ++r->batches_per_epoch_;
  if (r->batches_per_epoch_ == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": rows [", options.row_begin, ", ", end, ") hold ", rows,
                     " rows, too few for one batch of ", options.batch_size, " on each of ",
                     options.world_size, " rank(s)", options.drop_last ? " (drop_last)" : ""));
  }
  return r;
}

absl::StatusOr<std::unique_ptr<ShufflingReader>> ShufflingReader::Open(
    const std::string& dir, ShufflingReaderOptions options) {
  ASSIGN_OR_RETURN(std::unique_ptr<StoreReader> store, StoreReader::Open(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<ShufflingReader> r, Create(store.get(), options));
  r->owned_store_ = std::move(store);
  return r;
}

void ShufflingReader::PlanEpoch(int64_t epoch) {
  if (planned_epoch_ == epoch) return;
  if (current_window_ >= 0) {
    // Leaving a window: drop its mapped pages.
    const int64_t lo = current_window_ * chunks_per_window_;
    const int64_t hi = std::min(num_chunks_, lo + chunks_per_window_);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t c = chunk_order_[i];
      store_->ReleaseRows(row_begin_ + c * chunk_rows_, row_begin_ + (c + 1) * chunk_rows_);
    }
  }
  chunk_order_.resize(num_chunks_);
  std::iota(chunk_order_.begin(), chunk_order_.end(), 0);
  if (options_.shuffle) {
    Shuffle(chunk_order_, MixSeed(options_.seed, kChunkStream, static_cast<uint64_t>(epoch)));
  }
  window_start_.clear();
  int64_t pos = 0;
  for (int64_t i = 0; i < num_chunks_; ++i) {
    if (i % chunks_per_window_ == 0) window_start_.push_back(pos);
    const int64_t c = chunk_order_[i];
    pos += std::min(row_end_, row_begin_ + (c + 1) * chunk_rows_) - (row_begin_ + c * chunk_rows_);
  }
  window_start_.push_back(pos);
  planned_epoch_ = epoch;
  current_window_ = -1;
  window_rows_.clear();
}

void ShufflingReader::LoadWindow(int64_t window) {
  if (current_window_ == window) return;
  const int64_t lo = window * chunks_per_window_;
  const int64_t hi = std::min(num_chunks_, lo + chunks_per_window_);
  if (current_window_ >= 0) {
    const int64_t old_lo = current_window_ * chunks_per_window_;
    const int64_t old_hi = std::min(num_chunks_, old_lo + chunks_per_window_);
    for (int64_t i = old_lo; i < old_hi; ++i) {
      const int64_t c = chunk_order_[i];
      store_->ReleaseRows(row_begin_ + c * chunk_rows_, row_begin_ + (c + 1) * chunk_rows_);
    }
  }
  // Read this window and the next one ahead in large sequential requests, so the random row
  // copies below hit the page cache and the next window's I/O overlaps this window's batches.
  const int64_t ahead = std::min(num_chunks_, hi + chunks_per_window_);
  for (int64_t i = lo; i < ahead; ++i) {
    const int64_t c = chunk_order_[i];
    store_->PrefetchRows(row_begin_ + c * chunk_rows_,
                         std::min(row_end_, row_begin_ + (c + 1) * chunk_rows_));
  }
  window_rows_.clear();
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t c = chunk_order_[i];
    const int64_t first = row_begin_ + c * chunk_rows_;
    const int64_t last = std::min(row_end_, first + chunk_rows_);
    for (int64_t row = first; row < last; ++row) window_rows_.push_back(row);
  }
  if (options_.shuffle) {
    Shuffle(window_rows_, MixSeed(options_.seed, kWindowStream + static_cast<uint64_t>(window),
                                  static_cast<uint64_t>(planned_epoch_)));
  }
  current_window_ = window;
}

int64_t ShufflingReader::RowAt(int64_t p) {
  auto it = std::upper_bound(window_start_.begin(), window_start_.end(), p);
  const int64_t window = static_cast<int64_t>(it - window_start_.begin()) - 1;
  LoadWindow(window);
  return window_rows_[p - window_start_[window]];
}

void ShufflingReader::NextBatchRows() {
  if (cursor_.batch >= batches_per_epoch_) {
    ++cursor_.epoch;
    cursor_.batch = 0;
  }
  PlanEpoch(cursor_.epoch);
  const int64_t L = row_end_ - row_begin_;
  const int64_t B = options_.batch_size;
  const int64_t W = options_.world_size;
  const int64_t r = options_.rank;
  const int64_t start = cursor_.batch * B * W;
  const int64_t size = std::min(B * W, L - start);
  int64_t lo, hi;
  if (size == B * W) {
    lo = start + r * B;
    hi = lo + B;
  } else {  // the final partial batch (drop_last = false), split evenly over the ranks
    lo = start + size * r / W;
    hi = start + size * (r + 1) / W;
  }
  batch_rows_.clear();
  for (int64_t p = lo; p < hi; ++p) batch_rows_.push_back(RowAt(p));
}

absl::StatusOr<ActivationBatch> ShufflingReader::Next() {
  NextBatchRows();
  ASSIGN_OR_RETURN(ActivationBatch batch, store_->GatherRows(batch_rows_, options_.as_float));
  ++cursor_.batch;
  return batch;
}

absl::Status ShufflingReader::NextActivations(float* out) {
  NextBatchRows();
  RETURN_IF_ERROR(store_->GatherActivations(batch_rows_, out));
  ++cursor_.batch;
  return absl::OkStatus();
}

std::string ShufflingReader::State() const {
  Json j = {{"format", "crossdiff.shuffling_reader"},
            {"epoch", cursor_.epoch},
            {"batch", cursor_.batch},
            {"seed", options_.seed},
            {"batch_size", options_.batch_size},
            {"world_size", options_.world_size},
            {"buffer_rows", options_.buffer_rows},
            {"chunk_rows", chunk_rows_},
            {"row_begin", row_begin_},
            {"row_end", row_end_},
            {"drop_last", options_.drop_last},
            {"shuffle", options_.shuffle},
            {"store_rows", store_->rows()}};
  return j.dump();
}

absl::Status ShufflingReader::Restore(const std::string& state) {
  Json j = Json::parse(state, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || j.value("format", "") != "crossdiff.shuffling_reader") {
    return absl::InvalidArgumentError(
        "shuffling reader state: not a crossdiff.shuffling_reader "
        "state");
  }
  Json mine = Json::parse(State());
  for (const char* key : {"seed", "batch_size", "world_size", "buffer_rows", "chunk_rows",
                          "row_begin", "row_end", "drop_last", "shuffle", "store_rows"}) {
    if (!j.contains(key) || j[key] != mine[key]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shuffling reader state: '", key, "' was ", j.contains(key) ? j[key].dump() : "absent",
          " when saved, this reader has ", mine[key].dump()));
    }
  }
  if (!j.contains("epoch") || !j["epoch"].is_number_integer() || !j.contains("batch") ||
      !j["batch"].is_number_integer()) {
    return absl::InvalidArgumentError("shuffling reader state: 'epoch'/'batch' missing");
  }
  const int64_t epoch = j["epoch"].get<int64_t>();
  const int64_t batch = j["batch"].get<int64_t>();
  if (epoch < 0 || batch < 0 || batch > batches_per_epoch_) {
    return absl::InvalidArgumentError(absl::StrCat("shuffling reader state: epoch ", epoch,
                                                   " batch ", batch, " out of range (",
                                                   batches_per_epoch_, " batches per epoch)"));
  }
  cursor_.epoch = epoch;
  cursor_.batch = batch;
  return absl::OkStatus();
}

}  // namespace crossdiff::activations
