#include "core/crosscoder/batch_source.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"

#ifdef CROSSDIFF_HAVE_STORE_READER
#include <nlohmann/json.hpp>

#include "core/activations/shuffling_reader.h"
#include "core/activations/store.h"
#endif

namespace crossdiff::crosscoder {
namespace {

bool AllFinite(const float* x, int64_t n) {
  // Branch-free: NaN and Inf are the float32 patterns with every exponent bit set.
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

class TensorRowProvider : public RowProvider {
 public:
  TensorRowProvider(at::Tensor rows, std::string name)
      : rows_(rows.to(at::kFloat).contiguous()), name_(std::move(name)) {}
  int64_t rows() const override { return rows_.size(0); }
  int64_t num_models() const override { return rows_.size(1); }
  int64_t d_model() const override { return rows_.size(2); }
  absl::StatusOr<at::Tensor> Read(int64_t begin, int64_t end) const override {
    return rows_.narrow(0, begin, end - begin);
  }
  std::string Locate(int64_t row) const override { return absl::StrCat(name_, " row ", row); }

 private:
  at::Tensor rows_;
  std::string name_;
};

class RowStreamBatches : public BatchStream {
 public:
  RowStreamBatches(const RowProvider* p, const BatchStreamOptions& o)
      : o_(o), stream_(p, o.train_rows, o.seed, /*chunk_rows=*/1024, o.buffer_rows) {}
  absl::Status Next(int64_t step, float* out) override {
    const int64_t local = o_.global_batch / o_.world_size;
    return stream_.Fill(step * o_.global_batch + o_.rank * local, local, out);
  }

 private:
  BatchStreamOptions o_;
  ShuffledRowStream stream_;
};

#ifdef CROSSDIFF_HAVE_STORE_READER
// Global batch s = batch (s mod batches_per_epoch) of epoch (s div batches_per_epoch) of the
// store's ShufflingReader (drop_last: every batch is full), whatever the number of ranks.
class StoreBatches : public BatchStream {
 public:
  StoreBatches(std::unique_ptr<activations::ShufflingReader> reader, const RowProvider* provider)
      : reader_(std::move(reader)), provider_(provider) {}
  absl::Status Next(int64_t step, float* out) override {
    if (step != next_step_) {
      const int64_t bpe = reader_->batches_per_epoch();
      nlohmann::json state = nlohmann::json::parse(reader_->State());
      state["epoch"] = step / bpe;
      state["batch"] = step % bpe;
      RETURN_IF_ERROR(reader_->Restore(state.dump()));
    }
    // Straight into `out` as float32, then checked (no per-batch allocation).
    RETURN_IF_ERROR(reader_->NextActivations(out));
    const int64_t n =
        reader_->options().batch_size * provider_->num_models() * provider_->d_model();
    if (!AllFinite(out, n)) {
      // Name the store's first bad row (shard and row) rather than a position in the shuffle.
      RETURN_IF_ERROR(provider_->FindNonFinite());
      return absl::InvalidArgumentError(
          absl::StrCat("non-finite activations in training batch ", step));
    }
    next_step_ = step + 1;
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<activations::ShufflingReader> reader_;
  const RowProvider* provider_;
  int64_t next_step_ = 0;
};

class StoreRowProvider : public RowProvider {
 public:
  explicit StoreRowProvider(std::unique_ptr<activations::StoreReader> reader)
      : reader_(std::move(reader)) {
    int64_t start = 0;
    for (const auto& s : reader_->manifest().shards) {
      starts_.push_back(start);
      start += s.rows;
    }
  }
  int64_t rows() const override { return reader_->manifest().rows; }
  int64_t num_models() const override {
    return static_cast<int64_t>(reader_->manifest().models.size());
  }
  int64_t d_model() const override { return reader_->manifest().d_model; }
  absl::StatusOr<at::Tensor> Read(int64_t begin, int64_t end) const override {
    ASSIGN_OR_RETURN(activations::ActivationBatch batch, reader_->ReadRows(begin, end));
    return batch.activations.to(at::kFloat);
  }
  std::string Locate(int64_t row) const override {
    const auto& shards = reader_->manifest().shards;
    auto it = std::upper_bound(starts_.begin(), starts_.end(), row);
    const size_t s = static_cast<size_t>(it - starts_.begin()) - 1;
    return absl::StrCat(reader_->dir(), "/", shards[s].file, " row ", row - starts_[s],
                        " (store row ", row, ")");
  }
  std::vector<std::string> models() const override { return reader_->manifest().models; }
  int layer() const override { return reader_->manifest().layer; }
  absl::StatusOr<std::unique_ptr<BatchStream>> CreateBatchStream(
      const BatchStreamOptions& o) const override {
    activations::ShufflingReaderOptions ro;
    ro.batch_size = o.global_batch / o.world_size;
    ro.buffer_rows = std::max<int64_t>(o.buffer_rows, o.global_batch);
    ro.seed = o.seed;
    ro.rank = o.rank;
    ro.world_size = o.world_size;
    ro.row_begin = 0;
    ro.row_end = o.train_rows;
    ro.drop_last = true;
    if (o.train_rows < o.global_batch) {
      return absl::InvalidArgumentError(absl::StrCat(reader_->dir(), ": ", o.train_rows,
                                                     " training rows are fewer than one batch of ",
                                                     o.global_batch));
    }
    ASSIGN_OR_RETURN(auto reader, activations::ShufflingReader::Create(reader_.get(), ro));
    return std::unique_ptr<BatchStream>(std::make_unique<StoreBatches>(std::move(reader), this));
  }

 private:
  std::unique_ptr<activations::StoreReader> reader_;
  std::vector<int64_t> starts_;
};
#endif

}  // namespace

absl::StatusOr<std::unique_ptr<BatchStream>> RowProvider::CreateBatchStream(
    const BatchStreamOptions& o) const {
  return std::unique_ptr<BatchStream>(std::make_unique<RowStreamBatches>(this, o));
}

absl::Status RowProvider::FindNonFinite() const {
  constexpr int64_t kChunk = 4096;
  for (int64_t a = 0; a < rows(); a += kChunk) {
    const int64_t end = std::min(rows(), a + kChunk);
    ASSIGN_OR_RETURN(at::Tensor part, Read(a, end));
    RETURN_IF_ERROR(CheckFinite(*this, part, a));
  }
  return absl::OkStatus();
}

uint64_t MixSeed(uint64_t seed, uint64_t a, uint64_t b) {
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(seed) ^ a) ^ (b * 0x632be59bd9b4e019ull));
}

std::unique_ptr<RowProvider> MakeTensorRowProvider(at::Tensor rows, std::string name) {
  return std::make_unique<TensorRowProvider>(std::move(rows), std::move(name));
}

absl::StatusOr<std::unique_ptr<RowProvider>> OpenStoreRowProvider(const std::string& dir) {
#ifdef CROSSDIFF_HAVE_STORE_READER
  ASSIGN_OR_RETURN(auto reader, activations::StoreReader::Open(dir));
  return std::unique_ptr<RowProvider>(std::make_unique<StoreRowProvider>(std::move(reader)));
#else
  return absl::UnimplementedError(absl::StrCat(dir, ": this build has no activation store reader"));
#endif
}

absl::Status CheckFinite(const RowProvider& provider, const at::Tensor& rows, int64_t first_row) {
  at::Tensor flat = rows.reshape({rows.size(0), -1});
  at::Tensor bad_rows = at::logical_not(at::isfinite(flat)).any(1);
  if (!bad_rows.any().item<bool>()) return absl::OkStatus();
  const int64_t r = bad_rows.nonzero().min().item<int64_t>();
  const int64_t col = at::logical_not(at::isfinite(flat[r])).nonzero().min().item<int64_t>();
  const int64_t d = provider.d_model();
  return absl::InvalidArgumentError(
      absl::StrCat(provider.Locate(first_row + r), ": 'activations' holds ",
                   flat[r][col].item<float>(), " (model ", col / d, ", dimension ", col % d,
                   "); NaN/Inf activations are never trained on: re-harvest or drop the shard"));
}

ShuffledRowStream::ShuffledRowStream(const RowProvider* provider, int64_t rows, uint64_t seed,
                                     int64_t chunk_rows, int64_t buffer_rows)
    : provider_(provider),
      rows_(rows),
      seed_(seed),
      chunk_rows_(std::max<int64_t>(1, std::min(chunk_rows, rows))),
      chunks_per_window_(
          std::max<int64_t>(1, buffer_rows / std::max<int64_t>(1, std::min(chunk_rows, rows)))),
      row_width_(provider->num_models() * provider->d_model()) {}

void ShuffledRowStream::PlanEpoch(int64_t epoch) {
  if (plan_epoch_ == epoch) return;
  const int64_t n_chunks = (rows_ + chunk_rows_ - 1) / chunk_rows_;
  at::Generator gen =
      at::detail::createCPUGenerator(MixSeed(seed_, 1, static_cast<uint64_t>(epoch)));
  at::Tensor perm = at::randperm(n_chunks, gen, at::TensorOptions().dtype(at::kLong));
  const int64_t* pp = perm.data_ptr<int64_t>();
  chunk_order_.assign(pp, pp + n_chunks);
  window_start_.clear();
  int64_t offset = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (c % chunks_per_window_ == 0) window_start_.push_back(offset);
    offset += std::min(chunk_rows_, rows_ - chunk_order_[c] * chunk_rows_);
  }
  window_start_.push_back(offset);
  plan_epoch_ = epoch;
}

absl::Status ShuffledRowStream::LoadWindow(int64_t epoch, int64_t window) {
  if (win_epoch_ == epoch && win_index_ == window) return absl::OkStatus();
  PlanEpoch(epoch);
  const int64_t n = window_start_[window + 1] - window_start_[window];
  return GuardTorch("reading training rows", [&]() -> absl::Status {
    if (!window_rows_.defined() || window_rows_.size(0) < n) {
      window_rows_ = at::empty({n, row_width_}, at::TensorOptions().dtype(at::kFloat));
    }
    int64_t filled = 0;
    const int64_t c_end = std::min<int64_t>((window + 1) * chunks_per_window_,
                                            static_cast<int64_t>(chunk_order_.size()));
    for (int64_t c = window * chunks_per_window_; c < c_end; ++c) {
      const int64_t begin = chunk_order_[c] * chunk_rows_;
      const int64_t end = std::min(rows_, begin + chunk_rows_);
      ASSIGN_OR_RETURN(at::Tensor part, provider_->Read(begin, end));
      part = part.contiguous();
      // A plain scan; the tensor-op search for the first bad row only when there is one.
      if (!AllFinite(part.data_ptr<float>(), part.numel())) {
        RETURN_IF_ERROR(CheckFinite(*provider_, part, begin));
      }
      window_rows_.narrow(0, filled, end - begin).copy_(part.reshape({end - begin, row_width_}));
      filled += end - begin;
    }
    at::Generator gen = at::detail::createCPUGenerator(
        MixSeed(seed_, 2 + static_cast<uint64_t>(epoch), static_cast<uint64_t>(window)));
    at::Tensor perm = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
    window_perm_.assign(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + n);
    win_epoch_ = epoch;
    win_index_ = window;
    return absl::OkStatus();
  });
}

absl::Status ShuffledRowStream::Fill(int64_t position, int64_t count, float* out) {
  while (count > 0) {
    const int64_t epoch = position / rows_;
    const int64_t offset = position % rows_;
    PlanEpoch(epoch);
    const int64_t window = std::upper_bound(window_start_.begin(), window_start_.end(), offset) -
                           window_start_.begin() - 1;
    RETURN_IF_ERROR(LoadWindow(epoch, window));
    const int64_t in_window = offset - window_start_[window];
    const int64_t take = std::min(count, window_start_[window + 1] - offset);
    const float* src = window_rows_.data_ptr<float>();
    for (int64_t j = 0; j < take; ++j) {
      std::memcpy(out, src + window_perm_[in_window + j] * row_width_, sizeof(float) * row_width_);
      out += row_width_;
    }
    position += take;
    count -= take;
  }
  return absl::OkStatus();
}

}  // namespace crossdiff::crosscoder
