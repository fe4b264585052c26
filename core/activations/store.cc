#include "core/activations/store.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::activations {
namespace {

using tensor_io::DType;
using tensor_io::SafetensorsFile;
using tensor_io::TensorInfo;

constexpr char kActivations[] = "activations";
constexpr char kTokenIds[] = "token_ids";
constexpr char kSequenceIds[] = "sequence_ids";
constexpr char kPositions[] = "positions";

at::ScalarType StoreScalarType(const std::string& dtype) {
  return dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
}
DType StoreDType(const std::string& dtype) {
  return dtype == "bfloat16" ? DType::kBF16 : DType::kF32;
}

std::string Shape(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Converts an integer id tensor to `type`, checking that it is 1-D with `rows` entries and that its
// values fit. `what` names the writer and field in errors.
absl::StatusOr<at::Tensor> IdTensor(const at::Tensor& t, int64_t rows, at::ScalarType type,
                                    const std::string& what) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(what, ": undefined"));
  if (t.dim() != 1 || t.size(0) != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": shape ", Shape(t.sizes().vec()), ", expected [", rows, "]"));
  }
  if (!at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": dtype ", c10::toString(t.scalar_type()), ", expected integers"));
  }
  at::Tensor c = t.to(at::kCPU);
  if (type == at::kInt && c.scalar_type() == at::kLong && rows > 0) {
    int64_t lo = c.min().item<int64_t>();
    int64_t hi = c.max().item<int64_t>();
    if (lo < std::numeric_limits<int32_t>::min() || hi > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": values [", lo, ", ", hi, "] do not fit int32"));
    }
  }
  return c.to(type).contiguous();
}

// Checks one tensor of a shard: present, of `dtype`, of `shape`.
absl::Status CheckTensor(const SafetensorsFile& file, const std::string& name, DType dtype,
                         const std::vector<int64_t>& shape, const std::string& why) {
  const TensorInfo* info = file.Find(name);
  if (info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(file.path(), ": field '", name, "': tensor missing"));
  }
  if (info->dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        file.path(), ": field '", name, "': dtype ", std::string(tensor_io::DTypeName(info->dtype)),
        ", expected ", std::string(tensor_io::DTypeName(dtype)), why));
  }
  if (info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(file.path(), ": field '", name, "': shape ",
                                                   Shape(info->shape), ", expected ", Shape(shape),
                                                   " (from manifest.json)"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// StoreWriter

absl::StatusOr<std::unique_ptr<StoreWriter>> StoreWriter::Create(const std::string& dir,
                                                                 Options opts) {
  const std::string what = absl::StrCat("store writer ", dir);
  if (opts.models.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": option 'models' is empty"));
  }
  if (opts.d_model <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": option 'd_model' is ", opts.d_model, ", must be > 0"));
  }
  if (opts.dtype != "float32" && opts.dtype != "bfloat16") {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": option 'dtype' is '", opts.dtype, "', must be float32 or bfloat16"));
  }
  if (opts.rows_per_shard <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": option 'rows_per_shard' is ", opts.rows_per_shard, ", must be > 0"));
  }
  if (opts.first_shard_index < 0 || opts.shard_prefix.empty() ||
      opts.shard_prefix.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ": options 'first_shard_index' must be >= 0 and 'shard_prefix' a "
                     "non-empty file name prefix"));
  }
  // Validate the per-store fields now rather than at Finish().
  Manifest probe;
  probe.models = opts.models;
  probe.layer = opts.layer;
  probe.d_model = opts.d_model;
  probe.dtype = opts.dtype;
  probe.extra_json = opts.extra_json;
  RETURN_IF_ERROR(probe.Validate(what));

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(what, ": cannot create directory: ", ec.message()));
  }
  if (std::filesystem::exists(dir + "/manifest.json")) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, "/manifest.json already exists: refusing to overwrite a complete store"));
  }
  std::unique_ptr<StoreWriter> w(new StoreWriter());
  w->dir_ = dir;
  w->opts_ = std::move(opts);
  w->next_shard_ = w->opts_.first_shard_index;
  return w;
}

absl::Status StoreWriter::Append(const ActivationBatch& batch) {
  const std::string what = absl::StrCat("store writer ", dir_);
  if (finished_) return absl::FailedPreconditionError(absl::StrCat(what, ": already finished"));
  const at::Tensor& a = batch.activations;
  if (!a.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": field 'activations' is undefined"));
  }
  const int64_t n_models = static_cast<int64_t>(opts_.models.size());
  if (a.dim() != 3 || a.size(1) != n_models || a.size(2) != opts_.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": field 'activations': shape ",
                                                   Shape(a.sizes().vec()), ", expected [rows, ",
                                                   n_models, ", ", opts_.d_model, "]"));
  }
  if (!at::isFloatingType(a.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": field 'activations': dtype ",
                                                   c10::toString(a.scalar_type()),
                                                   ", expected a floating type"));
  }
  const int64_t rows = a.size(0);
  if (rows == 0) return absl::OkStatus();
  return GuardTorch(what, [&]() -> absl::Status {
    ActivationBatch b;
    ASSIGN_OR_RETURN(b.token_ids, IdTensor(batch.token_ids, rows, at::kInt,
                                           absl::StrCat(what, ": field 'token_ids'")));
    ASSIGN_OR_RETURN(b.sequence_ids, IdTensor(batch.sequence_ids, rows, at::kLong,
                                              absl::StrCat(what, ": field 'sequence_ids'")));
    ASSIGN_OR_RETURN(b.positions, IdTensor(batch.positions, rows, at::kInt,
                                           absl::StrCat(what, ": field 'positions'")));
    b.activations = a.detach().to(at::kCPU).to(StoreScalarType(opts_.dtype)).contiguous();
    rows_written_ += rows;
    // Rows go to the open shard's file as they come; a full shard is installed at once.
    const auto* act = static_cast<const uint8_t*>(b.activations.data_ptr());
    const int64_t act_row = b.activations.numel() / rows * b.activations.element_size();
    for (int64_t done = 0; done < rows;) {
      if (shard_ == nullptr) RETURN_IF_ERROR(OpenShard());
      const int64_t take = std::min(rows - done, opts_.rows_per_shard - shard_->rows());
      // Columns in the order of OpenShard: activations (streamed), then the sorted rest.
      RETURN_IF_ERROR(shard_->Append({act + done * act_row, b.positions.data_ptr<int32_t>() + done,
                                      b.sequence_ids.data_ptr<int64_t>() + done,
                                      b.token_ids.data_ptr<int32_t>() + done},
                                     take));
      done += take;
      if (shard_->rows() == opts_.rows_per_shard) RETURN_IF_ERROR(FinishShard());
    }
    return absl::OkStatus();
  });
}

absl::Status StoreWriter::OpenShard() {
  char name[64];
  std::snprintf(name, sizeof(name), "%06lld", static_cast<long long>(next_shard_));
  shard_file_ = opts_.shard_prefix + name + ".safetensors";
  const int64_t n_models = static_cast<int64_t>(opts_.models.size());
  // The layout of the reference writer (tensors sorted by name): activations, positions,
  // sequence_ids, token_ids.
  ASSIGN_OR_RETURN(shard_, tensor_io::SafetensorsRowWriter::Open(
                               dir_ + "/" + shard_file_,
                               {{kActivations, StoreDType(opts_.dtype), {n_models, opts_.d_model}},
                                {kPositions, DType::kI32, {}},
                                {kSequenceIds, DType::kI64, {}},
                                {kTokenIds, DType::kI32, {}}},
                               opts_.rows_per_shard, {{"format", "crossdiff.activations.shard"}}));
  return absl::OkStatus();
}

absl::Status StoreWriter::FinishShard() {
  const int64_t n = shard_->rows();
  absl::Status s = shard_->Finish();
  shard_.reset();
  RETURN_IF_ERROR(s);
  shards_.push_back(ShardInfo{shard_file_, n});
  ++next_shard_;
  return absl::OkStatus();
}

absl::StatusOr<Manifest> StoreWriter::Finish(bool write_manifest) {
  const std::string what = absl::StrCat("store writer ", dir_);
  if (finished_) return absl::FailedPreconditionError(absl::StrCat(what, ": already finished"));
  // An open shard holds rows (it is opened only to take some); one whose write failed fails here.
  if (shard_ != nullptr) RETURN_IF_ERROR(FinishShard());
  finished_ = true;
  Manifest m;
  m.models = opts_.models;
  m.layer = opts_.layer;
  m.d_model = opts_.d_model;
  m.dtype = opts_.dtype;
  m.extra_json = opts_.extra_json;
  m.shards = shards_;
  for (const ShardInfo& s : shards_) m.rows += s.rows;
  if (write_manifest) RETURN_IF_ERROR(m.Save(dir_));
  return m;
}

// ---------------------------------------------------------------------------------------------
// StoreReader

absl::StatusOr<std::unique_ptr<StoreReader>> StoreReader::Open(const std::string& dir) {
  ASSIGN_OR_RETURN(Manifest manifest, Manifest::Load(dir));
  auto reader = std::make_unique<StoreReader>();
  reader->dir_ = dir;
  reader->manifest_ = std::move(manifest);
  const Manifest& m = reader->manifest_;
  const DType act_dtype = StoreDType(m.dtype);
  const std::string why = absl::StrCat(" (manifest.json says dtype ", m.dtype, ")");
  int64_t start = 0;
  for (const ShardInfo& s : m.shards) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir + "/" + s.file));
    RETURN_IF_ERROR(
        CheckTensor(*file, kActivations, act_dtype, {s.rows, m.n_models(), m.d_model}, why));
    const std::string id_why = " (DESIGN.md 3.2)";
    RETURN_IF_ERROR(CheckTensor(*file, kTokenIds, DType::kI32, {s.rows}, id_why));
    RETURN_IF_ERROR(CheckTensor(*file, kSequenceIds, DType::kI64, {s.rows}, id_why));
    RETURN_IF_ERROR(CheckTensor(*file, kPositions, DType::kI32, {s.rows}, id_why));
    ShardData d;
    const TensorInfo* act = file->Find(kActivations);
    d.activations = file->data(*act);
    d.activations_offset = act->begin;
    d.token_ids = file->data(*file->Find(kTokenIds));
    d.sequence_ids = file->data(*file->Find(kSequenceIds));
    d.positions = file->data(*file->Find(kPositions));
    reader->shard_data_.push_back(d);
    reader->files_.push_back(std::move(file));
    reader->shard_start_.push_back(start);
    start += s.rows;
  }
  reader->shard_start_.push_back(start);
  reader->row_bytes_ =
      static_cast<size_t>(m.n_models() * m.d_model) * tensor_io::DTypeSize(act_dtype);
  return reader;
}

std::string StoreReader::ShardPath(int64_t shard) const {
  return dir_ + "/" + manifest_.shards[shard].file;
}

int64_t StoreReader::ShardOf(int64_t row) const {
  auto it = std::upper_bound(shard_start_.begin(), shard_start_.end(), row);
  return static_cast<int64_t>(it - shard_start_.begin()) - 1;
}

absl::StatusOr<ActivationBatch> StoreReader::ReadShard(int64_t shard, bool as_float) const {
  if (shard < 0 || shard >= num_shards()) {
    return absl::OutOfRangeError(
        absl::StrCat(dir_, ": shard ", shard, " out of range [0, ", num_shards(), ")"));
  }
  return ReadRows(shard_start_[shard], shard_start_[shard + 1], as_float);
}

absl::StatusOr<ActivationBatch> StoreReader::ReadRows(int64_t begin, int64_t end) const {
  return ReadRows(begin, end, /*as_float=*/true);
}

absl::StatusOr<ActivationBatch> StoreReader::ReadRows(int64_t begin, int64_t end,
                                                      bool as_float) const {
  if (begin < 0 || end < begin || end > rows()) {
    return absl::OutOfRangeError(
        absl::StrCat(dir_, ": rows [", begin, ", ", end, ") out of range [0, ", rows(), ")"));
  }
  return GuardTorch(dir_, [&]() -> absl::StatusOr<ActivationBatch> {
    const int64_t n = end - begin;
    ActivationBatch out = UninitializedBatch(n);
    const size_t row_bytes = row_bytes_;
    int64_t row = begin;
    while (row < end) {
      const int64_t s = ShardOf(row);
      const int64_t lo = row - shard_start_[s];
      const int64_t hi = std::min(end, shard_start_[s + 1]) - shard_start_[s];
      const int64_t k = hi - lo;
      const int64_t at_out = row - begin;
      const ShardData& d = shard_data_[s];
      std::memcpy(static_cast<uint8_t*>(out.activations.data_ptr()) + at_out * row_bytes,
                  d.activations + lo * row_bytes, k * row_bytes);
      std::memcpy(out.token_ids.data_ptr<int32_t>() + at_out, d.token_ids + lo * 4, k * 4);
      std::memcpy(out.sequence_ids.data_ptr<int64_t>() + at_out, d.sequence_ids + lo * 8, k * 8);
      std::memcpy(out.positions.data_ptr<int32_t>() + at_out, d.positions + lo * 4, k * 4);
      files_[s]->ReleasePages(d.activations_offset + lo * row_bytes,
                              d.activations_offset + hi * row_bytes);
      row += k;
    }
    if (as_float && out.activations.scalar_type() != at::kFloat) {
      out.activations = out.activations.to(at::kFloat);
    }
    return out;
  });
}

absl::Status StoreReader::CheckRowIndices(const std::vector<int64_t>& rows) const {
  for (int64_t r : rows) {
    if (r < 0 || r >= this->rows()) {
      return absl::OutOfRangeError(
          absl::StrCat(dir_, ": row ", r, " out of range [0, ", this->rows(), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ActivationBatch> StoreReader::GatherRows(const std::vector<int64_t>& rows,
                                                        bool as_float) const {
  RETURN_IF_ERROR(CheckRowIndices(rows));
  return GuardTorch(dir_, [&]() -> absl::StatusOr<ActivationBatch> {
    const int64_t n = static_cast<int64_t>(rows.size());
    ActivationBatch out = UninitializedBatch(n);
    const size_t row_bytes = row_bytes_;
    uint8_t* act_out = static_cast<uint8_t*>(out.activations.data_ptr());
    int32_t* tok_out = out.token_ids.data_ptr<int32_t>();
    int64_t* seq_out = out.sequence_ids.data_ptr<int64_t>();
    int32_t* pos_out = out.positions.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = ShardOf(rows[i]);
      const int64_t lo = rows[i] - shard_start_[s];
      const ShardData& d = shard_data_[s];
      std::memcpy(act_out + i * row_bytes, d.activations + lo * row_bytes, row_bytes);
      std::memcpy(tok_out + i, d.token_ids + lo * 4, 4);
      std::memcpy(seq_out + i, d.sequence_ids + lo * 8, 8);
      std::memcpy(pos_out + i, d.positions + lo * 4, 4);
    }
    if (as_float && out.activations.scalar_type() != at::kFloat) {
      out.activations = out.activations.to(at::kFloat);
    }
    return out;
  });
}

absl::Status StoreReader::GatherActivations(const std::vector<int64_t>& rows, float* out) const {
  RETURN_IF_ERROR(CheckRowIndices(rows));
  const int64_t width = manifest_.n_models() * manifest_.d_model;
  const bool bf16 = StoreDType(manifest_.dtype) == DType::kBF16;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t s = ShardOf(rows[i]);
    const uint8_t* src = shard_data_[s].activations + (rows[i] - shard_start_[s]) * row_bytes_;
    float* dst = out + static_cast<int64_t>(i) * width;
    if (!bf16) {
      std::memcpy(dst, src, row_bytes_);
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {  // bfloat16 is the high half of a float32
      uint16_t h;
      std::memcpy(&h, src + 2 * j, 2);
      const uint32_t bits = static_cast<uint32_t>(h) << 16;
      std::memcpy(dst + j, &bits, 4);
    }
  }
  return absl::OkStatus();
}

ActivationBatch StoreReader::UninitializedBatch(int64_t n) const {
  ActivationBatch out;
  out.activations =
      at::empty({n, manifest_.n_models(), manifest_.d_model}, StoreScalarType(manifest_.dtype));
  out.token_ids = at::empty({n}, at::kInt);
  out.sequence_ids = at::empty({n}, at::kLong);
  out.positions = at::empty({n}, at::kInt);
  return out;
}

void StoreReader::ForEachActivationRange(
    int64_t begin, int64_t end,
    const std::function<void(const tensor_io::SafetensorsFile&, uint64_t, uint64_t)>& fn) const {
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, rows());
  int64_t row = begin;
  while (row < end) {
    const int64_t s = ShardOf(row);
    const int64_t lo = row - shard_start_[s];
    const int64_t hi = std::min(end, shard_start_[s + 1]) - shard_start_[s];
    const uint64_t base = shard_data_[s].activations_offset;
    fn(*files_[s], base + lo * row_bytes_, base + hi * row_bytes_);
    row += hi - lo;
  }
}

void StoreReader::ReleaseRows(int64_t begin, int64_t end) const {
  ForEachActivationRange(begin, end,
                         [](const tensor_io::SafetensorsFile& f, uint64_t from, uint64_t to) {
                           f.ReleasePages(from, to);
                         });
}

void StoreReader::PrefetchRows(int64_t begin, int64_t end) const {
  ForEachActivationRange(begin, end,
                         [](const tensor_io::SafetensorsFile& f, uint64_t from, uint64_t to) {
                           f.PrefetchPages(from, to);
                         });
}

absl::Status StoreReader::CheckFinite(int64_t shard) const {
  ASSIGN_OR_RETURN(ActivationBatch b, ReadShard(shard, /*as_float=*/true));
  return GuardTorch(ShardPath(shard), [&]() -> absl::Status {
    at::Tensor bad_rows = at::logical_not(at::isfinite(b.activations)).flatten(1).any(1);
    if (!bad_rows.any().item<bool>()) return absl::OkStatus();
    const int64_t row = bad_rows.nonzero().index({0, 0}).item<int64_t>();
    return absl::InvalidArgumentError(
        absl::StrCat(ShardPath(shard), ": field 'activations': row ", row, " (global row ",
                     shard_start_[shard] + row, ", sequence ", b.sequence_ids[row].item<int64_t>(),
                     ", position ", b.positions[row].item<int32_t>(), ") holds NaN or Inf"));
  });
}

}  // namespace crossdiff::activations
