#include "core/crosscoder/trainer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/crosscoder/sparse_kernels.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::crosscoder {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kMaxDictSize = int64_t{1} << 24;
constexpr char kCheckpointDir[] = "checkpoint";
constexpr char kStateTensors[] = "trainer_state.safetensors";
constexpr char kStateJson[] = "trainer_state.json";

absl::Status WriteText(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot open for writing"));
    out << text;
    if (!out.flush()) return absl::DataLossError(absl::StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": rename failed: ", ec.message()));
  return absl::OkStatus();
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  return j;
}

json RecordJson(const MetricsRecord& r) {
  json j = {{"step", r.step},
            {"loss", r.loss},
            {"aux_loss", r.aux_loss},
            {"fvu", r.fvu},
            {"l0", r.l0},
            {"lr", r.lr},
            {"dead_latents", r.dead_latents},
            {"tokens_per_second", r.tokens_per_second}};
  if (!r.val_fvu.empty()) {
    j["val_fvu"] = r.val_fvu;
    j["val_loss"] = r.val_loss;
  }
  return j;
}

// NaN metrics (a diverged run) are written as JSON null; read them back as NaN.
double NumberOr(const json& j, const char* key, double def) {
  if (!j.contains(key)) return def;
  return j[key].is_number() ? j[key].get<double>() : std::nan("");
}

std::vector<double> NumbersOf(const json& j, const char* key) {
  std::vector<double> v;
  if (!j.contains(key) || !j[key].is_array()) return v;
  for (const auto& x : j[key]) v.push_back(x.is_number() ? x.get<double>() : std::nan(""));
  return v;
}

MetricsRecord RecordFromJson(const json& j) {
  MetricsRecord r;
  r.step = j.value("step", int64_t{0});
  r.loss = NumberOr(j, "loss", 0);
  r.aux_loss = NumberOr(j, "aux_loss", 0);
  r.fvu = NumbersOf(j, "fvu");
  r.val_fvu = NumbersOf(j, "val_fvu");
  r.val_loss = NumberOr(j, "val_loss", 0);
  r.l0 = NumberOr(j, "l0", 0);
  r.lr = NumberOr(j, "lr", 0);
  r.dead_latents = j.value("dead_latents", int64_t{0});
  r.tokens_per_second = NumberOr(j, "tokens_per_second", 0);
  return r;
}

// Sums of one step's statistics (all-reduced across ranks at metric points).
struct StepSums {
  double loss = 0, aux_loss = 0, nnz = 0;
  std::vector<double> err2, x2, xsum2;  // per model (xsum2 filled after the reduction)
};

class Trainer {
 public:
  Trainer(const TrainOptions& o, const RowProvider& rows, comm::Communicator* comm,
          ProgressMeter::Callback cb)
      : o_(o), rows_(rows), comm_(comm), progress_(std::move(cb)) {
    rank_ = comm != nullptr ? comm->rank() : 0;
    world_ = comm != nullptr ? comm->world_size() : 1;
  }

  absl::StatusOr<TrainResult> Run();

 private:
  bool distributed() const { return comm_ != nullptr && world_ > 1; }
  absl::Status AllReduce(at::Tensor& t) {
    return distributed() ? comm_->AllReduce(t) : absl::OkStatus();
  }
  absl::Status Validate();
  absl::Status EstimateNormalization();
  absl::StatusOr<bool> TryResume();
  absl::Status AllocateState();
  absl::Status Step(int64_t step, bool want_stats, StepSums* sums);
  absl::Status StepBatchTopK(int64_t step, bool want_stats, StepSums* sums);
  absl::Status StepReluL1(int64_t step, bool want_stats, StepSums* sums);
  absl::Status ApplyGradients(int64_t step);
  absl::Status UpdateDeadCounters(const at::Tensor& fired_counts);
  absl::Status SaveCheckpoint(int64_t steps_done);
  absl::Status Evaluate(MetricsRecord* rec, double* l0_out);
  absl::Status WriteOutputs(const TrainResult& result);
  double LearningRate(int64_t step) const;
  double L1Coefficient(int64_t step) const;
  int64_t KAt(int64_t step) const;
  int64_t DeadLatents() const;
  std::string ConfigExtraJson() const;

  TrainOptions o_;
  const RowProvider& rows_;
  comm::Communicator* comm_;
  ProgressMeter::Callback progress_;
  int rank_ = 0, world_ = 1;

  int64_t M_ = 0, d_ = 0, Md_ = 0, F_ = 0, B_ = 0, Bl_ = 0;
  int64_t train_rows_ = 0, val_rows_ = 0;
  Crosscoder model_;
  at::Tensor params_, grads_, adam_m_, adam_v_, workspace_;
  at::Tensor x_, xhat_, gaux_;
  at::Tensor since_fired_;  // I64 [F]: tokens since each latent last fired
  std::unique_ptr<BatchStream> stream_;
  kernels::SparseCodes codes_, aux_codes_;
  kernels::LatentEntries entries_;
  int64_t start_step_ = 0;
  float threshold_ = -1;
  float last_selection_threshold_ =
      0;  // not checkpointed: only a hint, results do not depend on it
  std::vector<MetricsRecord> history_;
  double timed_seconds_ = 0;
  int64_t timed_tokens_ = 0;
  double last_loss_ = 0;
};

absl::Status Trainer::Validate() {
  if (o_.out_dir.empty()) return absl::InvalidArgumentError("out_dir (--out) is required");
  M_ = rows_.num_models();
  d_ = rows_.d_model();
  Md_ = M_ * d_;
  const std::string src = o_.store_dir.empty() ? std::string("the training rows") : o_.store_dir;
  if (rows_.rows() <= 0)
    return absl::InvalidArgumentError(absl::StrCat(src, ": the store holds no rows"));
  if (M_ < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": the store holds ", M_,
                     " model; a crosscoder needs at least 2 (base and fine-tune)"));
  }
  if (d_ <= 0) return absl::InvalidArgumentError(absl::StrCat(src, ": d_model must be positive"));
  F_ = o_.dict_size == 0 ? 8 * d_ : o_.dict_size;
  if (F_ < 1 || F_ > kMaxDictSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict_size must be in [1, ", kMaxDictSize, "], got ", F_));
  }
  if (o_.arch == Architecture::kBatchTopK) {
    if (o_.k < 1 || o_.k > F_) {
      return absl::InvalidArgumentError(
          absl::StrCat("k must be in [1, dict_size=", F_, "], got ", o_.k));
    }
    if (o_.k_initial < 0 || o_.k_initial > F_) {
      return absl::InvalidArgumentError(
          absl::StrCat("k_initial must be in [0, dict_size=", F_, "]"));
    }
    if (o_.batch_top_k_loss != "l2" && o_.batch_top_k_loss != "squared") {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch_top_k_loss must be 'l2' or 'squared', got '", o_.batch_top_k_loss, "'"));
    }
  }
  if (o_.steps < 1)
    return absl::InvalidArgumentError(absl::StrCat("steps must be positive, got ", o_.steps));
  B_ = o_.batch_size;
  if (B_ < 1)
    return absl::InvalidArgumentError(absl::StrCat("batch_size must be positive, got ", B_));
  if (B_ % world_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size ", B_, " is not divisible by the world size ", world_));
  }
  Bl_ = B_ / world_;
  if (o_.lr < 0 || !std::isfinite(o_.lr))
    return absl::InvalidArgumentError("lr must be finite and >= 0");
  if (o_.val_fraction < 0 || o_.val_fraction > 0.5) {
    return absl::InvalidArgumentError(
        absl::StrCat("val_fraction must be in [0, 0.5], got ", o_.val_fraction));
  }
  if (o_.l1_coeff < 0) return absl::InvalidArgumentError("l1_coeff must be >= 0");
  if (o_.dead_tokens_threshold < 1)
    return absl::InvalidArgumentError("dead_tokens_threshold must be positive");
  val_rows_ = static_cast<int64_t>(std::floor(o_.val_fraction * static_cast<double>(rows_.rows())));
  if (o_.val_fraction > 0 && val_rows_ == 0 && rows_.rows() > 1) val_rows_ = 1;
  train_rows_ = rows_.rows() - val_rows_;
  if (train_rows_ < 1)
    return absl::InvalidArgumentError(absl::StrCat(src, ": no training rows left after the split"));
  if (o_.threads > 0) at::set_num_threads(o_.threads);
  if (o_.lr == 0) o_.lr = std::min(1e-3, 2e-4 / std::sqrt(static_cast<double>(F_) / 16384.0));
  if (o_.warmup_steps < 0) o_.warmup_steps = std::min<int64_t>(1000, o_.steps / 20);
  if (o_.threshold_start_step < 0) o_.threshold_start_step = std::min<int64_t>(1000, o_.steps / 10);
  if (o_.threshold_beta <= 0 || o_.threshold_beta >= 1) {
    const double span =
        static_cast<double>(std::max<int64_t>(1, o_.steps - o_.threshold_start_step));
    o_.threshold_beta = std::clamp(1.0 - 20.0 / span, 0.9, 0.999);
  }
  if (o_.auxk_k <= 0) o_.auxk_k = std::max<int64_t>(1, Md_ / 2);
  o_.auxk_k = std::min(o_.auxk_k, F_);
  if (o_.metrics_every <= 0) o_.metrics_every = o_.steps;

  CrosscoderConfig cfg;
  cfg.architecture = o_.arch;
  cfg.activation_dim = d_;
  cfg.dict_size = F_;
  cfg.num_models = M_;
  cfg.k = o_.arch == Architecture::kBatchTopK ? o_.k : 0;
  cfg.models = rows_.models();
  if (!cfg.models.empty() && static_cast<int64_t>(cfg.models.size()) != M_) cfg.models.clear();
  cfg.layer = rows_.layer();
  cfg.extra_json = ConfigExtraJson();
  ASSIGN_OR_RETURN(model_, Crosscoder::Create(cfg));
  return absl::OkStatus();
}

std::string Trainer::ConfigExtraJson() const {
  json extra =
      json::parse(o_.extra_config_json.empty() ? "{}" : o_.extra_config_json, nullptr, false);
  if (!extra.is_object()) extra = json::object();
  extra["training"] = {{"store", o_.store_dir},
                       {"steps", o_.steps},
                       {"batch_size", o_.batch_size},
                       {"lr", o_.lr},
                       {"seed", o_.seed},
                       {"warmup_steps", o_.warmup_steps},
                       {"lr_decay_start", o_.lr_decay_start},
                       {"grad_clip", o_.grad_clip},
                       {"l1_coeff", o_.l1_coeff},
                       {"auxk_alpha", o_.auxk_alpha},
                       {"auxk_k", o_.auxk_k},
                       {"dead_tokens_threshold", o_.dead_tokens_threshold},
                       {"batch_top_k_loss", o_.batch_top_k_loss},
                       {"decoder_init_norm", o_.decoder_init_norm},
                       {"val_fraction", o_.val_fraction}};
  return extra.dump();
}

double Trainer::LearningRate(int64_t step) const {
  double lr = o_.lr;
  if (o_.warmup_steps > 0 && step < o_.warmup_steps)
    lr *= static_cast<double>(step + 1) / o_.warmup_steps;
  if (o_.lr_decay_start < 1) {
    const int64_t decay_start =
        static_cast<int64_t>(o_.lr_decay_start * static_cast<double>(o_.steps));
    if (step >= decay_start && o_.steps > decay_start) {
      lr *= static_cast<double>(o_.steps - step) / static_cast<double>(o_.steps - decay_start);
    }
  }
  return lr;
}

double Trainer::L1Coefficient(int64_t step) const {
  const double warm = o_.l1_warmup_fraction * static_cast<double>(o_.steps);
  if (warm <= 0) return o_.l1_coeff;
  return o_.l1_coeff * std::min(1.0, static_cast<double>(step + 1) / warm);
}

int64_t Trainer::KAt(int64_t step) const {
  if (o_.k_initial <= 0 || o_.k_anneal_steps <= 0 || step >= o_.k_anneal_steps) return o_.k;
  const double t = static_cast<double>(step) / static_cast<double>(o_.k_anneal_steps);
  return std::max<int64_t>(1, std::llround(o_.k_initial + (o_.k - o_.k_initial) * t));
}

int64_t Trainer::DeadLatents() const {
  return (since_fired_ >= o_.dead_tokens_threshold).sum().item<int64_t>();
}

// Per-model mean and scale (E||x_m - mu_m|| = sqrt(d)) from up to normalization_rows training rows,
// read in evenly spaced chunks. Every rank reads the same rows, so the statistics agree exactly.
absl::Status Trainer::EstimateNormalization() {
  constexpr int64_t kChunk = 1024;  // small chunks: the pass must not raise the resident peak
  const int64_t sample = std::min(train_rows_, std::max<int64_t>(1, o_.normalization_rows));
  const int64_t n_chunks = (sample + kChunk - 1) / kChunk;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t len = std::min(kChunk, sample - c * kChunk);
    // Evenly spread over the training rows (contiguous from row 0 when the sample is all of them).
    const int64_t begin = n_chunks == 1 ? 0 : (train_rows_ - len) * c / (n_chunks - 1);
    ranges.emplace_back(begin, len);
  }
  at::Tensor sum = at::zeros({M_, d_}, at::TensorOptions().dtype(at::kDouble));
  int64_t count = 0;
  for (auto [begin, len] : ranges) {
    ASSIGN_OR_RETURN(at::Tensor part, rows_.Read(begin, begin + len));
    RETURN_IF_ERROR(CheckFinite(rows_, part, begin));
    sum += part.sum(0, false, at::kDouble);
    count += len;
  }
  at::Tensor data_mean = sum / static_cast<double>(count);
  at::Tensor mean = o_.center ? data_mean : at::zeros({M_, d_}, sum.options());
  at::Tensor mean_f = mean.to(at::kFloat).unsqueeze(0);
  at::Tensor norm_sum = at::zeros({M_}, sum.options());
  for (auto [begin, len] : ranges) {
    ASSIGN_OR_RETURN(at::Tensor part, rows_.Read(begin, begin + len));
    norm_sum += (part - mean_f).norm(2, {2}).sum(0, false, at::kDouble);
  }
  at::Tensor mean_norm = norm_sum / static_cast<double>(count);
  for (int64_t m = 0; m < M_; ++m) {
    if (!(mean_norm[m].item<double>() > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(o_.store_dir, ": the activations of model ", m,
                                                     " are constant; they cannot be normalised"));
    }
  }
  at::Tensor scale = (std::sqrt(static_cast<double>(d_)) / mean_norm).to(at::kFloat);
  RETURN_IF_ERROR(model_.SetNormalization(o_.center ? mean.to(at::kFloat) : at::Tensor(), scale));
  // Decoder bias from the data: the mean of the normalised sample (zero when centring).
  model_.b_dec().copy_(((data_mean - mean) * scale.to(at::kDouble).unsqueeze(1)).to(at::kFloat));
  return absl::OkStatus();
}

absl::Status Trainer::AllocateState() {
  params_ = model_.FlattenParameters();
  const int64_t n = params_.numel();
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  adam_m_ = at::zeros({n}, f32);
  adam_v_ = at::zeros({n}, f32);
  if (o_.arch == Architecture::kBatchTopK) {
    // The [B, F] pre-activations are dead once the selection is made, before the backward pass
    // writes gradients: one workspace serves both.
    workspace_ = at::empty({std::max(n, Bl_ * F_)}, f32);
    grads_ = workspace_.narrow(0, 0, n);
  } else {
    workspace_ = at::empty({Bl_ * F_}, f32);
    grads_ = at::empty({n}, f32);
  }
  x_ = at::empty({Bl_, Md_}, f32);
  xhat_ = at::empty({Bl_, Md_}, f32);
  since_fired_ = at::zeros({F_}, at::TensorOptions().dtype(at::kLong));
  BatchStreamOptions so;
  so.train_rows = train_rows_;
  so.global_batch = B_;
  so.rank = rank_;
  so.world_size = world_;
  so.seed = o_.seed;
  so.buffer_rows = std::max<int64_t>(1024, o_.shuffle_buffer_rows);
  ASSIGN_OR_RETURN(stream_, rows_.CreateBatchStream(so));
  return absl::OkStatus();
}

absl::StatusOr<bool> Trainer::TryResume() {
  const std::string dir = o_.out_dir + "/" + kCheckpointDir;
  if (!o_.resume || !fs::exists(dir + "/" + kStateJson)) return false;
  ASSIGN_OR_RETURN(CrosscoderConfig saved, LoadCrosscoderConfig(dir));
  RETURN_IF_ERROR(model_.config().CheckCompatible(saved, absl::StrCat("cannot resume from ", dir)));
  ASSIGN_OR_RETURN(json state, ReadJson(dir + "/" + kStateJson));
  if (state.value("batch_size", int64_t{-1}) != o_.batch_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot resume from ", dir, ": batch_size is ",
                     state.value("batch_size", int64_t{-1}), " but this run has ", o_.batch_size));
  }
  if (state.value("seed", uint64_t{0}) != o_.seed) {
    return absl::FailedPreconditionError(absl::StrCat("cannot resume from ", dir, ": seed is ",
                                                      state.value("seed", uint64_t{0}),
                                                      " but this run has ", o_.seed));
  }
  ASSIGN_OR_RETURN(Crosscoder saved_model, Crosscoder::Load(dir));
  model_.CopyFrom(saved_model);
  RETURN_IF_ERROR(
      model_.SetNormalization(saved_model.activation_mean(), saved_model.activation_scale()));
  ASSIGN_OR_RETURN(auto file, tensor_io::SafetensorsFile::Open(dir + "/" + kStateTensors));
  ASSIGN_OR_RETURN(at::Tensor m, tensor_io::LoadTensor(*file, "adam.exp_avg"));
  ASSIGN_OR_RETURN(at::Tensor v, tensor_io::LoadTensor(*file, "adam.exp_avg_sq"));
  ASSIGN_OR_RETURN(at::Tensor fired, tensor_io::LoadTensor(*file, "tokens_since_fired"));
  if (m.numel() != adam_m_.numel() || v.numel() != adam_v_.numel() || fired.numel() != F_ ||
      m.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat ||
      fired.scalar_type() != at::kLong) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, "/", kStateTensors, ": optimiser state does not match the model's size"));
  }
  adam_m_.copy_(m);
  adam_v_.copy_(v);
  since_fired_.copy_(fired);
  start_step_ = state.value("step", int64_t{0});
  threshold_ = static_cast<float>(NumberOr(state, "threshold", -1.0));
  model_.set_threshold(threshold_);
  history_.clear();
  for (const auto& r : state.value("history", json::array())) history_.push_back(RecordFromJson(r));
  if (!history_.empty()) last_loss_ = history_.back().loss;
  return true;
}

absl::Status Trainer::SaveCheckpoint(int64_t steps_done) {
  // Every rank must hold the same weights: compare a hash of the parameter bytes.
  const uint64_t hash = kernels::HashBytes(params_.data_ptr(), params_.numel() * 4);
  if (distributed()) {
    at::Tensor mine =
        at::tensor({static_cast<int64_t>(hash)}, at::TensorOptions().dtype(at::kLong));
    at::Tensor all = at::empty({world_}, mine.options());
    RETURN_IF_ERROR(comm_->AllGather(mine, all));
    for (int r = 0; r < world_; ++r) {
      if (all[r].item<int64_t>() != static_cast<int64_t>(hash)) {
        return absl::InternalError(absl::StrCat(
            "weights diverged across ranks at step ", steps_done, ": rank ", r, " has checksum ",
            all[r].item<int64_t>(), ", rank ", rank_, " has ", static_cast<int64_t>(hash)));
      }
    }
  }
  if (rank_ != 0) return absl::OkStatus();
  const std::string final_dir = o_.out_dir + "/" + kCheckpointDir;
  const std::string tmp = final_dir + ".tmp", old = final_dir + ".old";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  model_.set_threshold(threshold_);
  RETURN_IF_ERROR(model_.Save(tmp));
  tensor_io::SafetensorsWriter writer;
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg", adam_m_));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg_sq", adam_v_));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "tokens_since_fired", since_fired_));
  RETURN_IF_ERROR(writer.Write(tmp + "/" + kStateTensors));
  json hist = json::array();
  for (const auto& r : history_) hist.push_back(RecordJson(r));
  json state = {{"format", "crossdiff.trainer_state"},
                {"version", 1},
                {"step", steps_done},
                {"batch_size", o_.batch_size},
                {"seed", o_.seed},
                // The data order and every other random choice derive from (seed, stream position):
                // this pair is the RNG state and the data cursor.
                {"rng", {{"kind", "splitmix64-counter"}, {"seed", o_.seed}}},
                {"data_cursor",
                 {{"stream_position", steps_done * o_.batch_size}, {"train_rows", train_rows_}}},
                {"threshold", threshold_},
                {"world_size", world_},
                {"weights_checksum", absl::StrFormat("%016x", hash)},
                {"history", hist}};
  RETURN_IF_ERROR(WriteText(tmp + "/" + kStateJson, state.dump(1) + "\n"));
  fs::remove_all(old, ec);
  if (fs::exists(final_dir)) fs::rename(final_dir, old, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat(final_dir, ": cannot install checkpoint: ", ec.message()));
  fs::remove_all(old, ec);
  return absl::OkStatus();
}

absl::Status Trainer::UpdateDeadCounters(const at::Tensor& fired_counts) {
  at::Tensor counts = fired_counts.to(at::kLong).contiguous();
  RETURN_IF_ERROR(AllReduce(counts));
  since_fired_.add_(B_);
  since_fired_.masked_fill_(counts > 0, 0);
  return absl::OkStatus();
}

absl::Status Trainer::ApplyGradients(int64_t step) {
  if (distributed()) {
    // Bucketed all-reduce (16 MiB buckets) of the flat gradient.
    constexpr int64_t kBucket = int64_t{4} << 20;
    for (int64_t a = 0; a < grads_.numel(); a += kBucket) {
      at::Tensor bucket = grads_.narrow(0, a, std::min(kBucket, grads_.numel() - a));
      RETURN_IF_ERROR(comm_->AllReduce(bucket));
    }
  }
  double scale = 1.0;
  if (o_.grad_clip > 0) {
    const double norm = std::sqrt(kernels::SquaredNorm(grads_.data_ptr<float>(), grads_.numel()));
    if (!std::isfinite(norm)) {
      return absl::InternalError(
          absl::StrCat("non-finite gradient at step ", step, " (lower --lr?)"));
    }
    scale = std::min(1.0, o_.grad_clip / (norm + 1e-6));
  }
  kernels::AdamUpdate(params_.data_ptr<float>(), grads_.data_ptr<float>(),
                      adam_m_.data_ptr<float>(), adam_v_.data_ptr<float>(), params_.numel(),
                      LearningRate(step), o_.adam_beta1, o_.adam_beta2, o_.adam_eps, scale,
                      step + 1);
  return absl::OkStatus();
}

absl::Status Trainer::StepBatchTopK(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t F = F_, Md = Md_, Bl = Bl_;
  const double loss_before = sums->loss, aux_before = sums->aux_loss;
  float* x = x_.data_ptr<float>();
  at::Tensor enc = model_.encoder_matrix(), dec = model_.decoder_matrix();
  at::Tensor pre = workspace_.narrow(0, 0, Bl * F).view({Bl, F});
  at::addmm_out(pre, model_.b_enc(), x_, enc.t());
  at::Tensor w = model_.LatentWeights().contiguous();
  kernels::AllReduceI64 reduce = [this](std::vector<int64_t>& h) -> absl::Status {
    if (!distributed()) return absl::OkStatus();
    at::Tensor t = at::from_blob(h.data(), {static_cast<int64_t>(h.size())},
                                 at::TensorOptions().dtype(at::kLong));
    return comm_->AllReduce(t);
  };
  // 0.7 x the previous step's threshold bounds this step's candidates (one pass over `pre`); when
  // the threshold drops further in one step the exact full selection runs instead.
  ASSIGN_OR_RETURN(
      kernels::Selection sel,
      kernels::SelectAndGather(pre.data_ptr<float>(), Bl, F, w.data_ptr<float>(), KAt(step) * B_,
                               0.7f * last_selection_threshold_, reduce, &codes_));
  last_selection_threshold_ = sel.keep_all_positive ? 0.f : sel.threshold;

  // AuxK on latents dead for dead_tokens_threshold tokens (before this step).
  std::vector<int32_t> dead;
  if (o_.auxk_alpha > 0) {
    const int64_t* sf = since_fired_.data_ptr<int64_t>();
    for (int64_t i = 0; i < F; ++i)
      if (sf[i] >= o_.dead_tokens_threshold) dead.push_back(static_cast<int32_t>(i));
  }
  const bool use_aux = !dead.empty();
  if (use_aux) kernels::GatherAuxTopK(pre.data_ptr<float>(), Bl, F, dead, o_.auxk_k, &aux_codes_);
  // `pre` is dead from here on (the workspace becomes the gradient).

  kernels::SparseDecode(codes_, dec.data_ptr<float>(), Md, model_.b_dec().data_ptr<float>(),
                        xhat_.data_ptr<float>());
  at::Tensor err = xhat_;  // becomes xhat - x, then dL/dxhat
  err.sub_(x_);
  at::Tensor e2 = err.view({Bl, M_, d_}).pow(2).sum(2);  // [Bl, M]
  const double bm = static_cast<double>(B_ * M_);
  at::Tensor row_scale;
  if (o_.batch_top_k_loss == "l2") {
    at::Tensor norms = e2.sqrt();
    sums->loss += norms.sum().item<double>() / bm;
    row_scale = at::where(norms > 0, 1.0 / (norms * bm), at::zeros_like(norms));
  } else {
    sums->loss += e2.sum().item<double>() / bm;
    row_scale = at::full_like(e2, 2.0 / bm);
  }

  float* gaux = nullptr;
  if (use_aux) {
    // Residual e = x - xhat = -err; aux loss = sum ||e - ahat||^2 / sum ||e - mean(e)||^2 (global).
    at::Tensor stats = at::cat({err.sum(0).to(at::kDouble), e2.sum().to(at::kDouble).reshape({1})});
    RETURN_IF_ERROR(AllReduce(stats));
    const double s2 = stats[Md].item<double>();
    const double s1 = stats.narrow(0, 0, Md).pow(2).sum().item<double>();
    const double denom = std::max(s2 - s1 / static_cast<double>(B_), 1e-12);
    if (!gaux_.defined()) gaux_ = at::empty({Bl, Md}, x_.options());
    kernels::SparseDecode(aux_codes_, dec.data_ptr<float>(), Md, nullptr, gaux_.data_ptr<float>());
    gaux_.add_(err);  // ahat - e
    sums->aux_loss += gaux_.pow(2).sum().item<double>() / denom;
    gaux_.mul_(2.0 * o_.auxk_alpha / denom);
    gaux = gaux_.data_ptr<float>();
  }
  if (want_stats) {
    at::Tensor xv = x_.view({Bl, M_, d_});
    at::Tensor e2m = e2.sum(0).to(at::kDouble),
               x2m = xv.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
    at::Tensor xs = xv.sum(0).to(at::kDouble);  // [M, d]
    for (int64_t m = 0; m < M_; ++m) {
      sums->err2[m] += e2m[m].item<double>();
      sums->x2[m] += x2m[m].item<double>();
    }
    sums->xsum2.assign(xs.data_ptr<double>(),
                       xs.data_ptr<double>() + M_ * d_);  // raw sums, squared later
  }
  sums->nnz += static_cast<double>(codes_.nnz());
  err.view({Bl, M_, d_}).mul_(row_scale.to(at::kFloat).unsqueeze(2));

  // Backward: gradients into the flat buffer [g_enc | g_dec | g_benc | g_bdec].
  const int64_t fmd = F * Md;
  float* g = grads_.data_ptr<float>();
  kernels::BuildLatentEntries(codes_, use_aux ? &aux_codes_ : nullptr, F, &entries_);
  kernels::SparseBackward(entries_, x, err.data_ptr<float>(), gaux, dec.data_ptr<float>(), F, Md, g,
                          g + fmd, g + 2 * fmd);
  at::Tensor g_bdec = grads_.narrow(0, 2 * fmd + F, Md);
  at::sum_out(g_bdec, err, {0});
  if (o_.observe_step) {
    StepObservation obs;
    obs.step = step;
    obs.params = params_;
    obs.grads = grads_;
    obs.x = x_;
    obs.tokens_since_fired = since_fired_;
    obs.loss = sums->loss - loss_before;
    obs.aux_loss = sums->aux_loss - aux_before;
    obs.k = KAt(step);
    obs.nnz = codes_.nnz();
    o_.observe_step(obs);
  }

  // Latents that fired in the main selection this step.
  at::Tensor fired = at::zeros({F}, at::TensorOptions().dtype(at::kLong));
  int64_t* fp = fired.data_ptr<int64_t>();
  for (int64_t e = 0; e < codes_.nnz(); ++e) ++fp[codes_.latent[e]];
  RETURN_IF_ERROR(ApplyGradients(step));
  RETURN_IF_ERROR(UpdateDeadCounters(fired));
  if (step >= o_.threshold_start_step && !sel.keep_all_positive) {
    threshold_ = threshold_ < 0 ? sel.threshold
                                : static_cast<float>(o_.threshold_beta * threshold_ +
                                                     (1 - o_.threshold_beta) * sel.threshold);
  }
  return absl::OkStatus();
}

absl::Status Trainer::StepReluL1(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t F = F_, Md = Md_, Bl = Bl_;
  const double loss_before = sums->loss;
  at::Tensor enc = model_.encoder_matrix(), dec = model_.decoder_matrix();
  at::Tensor f = workspace_.narrow(0, 0, Bl * F).view({Bl, F});
  at::addmm_out(f, model_.b_enc(), x_, enc.t());
  f.relu_();
  at::Tensor nrm = dec.view({F, M_, d_}).norm(2, {2});  // [F, M]
  at::Tensor w = nrm.sum(1);
  at::addmm_out(xhat_, model_.b_dec().reshape({1, Md}), f, dec);
  at::Tensor err = xhat_;
  err.sub_(x_);
  const double lambda = L1Coefficient(step);
  const double inv_b = 1.0 / static_cast<double>(B_);
  at::Tensor e2 = err.view({Bl, M_, d_}).pow(2).sum(2);
  sums->loss +=
      e2.sum().item<double>() * inv_b + lambda * at::mv(f, w).sum().item<double>() * inv_b;
  if (want_stats) {
    at::Tensor xv = x_.view({Bl, M_, d_});
    at::Tensor e2m = e2.sum(0).to(at::kDouble),
               x2m = xv.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
    at::Tensor xs = xv.sum(0).to(at::kDouble);
    for (int64_t m = 0; m < M_; ++m) {
      sums->err2[m] += e2m[m].item<double>();
      sums->x2[m] += x2m[m].item<double>();
    }
    sums->xsum2.assign(xs.data_ptr<double>(), xs.data_ptr<double>() + M_ * d_);
  }
  at::Tensor active = f > 0;
  sums->nnz += static_cast<double>(active.sum().item<int64_t>());
  err.mul_(2.0 * inv_b);  // dL/dxhat
  const int64_t fmd = F * Md;
  at::Tensor g_enc = grads_.narrow(0, 0, fmd).view({F, Md});
  at::Tensor g_dec = grads_.narrow(0, fmd, fmd).view({F, Md});
  at::Tensor g_benc = grads_.narrow(0, 2 * fmd, F);
  at::Tensor g_bdec = grads_.narrow(0, 2 * fmd + F, Md);
  at::Tensor fsum = f.sum(0);
  at::mm_out(g_dec, f.t(), err);
  // d/d dec of lambda/B * sum_b sum_i f_bi sum_m ||dec_m[i]||.
  g_dec.view({F, M_, d_})
      .add_(dec.view({F, M_, d_}) / nrm.clamp_min(1e-12).unsqueeze(2) *
            (lambda * inv_b * fsum).view({F, 1, 1}));
  at::Tensor gpre = at::mm(err, dec.t()).add_(w.unsqueeze(0), lambda * inv_b).mul_(active);
  at::mm_out(g_enc, gpre.t(), x_);
  at::sum_out(g_benc, gpre, {0});
  at::sum_out(g_bdec, err, {0});
  if (o_.observe_step) {
    StepObservation obs;
    obs.step = step;
    obs.params = params_;
    obs.grads = grads_;
    obs.x = x_;
    obs.tokens_since_fired = since_fired_;
    obs.loss = sums->loss - loss_before;
    obs.l1_coeff = lambda;
    obs.nnz = active.sum().item<int64_t>();
    o_.observe_step(obs);
  }
  RETURN_IF_ERROR(ApplyGradients(step));
  RETURN_IF_ERROR(UpdateDeadCounters(active.sum(0)));
  return absl::OkStatus();
}

absl::Status Trainer::Step(int64_t step, bool want_stats, StepSums* sums) {
  // This rank's slice of global batch `step`: stream positions [step*B + rank*Bl, ... + Bl).
  RETURN_IF_ERROR(stream_->Next(step, x_.data_ptr<float>()));
  at::Tensor xv = x_.view({Bl_, M_, d_});
  if (model_.activation_mean().defined()) xv.sub_(model_.activation_mean().unsqueeze(0));
  xv.mul_(model_.activation_scale().view({1, M_, 1}));
  if (o_.arch == Architecture::kBatchTopK) return StepBatchTopK(step, want_stats, sums);
  return StepReluL1(step, want_stats, sums);
}

absl::Status Trainer::Evaluate(MetricsRecord* rec, double* l0_out) {
  constexpr int64_t kChunk = 1024;
  const bool val = val_rows_ > 0;
  const int64_t begin = val ? train_rows_ : 0;
  const int64_t n = std::min(o_.val_max_rows, val ? val_rows_ : train_rows_);
  model_.set_threshold(threshold_);
  std::vector<double> err2(M_, 0), x2(M_, 0);
  at::Tensor xsum = at::zeros({M_, d_}, at::TensorOptions().dtype(at::kDouble));
  double loss = 0, nnz = 0;
  const double lambda = o_.l1_coeff;
  at::Tensor w = model_.LatentWeights();
  for (int64_t a = 0; a < n; a += kChunk) {
    const int64_t len = std::min(kChunk, n - a);
    ASSIGN_OR_RETURN(at::Tensor raw, rows_.Read(begin + a, begin + a + len));
    RETURN_IF_ERROR(CheckFinite(rows_, raw, begin + a));
    at::Tensor xn = model_.Normalize(raw);
    at::Tensor f = model_.Encode(xn);
    at::Tensor e;
    if (o_.arch == Architecture::kBatchTopK) {
      // Sparse decode of the (k-sparse) codes: the dense product would cost as much as the encoder.
      at::Tensor nz =
          f.nonzero()
              .contiguous();  // [nnz, 2], row-major order (nonzero may return a transposed view)
      kernels::SparseCodes codes;
      codes.row_ptr.assign(len + 1, 0);
      const int64_t nnz = nz.size(0);
      codes.latent.resize(nnz);
      codes.value.resize(nnz);
      const int64_t* p = nz.data_ptr<int64_t>();
      const float* fv = f.data_ptr<float>();
      for (int64_t j = 0; j < nnz; ++j) {
        ++codes.row_ptr[p[2 * j] + 1];
        codes.latent[j] = static_cast<int32_t>(p[2 * j + 1]);
        codes.value[j] = fv[p[2 * j] * F_ + p[2 * j + 1]];
      }
      for (int64_t b = 0; b < len; ++b) codes.row_ptr[b + 1] += codes.row_ptr[b];
      at::Tensor xhat = at::empty({len, Md_}, xn.options());
      kernels::SparseDecode(codes, model_.decoder_matrix().data_ptr<float>(), Md_,
                            model_.b_dec().data_ptr<float>(), xhat.data_ptr<float>());
      e = xhat.view({len, M_, d_}) - xn;
    } else {
      e = model_.Decode(f) - xn;
    }
    at::Tensor e2 = e.pow(2).sum(2);  // [len, M]
    if (o_.arch == Architecture::kReluL1) {
      loss += e2.sum().item<double>() + lambda * at::mv(f, w).sum().item<double>();
    } else if (o_.batch_top_k_loss == "l2") {
      loss += e2.sqrt().sum().item<double>() / static_cast<double>(M_);
    } else {
      loss += e2.sum().item<double>() / static_cast<double>(M_);
    }
    nnz += static_cast<double>((f > 0).sum().item<int64_t>());
    at::Tensor e2m = e2.sum(0).to(at::kDouble),
               x2m = xn.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
    for (int64_t m = 0; m < M_; ++m) {
      err2[m] += e2m[m].item<double>();
      x2[m] += x2m[m].item<double>();
    }
    xsum += xn.sum(0).to(at::kDouble);
  }
  rec->val_fvu.assign(M_, 0);
  for (int64_t m = 0; m < M_; ++m) {
    const double var = x2[m] - xsum[m].pow(2).sum().item<double>() / static_cast<double>(n);
    rec->val_fvu[m] = var > 0 ? err2[m] / var : 0;
  }
  rec->val_loss = loss / static_cast<double>(n);
  *l0_out = nnz / static_cast<double>(n);
  return absl::OkStatus();
}

absl::Status Trainer::WriteOutputs(const TrainResult& r) {
  model_.set_threshold(threshold_);
  RETURN_IF_ERROR(model_.Save(o_.out_dir));
  json fvu_named = json::object();
  const auto& names = model_.config().models;
  for (size_t m = 0; m < r.fvu.size(); ++m) {
    fvu_named[m < names.size() ? names[m] : absl::StrCat("model_", m)] = r.fvu[m];
  }
  json hist = json::array();
  for (const auto& rec : r.history) hist.push_back(RecordJson(rec));
  json j = {{"tokens_per_second", r.tokens_per_second},
            {"steps", r.steps},
            {"batch_size", r.batch_size},
            {"final_loss", r.final_loss},
            {"fvu", r.fvu},
            {"fvu_per_model", fvu_named},
            {"fvu_split", val_rows_ > 0 ? "validation" : "train"},
            {"l0", r.l0},
            {"dead_latents", r.dead_latents},
            {"architecture", std::string(ArchitectureName(o_.arch))},
            {"dict_size", F_},
            {"k", o_.arch == Architecture::kBatchTopK ? o_.k : 0},
            {"threshold", r.threshold},
            {"world_size", world_},
            {"threads", at::get_num_threads()},
            {"history", hist}};
  return WriteText(o_.out_dir + "/train_metrics.json", j.dump(2) + "\n");
}

absl::StatusOr<TrainResult> Trainer::Run() {
#if defined(__GLIBC__)
  // A fixed mmap threshold keeps glibc from raising it after the first large free, which would let
  // every transient buffer (a batch, a validation chunk) stay resident in the heap for the rest of
  // the run. Large blocks are then mapped and unmapped, and resident memory tracks live buffers.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
  RETURN_IF_ERROR(Validate());
  std::error_code ec;
  if (rank_ == 0) {
    fs::create_directories(o_.out_dir, ec);
    if (ec)
      return absl::PermissionDeniedError(
          absl::StrCat(o_.out_dir, ": cannot create: ", ec.message()));
  }
  RETURN_IF_ERROR(AllocateState());
  ASSIGN_OR_RETURN(bool resumed, TryResume());
  if (!resumed) {
    model_.InitializeWeights(o_.seed, o_.decoder_init_norm);
    RETURN_IF_ERROR(EstimateNormalization());
  }

  ProgressMeter meter("train", "steps", o_.steps, nullptr, 1.0);
  if (progress_) meter.set_callback(progress_);
  const int64_t timing_warmup =
      std::min<int64_t>(10, std::max<int64_t>(1, (o_.steps - start_step_) / 10));
  StepSums window;
  window.err2.assign(M_, 0);
  window.x2.assign(M_, 0);
  int64_t window_steps = 0;
  std::vector<double> window_xsum2(M_, 0);
  TrainResult result;
  result.batch_size = B_;
  const int64_t stop = o_.stop_after_step > 0 ? std::min(o_.steps, o_.stop_after_step) : o_.steps;
  for (int64_t step = start_step_; step < stop; ++step) {
    const bool metrics_point = (step + 1) % o_.metrics_every == 0 || step + 1 == o_.steps;
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(GuardTorch(absl::StrCat("training step ", step), [&]() -> absl::Status {
      return Step(step, metrics_point, &window);
    }));
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++window_steps;
    if (step - start_step_ >= timing_warmup) {
      timed_seconds_ += dt;
      timed_tokens_ += B_;
    }
    const double tps =
        timed_seconds_ > 0 ? timed_tokens_ / timed_seconds_ : B_ / std::max(dt, 1e-9);
    if (metrics_point) {
      // Reduce the window's sums across ranks: [loss, aux, nnz, err2[M], x2[M], xsum[M*d]].
      std::vector<double> v = {window.loss, window.aux_loss, window.nnz};
      v.insert(v.end(), window.err2.begin(), window.err2.end());
      v.insert(v.end(), window.x2.begin(), window.x2.end());
      v.insert(v.end(), window.xsum2.begin(), window.xsum2.end());
      at::Tensor t = at::tensor(v, at::TensorOptions().dtype(at::kDouble));
      RETURN_IF_ERROR(AllReduce(t));
      const double* p = t.data_ptr<double>();
      MetricsRecord rec;
      rec.step = step + 1;
      rec.loss = p[0] / window_steps;
      rec.aux_loss = p[1] / window_steps;
      rec.l0 = p[2] / (static_cast<double>(B_) * window_steps);
      rec.fvu.resize(M_);
      for (int64_t m = 0; m < M_; ++m) {
        double s2 = 0;
        for (int64_t j = 0; j < d_; ++j)
          s2 += p[3 + 2 * M_ + m * d_ + j] * p[3 + 2 * M_ + m * d_ + j];
        const double var = p[3 + M_ + m] - s2 / static_cast<double>(B_);
        rec.fvu[m] = var > 0 ? p[3 + m] / var : 0;  // the metric point's batch
      }
      rec.lr = LearningRate(step);
      rec.dead_latents = DeadLatents();
      rec.tokens_per_second = tps;
      last_loss_ = rec.loss;
      if (rank_ == 0 && val_rows_ > 0) {
        double l0 = 0;
        RETURN_IF_ERROR(GuardTorch("validation", [&]() { return Evaluate(&rec, &l0); }));
      }
      history_.push_back(rec);
      window = StepSums();
      window.err2.assign(M_, 0);
      window.x2.assign(M_, 0);
      window_steps = 0;
    }
    if (o_.checkpoint_every > 0 && (step + 1) % o_.checkpoint_every == 0 && step + 1 < o_.steps) {
      RETURN_IF_ERROR(SaveCheckpoint(step + 1));
    }
    const std::string extra =
        absl::StrFormat("loss %.4g  %.0f tok/s%s", last_loss_, tps,
                        threshold_ >= 0 ? absl::StrFormat("  thr %.3g", threshold_) : "");
    meter.Update(step + 1, extra);
  }
  result.steps = stop;
  result.tokens_per_second = timed_seconds_ > 0 ? timed_tokens_ / timed_seconds_ : 0;
  result.threshold = threshold_;
  result.dead_latents = DeadLatents();
  result.final_loss = last_loss_;
  result.history = history_;
  if (stop < o_.steps) {
    RETURN_IF_ERROR(SaveCheckpoint(stop));
    result.interrupted = true;
    meter.Finish(stop, "interrupted (checkpoint written)");
    return result;
  }
  if (rank_ == 0) {
    MetricsRecord fin;
    double l0 = 0;
    RETURN_IF_ERROR(GuardTorch("final evaluation", [&]() { return Evaluate(&fin, &l0); }));
    result.fvu = fin.val_fvu;
    result.l0 = l0;
    RETURN_IF_ERROR(WriteOutputs(result));
    if (o_.checkpoint_every > 0) RETURN_IF_ERROR(SaveCheckpoint(stop));
  } else if (o_.checkpoint_every > 0) {
    RETURN_IF_ERROR(SaveCheckpoint(stop));
  }
  meter.Finish(stop,
               absl::StrFormat("loss %.4g  %.0f tok/s", last_loss_, result.tokens_per_second));
  return result;
}

}  // namespace

absl::StatusOr<TrainResult> RunTrainingOnRows(const TrainOptions& options, const RowProvider& rows,
                                              comm::Communicator* comm,
                                              ProgressMeter::Callback progress) {
  Trainer trainer(options, rows, comm, std::move(progress));
  return GuardTorch("crosscoder training", [&]() { return trainer.Run(); });
}

absl::StatusOr<TrainResult> RunTraining(const TrainOptions& options, comm::Communicator* comm,
                                        ProgressMeter::Callback progress) {
  if (options.store_dir.empty())
    return absl::InvalidArgumentError("store_dir (--activations) is required");
  ASSIGN_OR_RETURN(auto rows, OpenStoreRowProvider(options.store_dir));
  return RunTrainingOnRows(options, *rows, comm, std::move(progress));
}

}  // namespace crossdiff::crosscoder
