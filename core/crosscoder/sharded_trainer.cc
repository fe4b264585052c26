#include "core/crosscoder/sharded_trainer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/crosscoder/crosscoder.h"
#include "core/crosscoder/sparse_kernels.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::crosscoder {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// RunTraining's checkpoint layout (trainer.cc): the same names, so checkpoints are interchangeable.
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

MetricsRecord RecordFromJson(const json& j) {
  MetricsRecord r;
  r.step = j.value("step", int64_t{0});
  r.loss = j.value("loss", 0.0);
  r.aux_loss = j.value("aux_loss", 0.0);
  r.fvu = j.value("fvu", std::vector<double>{});
  r.val_fvu = j.value("val_fvu", std::vector<double>{});
  r.val_loss = j.value("val_loss", 0.0);
  r.l0 = j.value("l0", 0.0);
  r.lr = j.value("lr", 0.0);
  r.dead_latents = j.value("dead_latents", int64_t{0});
  r.tokens_per_second = j.value("tokens_per_second", 0.0);
  return r;
}

struct StepSums {
  double loss = 0, aux_loss = 0, nnz = 0;
  std::vector<double> err2, x2, xsum;  // per model; xsum [M*d]
  void Reset(int64_t M, int64_t Md) {
    loss = aux_loss = nnz = 0;
    err2.assign(M, 0);
    x2.assign(M, 0);
    xsum.assign(Md, 0);
  }
};

class ShardedTrainer {
 public:
  ShardedTrainer(const TrainOptions& o, const RowProvider& rows, comm::Communicator* comm,
                 ProgressMeter::Callback cb)
      : o_(o), rows_(rows), comm_(comm), progress_(std::move(cb)) {
    rank_ = comm != nullptr ? comm->rank() : 0;
    world_ = comm != nullptr ? comm->world_size() : 1;
  }

  absl::StatusOr<TrainResult> Run();

 private:
  bool distributed() const { return comm_ != nullptr && world_ > 1; }
  absl::Status AllReduce(at::Tensor& t, comm::ReduceOp op = comm::ReduceOp::kSum) {
    return distributed() ? comm_->AllReduce(t, op) : absl::OkStatus();
  }
  absl::Status Validate();
  absl::Status EstimateNormalization();
  void InitializeShard();
  absl::StatusOr<bool> TryResume();
  absl::Status Step(int64_t step, bool want_stats, StepSums* sums);
  absl::Status StepBatchTopK(int64_t step, bool want_stats, StepSums* sums);
  absl::Status StepReluL1(int64_t step, bool want_stats, StepSums* sums);
  void AccumulateStats(const at::Tensor& e2, StepSums* sums);
  // The observe_step hook with this shard's flat buffers (layout [enc | dec | b_enc | b_dec] of
  // the shard).
  void Observe(int64_t step) {
    if (!o_.observe_step) return;
    StepObservation obs;
    obs.step = step;
    obs.params = params_;
    obs.grads = grads_;
    obs.x = x_;
    obs.tokens_since_fired = since_fired_;
    o_.observe_step(obs);
  }
  absl::Status ApplyGradients(int64_t step);
  absl::StatusOr<kernels::Selection> SelectGlobalKth(const at::Tensor& scores, int64_t kth);
  absl::Status FilterAuxGlobally(const kernels::SparseCodes& local, int64_t B,
                                 kernels::SparseCodes* out);
  absl::StatusOr<at::Tensor> GatherRows(const at::Tensor& local);
  absl::StatusOr<Crosscoder> GatherModel();
  absl::Status Evaluate(MetricsRecord* rec, double* l0_out);
  absl::Status SaveCheckpoint(int64_t steps_done);
  absl::Status WriteOutputs(const Crosscoder& model, const TrainResult& r);
  double LearningRate(int64_t step) const;
  double L1Coefficient(int64_t step) const;
  int64_t KAt(int64_t step) const;
  absl::StatusOr<int64_t> DeadLatents();

  TrainOptions o_;
  const RowProvider& rows_;
  comm::Communicator* comm_;
  ProgressMeter::Callback progress_;
  int rank_ = 0, world_ = 1;

  int64_t M_ = 0, d_ = 0, Md_ = 0, F_ = 0, B_ = 0;
  LatentShard shard_;
  int64_t Fl_ = 0;  // shard_.count
  int64_t train_rows_ = 0, val_rows_ = 0;
  CrosscoderConfig config_;
  at::Tensor mean_, scale_;  // normalisation (mean undefined without centring)
  // Local parameters in one flat buffer [enc Fl*Md | dec Fl*Md | b_enc Fl | b_dec Md]
  // (RunTraining's layout restricted to this shard, b_dec replicated), gradients and Adam state
  // alike.
  at::Tensor params_, grads_, adam_m_, adam_v_;
  at::Tensor enc_, dec_, benc_, bdec_;
  at::Tensor x_, partial_, gaux_;
  at::Tensor since_fired_;  // I64 [Fl]
  std::unique_ptr<BatchStream> stream_;
  kernels::SparseCodes codes_, aux_local_, aux_codes_;
  kernels::LatentEntries entries_;
  int64_t start_step_ = 0;
  float threshold_ = -1;
  std::vector<MetricsRecord> history_;
  double timed_seconds_ = 0;
  int64_t timed_tokens_ = 0;
  double last_loss_ = 0;
};

absl::Status ShardedTrainer::Validate() {
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
  constexpr int64_t kMaxDictSize = int64_t{1} << 24;  // as RunTraining
  if (F_ < 1 || F_ > kMaxDictSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict_size must be in [1, ", kMaxDictSize, "], got ", F_));
  }
  if (F_ % world_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict_size ", F_, " is not divisible by the world size ", world_,
                     " (latent sharding gives every rank F/W latents)"));
  }
  shard_ = LatentShardOf(F_, rank_, world_);
  Fl_ = shard_.count;
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
  if (o_.lr < 0 || !std::isfinite(o_.lr))
    return absl::InvalidArgumentError("lr must be finite and >= 0");
  if (o_.val_fraction < 0 || o_.val_fraction > 0.5) {
    return absl::InvalidArgumentError(
        absl::StrCat("val_fraction must be in [0, 0.5], got ", o_.val_fraction));
  }
  if (o_.l1_coeff < 0) return absl::InvalidArgumentError("l1_coeff must be >= 0");
  if (o_.dead_tokens_threshold < 1) {
    return absl::InvalidArgumentError("dead_tokens_threshold must be positive");
  }
  val_rows_ = static_cast<int64_t>(std::floor(o_.val_fraction * static_cast<double>(rows_.rows())));
  if (o_.val_fraction > 0 && val_rows_ == 0 && rows_.rows() > 1) val_rows_ = 1;
  train_rows_ = rows_.rows() - val_rows_;
  if (train_rows_ < 1) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": no training rows left after the split"));
  }
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

  config_.architecture = o_.arch;
  config_.activation_dim = d_;
  config_.dict_size = F_;
  config_.num_models = M_;
  config_.k = o_.arch == Architecture::kBatchTopK ? o_.k : 0;
  config_.models = rows_.models();
  if (!config_.models.empty() && static_cast<int64_t>(config_.models.size()) != M_) {
    config_.models.clear();
  }
  config_.layer = rows_.layer();
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
                       {"val_fraction", o_.val_fraction},
                       {"sharding", "latent"}};
  config_.extra_json = extra.dump();
  return config_.Validate();
}

// RunTraining's schedules, unchanged (keep in step with trainer.cc).
double ShardedTrainer::LearningRate(int64_t step) const {
  double lr = o_.lr;
  if (o_.warmup_steps > 0 && step < o_.warmup_steps) {
    lr *= static_cast<double>(step + 1) / o_.warmup_steps;
  }
  if (o_.lr_decay_start < 1) {
    const int64_t decay_start =
        static_cast<int64_t>(o_.lr_decay_start * static_cast<double>(o_.steps));
    if (step >= decay_start && o_.steps > decay_start) {
      lr *= static_cast<double>(o_.steps - step) / static_cast<double>(o_.steps - decay_start);
    }
  }
  return lr;
}

double ShardedTrainer::L1Coefficient(int64_t step) const {
  const double warm = o_.l1_warmup_fraction * static_cast<double>(o_.steps);
  if (warm <= 0) return o_.l1_coeff;
  return o_.l1_coeff * std::min(1.0, static_cast<double>(step + 1) / warm);
}

int64_t ShardedTrainer::KAt(int64_t step) const {
  if (o_.k_initial <= 0 || o_.k_anneal_steps <= 0 || step >= o_.k_anneal_steps) return o_.k;
  const double t = static_cast<double>(step) / static_cast<double>(o_.k_anneal_steps);
  return std::max<int64_t>(1, std::llround(o_.k_initial + (o_.k - o_.k_initial) * t));
}

absl::StatusOr<int64_t> ShardedTrainer::DeadLatents() {
  at::Tensor n = (since_fired_ >= o_.dead_tokens_threshold).sum().to(at::kLong).reshape({1});
  RETURN_IF_ERROR(AllReduce(n));
  return n.item<int64_t>();
}

// RunTraining's normalisation: every rank reads the same rows, so the statistics agree exactly.
absl::Status ShardedTrainer::EstimateNormalization() {
  constexpr int64_t kChunk = 1024;
  const int64_t sample = std::min(train_rows_, std::max<int64_t>(1, o_.normalization_rows));
  const int64_t n_chunks = (sample + kChunk - 1) / kChunk;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t len = std::min(kChunk, sample - c * kChunk);
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
  scale_ = (std::sqrt(static_cast<double>(d_)) / mean_norm).to(at::kFloat);
  mean_ = o_.center ? mean.to(at::kFloat) : at::Tensor();
  bdec_.copy_(
      ((data_mean - mean) * scale_.to(at::kDouble).unsqueeze(1)).to(at::kFloat).reshape({Md_}));
  return absl::OkStatus();
}

// Crosscoder::InitializeWeights restricted to this shard: the same generator draws the directions
// of all F latents (F*d floats, 1/M of one matrix) and this rank keeps its rows.
void ShardedTrainer::InitializeShard() {
  at::Generator gen = at::detail::createCPUGenerator(o_.seed);
  at::Tensor dir = at::randn({F_, 1, d_}, gen, at::TensorOptions().dtype(at::kFloat));
  dir = dir.narrow(0, shard_.begin, Fl_);
  dir = dir / dir.norm(2, {2}, true).clamp_min(1e-12) * o_.decoder_init_norm;
  dec_.view({Fl_, M_, d_}).copy_(dir.expand({Fl_, M_, d_}));
  enc_.copy_(dec_);
  benc_.zero_();
  bdec_.zero_();
}

// The k-th largest of the scores of all ranks (the sharded top-k of Gao et al. 2024): each rank
// proposes its min(k, n) largest scores, every rank gathers all proposals (padded with -1) and
// takes the k-th largest. Exact: the global top k lies within the union of the local top k's.
absl::StatusOr<kernels::Selection> ShardedTrainer::SelectGlobalKth(const at::Tensor& scores,
                                                                   int64_t kth) {
  at::Tensor flat = scores.reshape({-1});
  at::Tensor proposal = at::full({kth}, -1.0f, flat.options());
  const int64_t take = std::min(kth, flat.numel());
  if (take > 0)
    proposal.narrow(0, 0, take).copy_(std::get<0>(at::topk(flat, take, 0, true, false)));
  at::Tensor positive = (flat > 0).sum().to(at::kLong).reshape({1});
  RETURN_IF_ERROR(AllReduce(positive));
  at::Tensor gathered = proposal;
  if (distributed()) {
    gathered = at::empty({kth * world_}, proposal.options());
    RETURN_IF_ERROR(comm_->AllGather(proposal, gathered));
  }
  kernels::Selection sel;
  sel.positive = positive.item<int64_t>();
  sel.threshold = std::get<0>(at::topk(gathered, kth, 0, true, false)).min().item<float>();
  sel.keep_all_positive = sel.positive < kth || !(sel.threshold > 0);
  return sel;
}

// AuxK across shards: keeps, per token, the local aux entries among the k_aux largest of all ranks.
absl::Status ShardedTrainer::FilterAuxGlobally(const kernels::SparseCodes& local, int64_t B,
                                               kernels::SparseCodes* out) {
  const int64_t ka = o_.auxk_k;
  at::Tensor proposal = at::full({B, ka}, -1.0f);
  float* pp = proposal.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> vals(local.value.begin() + local.row_ptr[b],
                            local.value.begin() + local.row_ptr[b + 1]);
    std::sort(vals.begin(), vals.end(), std::greater<float>());
    for (int64_t j = 0; j < std::min<int64_t>(ka, vals.size()); ++j) pp[b * ka + j] = vals[j];
  }
  at::Tensor gathered = proposal;
  if (distributed()) {
    gathered = at::empty({world_, B, ka}, proposal.options());
    RETURN_IF_ERROR(comm_->AllGather(proposal, gathered));
    gathered = gathered.permute({1, 0, 2}).reshape({B, world_ * ka});
  }
  at::Tensor row_kth =
      std::get<0>(at::topk(gathered, ka, 1, true, true)).select(1, ka - 1).contiguous();
  const float* thr = row_kth.data_ptr<float>();
  out->row_ptr.assign(1, 0);
  out->latent.clear();
  out->value.clear();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = local.row_ptr[b]; e < local.row_ptr[b + 1]; ++e) {
      if (local.value[e] >= thr[b] || thr[b] <= 0) {
        out->latent.push_back(local.latent[e]);
        out->value.push_back(local.value[e]);
      }
    }
    out->row_ptr.push_back(static_cast<int64_t>(out->latent.size()));
  }
  return absl::OkStatus();
}

void ShardedTrainer::AccumulateStats(const at::Tensor& e2, StepSums* sums) {
  at::Tensor xv = x_.view({B_, M_, d_});
  at::Tensor e2m = e2.sum(0).to(at::kDouble),
             x2m = xv.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
  at::Tensor xs = xv.sum(0).to(at::kDouble).contiguous();
  for (int64_t m = 0; m < M_; ++m) {
    sums->err2[m] += e2m[m].item<double>();
    sums->x2[m] += x2m[m].item<double>();
  }
  sums->xsum.assign(xs.data_ptr<double>(), xs.data_ptr<double>() + Md_);
}

absl::Status ShardedTrainer::ApplyGradients(int64_t step) {
  double scale = 1.0;
  if (o_.grad_clip > 0) {
    // The squared norm of this shard's own gradients, summed over shards, plus the replicated
    // decoder bias once.
    const int64_t own = 2 * Fl_ * Md_ + Fl_;
    at::Tensor sq = at::tensor({kernels::SquaredNorm(grads_.data_ptr<float>(), own)},
                               at::TensorOptions().dtype(at::kDouble));
    RETURN_IF_ERROR(AllReduce(sq));
    const double norm =
        std::sqrt(sq.item<double>() + kernels::SquaredNorm(grads_.data_ptr<float>() + own, Md_));
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

absl::Status ShardedTrainer::StepBatchTopK(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t Fl = Fl_, Md = Md_, B = B_;
  at::Tensor pre = at::addmm(benc_, x_, enc_.t()).contiguous();  // [B, Fl]
  at::Tensor w = dec_.view({Fl, M_, d_}).norm(2, {2}).sum(1).contiguous();
  at::Tensor scores = pre.clamp_min(0) * w.unsqueeze(0);
  ASSIGN_OR_RETURN(kernels::Selection sel, SelectGlobalKth(scores, KAt(step) * B));
  kernels::GatherSelected(pre.data_ptr<float>(), B, Fl, w.data_ptr<float>(), sel, &codes_);

  // AuxK on latents dead for dead_tokens_threshold tokens, decided the same way on every rank.
  std::vector<int32_t> dead;
  if (o_.auxk_alpha > 0) {
    const int64_t* sf = since_fired_.data_ptr<int64_t>();
    for (int64_t i = 0; i < Fl; ++i) {
      if (sf[i] >= o_.dead_tokens_threshold) dead.push_back(static_cast<int32_t>(i));
    }
  }
  at::Tensor any_dead =
      at::tensor({static_cast<int64_t>(dead.size())}, at::TensorOptions().dtype(at::kLong));
  RETURN_IF_ERROR(AllReduce(any_dead));
  const bool use_aux = any_dead.item<int64_t>() > 0;
  if (use_aux) {
    kernels::GatherAuxTopK(pre.data_ptr<float>(), B, Fl, dead, o_.auxk_k, &aux_local_);
    RETURN_IF_ERROR(FilterAuxGlobally(aux_local_, B, &aux_codes_));
  }

  // Partial reconstructions of every shard, summed.
  kernels::SparseDecode(codes_, dec_.data_ptr<float>(), Md, nullptr, partial_.data_ptr<float>());
  RETURN_IF_ERROR(AllReduce(partial_));
  at::Tensor err = partial_.add(bdec_.unsqueeze(0)).sub_(x_);  // xhat - x, then dL/dxhat
  at::Tensor e2 = err.view({B, M_, d_}).pow(2).sum(2);         // [B, M]
  const double bm = static_cast<double>(B * M_);
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
    at::Tensor err_sum = err.sum(0).to(at::kDouble);
    const double s2 = e2.sum().item<double>();
    const double s1 = err_sum.pow(2).sum().item<double>();
    const double denom = std::max(s2 - s1 / static_cast<double>(B), 1e-12);
    if (!gaux_.defined()) gaux_ = at::empty({B, Md}, x_.options());
    kernels::SparseDecode(aux_codes_, dec_.data_ptr<float>(), Md, nullptr, gaux_.data_ptr<float>());
    RETURN_IF_ERROR(AllReduce(gaux_));
    gaux_.add_(err);  // ahat - e
    sums->aux_loss += gaux_.pow(2).sum().item<double>() / denom;
    gaux_.mul_(2.0 * o_.auxk_alpha / denom);
    gaux = gaux_.data_ptr<float>();
  }
  if (want_stats) AccumulateStats(e2, sums);
  sums->nnz += static_cast<double>(codes_.nnz());  // this shard's; summed at metric points
  err.view({B, M_, d_}).mul_(row_scale.to(at::kFloat).unsqueeze(2));

  const int64_t fmd = Fl * Md;
  float* g = grads_.data_ptr<float>();
  kernels::BuildLatentEntries(codes_, use_aux ? &aux_codes_ : nullptr, Fl, &entries_);
  kernels::SparseBackward(entries_, x_.data_ptr<float>(), err.data_ptr<float>(), gaux,
                          dec_.data_ptr<float>(), Fl, Md, g, g + fmd, g + 2 * fmd);
  at::Tensor g_bdec = grads_.narrow(0, 2 * fmd + Fl, Md);
  at::sum_out(g_bdec, err, {0});

  Observe(step);
  at::Tensor fired = at::zeros({Fl}, at::TensorOptions().dtype(at::kLong));
  int64_t* fp = fired.data_ptr<int64_t>();
  for (int64_t e = 0; e < codes_.nnz(); ++e) ++fp[codes_.latent[e]];
  RETURN_IF_ERROR(ApplyGradients(step));
  since_fired_.add_(B);
  since_fired_.masked_fill_(fired > 0, 0);
  if (step >= o_.threshold_start_step && !sel.keep_all_positive) {
    threshold_ = threshold_ < 0 ? sel.threshold
                                : static_cast<float>(o_.threshold_beta * threshold_ +
                                                     (1 - o_.threshold_beta) * sel.threshold);
  }
  return absl::OkStatus();
}

absl::Status ShardedTrainer::StepReluL1(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t Fl = Fl_, Md = Md_, B = B_;
  at::Tensor f = at::addmm(benc_, x_, enc_.t()).relu_();  // [B, Fl]
  at::Tensor nrm = dec_.view({Fl, M_, d_}).norm(2, {2});  // [Fl, M]
  at::Tensor w = nrm.sum(1);
  at::mm_out(partial_, f, dec_);
  RETURN_IF_ERROR(AllReduce(partial_));
  at::Tensor err = partial_.add(bdec_.unsqueeze(0)).sub_(x_);
  const double lambda = L1Coefficient(step);
  const double inv_b = 1.0 / static_cast<double>(B);
  at::Tensor e2 = err.view({B, M_, d_}).pow(2).sum(2);
  at::Tensor l1 = at::mv(f, w).sum().to(at::kDouble).reshape({1});
  RETURN_IF_ERROR(AllReduce(l1));
  sums->loss += e2.sum().item<double>() * inv_b + lambda * l1.item<double>() * inv_b;
  if (want_stats) AccumulateStats(e2, sums);
  at::Tensor active = f > 0;
  sums->nnz += static_cast<double>(active.sum().item<int64_t>());
  err.mul_(2.0 * inv_b);  // dL/dxhat
  const int64_t fmd = Fl * Md;
  at::Tensor g_enc = grads_.narrow(0, 0, fmd).view({Fl, Md});
  at::Tensor g_dec = grads_.narrow(0, fmd, fmd).view({Fl, Md});
  at::Tensor g_benc = grads_.narrow(0, 2 * fmd, Fl);
  at::Tensor g_bdec = grads_.narrow(0, 2 * fmd + Fl, Md);
  at::Tensor fsum = f.sum(0);
  at::mm_out(g_dec, f.t(), err);
  g_dec.view({Fl, M_, d_})
      .add_(dec_.view({Fl, M_, d_}) / nrm.clamp_min(1e-12).unsqueeze(2) *
            (lambda * inv_b * fsum).view({Fl, 1, 1}));
  at::Tensor gpre = at::mm(err, dec_.t()).add_(w.unsqueeze(0), lambda * inv_b).mul_(active);
  at::mm_out(g_enc, gpre.t(), x_);
  at::sum_out(g_benc, gpre, {0});
  at::sum_out(g_bdec, err, {0});
  Observe(step);
  RETURN_IF_ERROR(ApplyGradients(step));
  since_fired_.add_(B);
  since_fired_.masked_fill_(active.sum(0) > 0, 0);
  return absl::OkStatus();
}

absl::Status ShardedTrainer::Step(int64_t step, bool want_stats, StepSums* sums) {
  // Every rank reads the whole global batch `step` (the stream of a single-rank run).
  RETURN_IF_ERROR(stream_->Next(step, x_.data_ptr<float>()));
  at::Tensor xv = x_.view({B_, M_, d_});
  if (mean_.defined()) xv.sub_(mean_.unsqueeze(0));
  xv.mul_(scale_.view({1, M_, 1}));
  if (o_.arch == Architecture::kBatchTopK) return StepBatchTopK(step, want_stats, sums);
  return StepReluL1(step, want_stats, sums);
}

absl::StatusOr<at::Tensor> ShardedTrainer::GatherRows(const at::Tensor& local) {
  if (!distributed()) return local.clone();
  std::vector<int64_t> sizes = local.sizes().vec();
  sizes[0] *= world_;
  at::Tensor all = at::empty(sizes, local.options());
  RETURN_IF_ERROR(comm_->AllGather(local.contiguous(), all));
  return all;
}

absl::StatusOr<Crosscoder> ShardedTrainer::GatherModel() {
  ASSIGN_OR_RETURN(Crosscoder model, Crosscoder::Create(config_));
  ASSIGN_OR_RETURN(at::Tensor enc, GatherRows(enc_));
  ASSIGN_OR_RETURN(at::Tensor dec, GatherRows(dec_));
  ASSIGN_OR_RETURN(at::Tensor benc, GatherRows(benc_));
  model.encoder_matrix().copy_(enc);
  model.decoder_matrix().copy_(dec);
  model.b_enc().copy_(benc);
  model.b_dec().copy_(bdec_.view({M_, d_}));
  RETURN_IF_ERROR(model.SetNormalization(mean_, scale_));
  model.set_threshold(threshold_);
  return model;
}

// Held-out FVU with the inference encoder, computed shard by shard: partial reconstructions are
// all-reduced; every rank ends with the same figures.
absl::Status ShardedTrainer::Evaluate(MetricsRecord* rec, double* l0_out) {
  constexpr int64_t kChunk = 1024;
  const bool val = val_rows_ > 0;
  const int64_t begin = val ? train_rows_ : 0;
  const int64_t n = std::min(o_.val_max_rows, val ? val_rows_ : train_rows_);
  std::vector<double> err2(M_, 0), x2(M_, 0);
  at::Tensor xsum = at::zeros({M_, d_}, at::TensorOptions().dtype(at::kDouble));
  double loss = 0, nnz = 0;
  at::Tensor w = dec_.view({Fl_, M_, d_}).norm(2, {2}).sum(1);
  for (int64_t a = 0; a < n; a += kChunk) {
    const int64_t len = std::min(kChunk, n - a);
    ASSIGN_OR_RETURN(at::Tensor raw, rows_.Read(begin + a, begin + a + len));
    RETURN_IF_ERROR(CheckFinite(rows_, raw, begin + a));
    at::Tensor xn = raw.to(at::kFloat);
    if (mean_.defined()) xn = xn - mean_.unsqueeze(0);
    xn = (xn * scale_.view({1, M_, 1})).reshape({len, Md_});
    at::Tensor f = at::addmm(benc_, xn, enc_.t()).relu_();
    if (o_.arch == Architecture::kBatchTopK) {
      at::Tensor scores = f * w.unsqueeze(0);
      if (threshold_ >= 0) {
        f = f * (scores > threshold_).to(at::kFloat);
      } else {
        ASSIGN_OR_RETURN(kernels::Selection sel, SelectGlobalKth(scores, config_.k * len));
        f = f * (sel.keep_all_positive ? (scores > 0) : (scores >= sel.threshold)).to(at::kFloat);
      }
    }
    at::Tensor part = at::mm(f, dec_);
    at::Tensor l1 = at::mv(f, w).sum().to(at::kDouble).reshape({1});
    at::Tensor active = (f > 0).sum().to(at::kDouble).reshape({1});
    at::Tensor small = at::cat({l1, active});
    RETURN_IF_ERROR(AllReduce(part));
    RETURN_IF_ERROR(AllReduce(small));
    at::Tensor e = (part + bdec_.unsqueeze(0) - xn).view({len, M_, d_});
    at::Tensor e2 = e.pow(2).sum(2);
    if (o_.arch == Architecture::kReluL1) {
      loss += e2.sum().item<double>() + o_.l1_coeff * small[0].item<double>();
    } else if (o_.batch_top_k_loss == "l2") {
      loss += e2.sqrt().sum().item<double>() / static_cast<double>(M_);
    } else {
      loss += e2.sum().item<double>() / static_cast<double>(M_);
    }
    nnz += small[1].item<double>();
    at::Tensor xv = xn.view({len, M_, d_});
    at::Tensor e2m = e2.sum(0).to(at::kDouble),
               x2m = xv.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
    for (int64_t m = 0; m < M_; ++m) {
      err2[m] += e2m[m].item<double>();
      x2[m] += x2m[m].item<double>();
    }
    xsum += xv.sum(0).to(at::kDouble);
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

// RunTraining's checkpoint format with the shards gathered: loadable by sharded runs of any world
// size and by unsharded runs.
absl::Status ShardedTrainer::SaveCheckpoint(int64_t steps_done) {
  ASSIGN_OR_RETURN(Crosscoder model, GatherModel());
  // Adam state and counters in RunTraining's flat layout [enc | dec | b_enc | b_dec].
  const int64_t fmd = Fl_ * Md_;
  std::vector<at::Tensor> state;
  for (const at::Tensor& buf : {adam_m_, adam_v_}) {
    ASSIGN_OR_RETURN(at::Tensor enc, GatherRows(buf.narrow(0, 0, fmd).view({Fl_, Md_})));
    ASSIGN_OR_RETURN(at::Tensor dec, GatherRows(buf.narrow(0, fmd, fmd).view({Fl_, Md_})));
    ASSIGN_OR_RETURN(at::Tensor benc, GatherRows(buf.narrow(0, 2 * fmd, Fl_)));
    state.push_back(
        at::cat({enc.reshape({-1}), dec.reshape({-1}), benc, buf.narrow(0, 2 * fmd + Fl_, Md_)}));
  }
  ASSIGN_OR_RETURN(at::Tensor fired, GatherRows(since_fired_));
  if (rank_ != 0) return absl::OkStatus();
  const std::string final_dir = o_.out_dir + "/" + kCheckpointDir;
  const std::string tmp = final_dir + ".tmp", old = final_dir + ".old";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  RETURN_IF_ERROR(model.Save(tmp));
  tensor_io::SafetensorsWriter writer;
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg", state[0]));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg_sq", state[1]));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "tokens_since_fired", fired));
  RETURN_IF_ERROR(writer.Write(tmp + "/" + kStateTensors));
  json hist = json::array();
  for (const auto& r : history_) hist.push_back(RecordJson(r));
  json st = {{"format", "crossdiff.trainer_state"},
             {"version", 1},
             {"step", steps_done},
             {"batch_size", o_.batch_size},
             {"seed", o_.seed},
             {"rng", {{"kind", "splitmix64-counter"}, {"seed", o_.seed}}},
             {"data_cursor",
              {{"stream_position", steps_done * o_.batch_size}, {"train_rows", train_rows_}}},
             {"threshold", threshold_},
             {"world_size", world_},
             {"sharding", "latent"},
             {"history", hist}};
  RETURN_IF_ERROR(WriteText(tmp + "/" + kStateJson, st.dump(1) + "\n"));
  fs::remove_all(old, ec);
  if (fs::exists(final_dir)) fs::rename(final_dir, old, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat(final_dir, ": cannot install checkpoint: ", ec.message()));
  fs::remove_all(old, ec);
  return absl::OkStatus();
}

// Resumes from DIR/checkpoint written by a sharded run of any world size or by RunTraining: every
// rank loads the full checkpoint and keeps its slice.
absl::StatusOr<bool> ShardedTrainer::TryResume() {
  const std::string dir = o_.out_dir + "/" + kCheckpointDir;
  if (!o_.resume || !fs::exists(dir + "/" + kStateJson)) return false;
  ASSIGN_OR_RETURN(CrosscoderConfig saved, LoadCrosscoderConfig(dir));
  RETURN_IF_ERROR(config_.CheckCompatible(saved, absl::StrCat("cannot resume from ", dir)));
  ASSIGN_OR_RETURN(json st, ReadJson(dir + "/" + kStateJson));
  if (st.value("batch_size", int64_t{-1}) != o_.batch_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot resume from ", dir, ": batch_size is ",
                     st.value("batch_size", int64_t{-1}), " but this run has ", o_.batch_size));
  }
  if (st.value("seed", uint64_t{0}) != o_.seed) {
    return absl::FailedPreconditionError(absl::StrCat("cannot resume from ", dir, ": seed is ",
                                                      st.value("seed", uint64_t{0}),
                                                      " but this run has ", o_.seed));
  }
  ASSIGN_OR_RETURN(Crosscoder model, Crosscoder::Load(dir));
  enc_.copy_(model.encoder_matrix().narrow(0, shard_.begin, Fl_));
  dec_.copy_(model.decoder_matrix().narrow(0, shard_.begin, Fl_));
  benc_.copy_(model.b_enc().narrow(0, shard_.begin, Fl_));
  bdec_.copy_(model.b_dec().reshape({Md_}));
  mean_ = model.activation_mean().defined() ? model.activation_mean().clone() : at::Tensor();
  scale_ = model.activation_scale().clone();
  ASSIGN_OR_RETURN(auto file, tensor_io::SafetensorsFile::Open(dir + "/" + kStateTensors));
  ASSIGN_OR_RETURN(at::Tensor m, tensor_io::LoadTensor(*file, "adam.exp_avg"));
  ASSIGN_OR_RETURN(at::Tensor v, tensor_io::LoadTensor(*file, "adam.exp_avg_sq"));
  ASSIGN_OR_RETURN(at::Tensor fired, tensor_io::LoadTensor(*file, "tokens_since_fired"));
  const int64_t full = Crosscoder::NumParameters(config_);
  if (m.numel() != full || v.numel() != full || fired.numel() != F_ ||
      m.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat ||
      fired.scalar_type() != at::kLong) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, "/", kStateTensors, ": optimiser state does not match the model's size"));
  }
  const int64_t FMd = F_ * Md_, fmd = Fl_ * Md_, b0 = shard_.begin;
  for (auto [src, dst] : {std::pair<at::Tensor, at::Tensor>{m, adam_m_}, {v, adam_v_}}) {
    dst.narrow(0, 0, fmd).copy_(src.narrow(0, b0 * Md_, fmd));
    dst.narrow(0, fmd, fmd).copy_(src.narrow(0, FMd + b0 * Md_, fmd));
    dst.narrow(0, 2 * fmd, Fl_).copy_(src.narrow(0, 2 * FMd + b0, Fl_));
    dst.narrow(0, 2 * fmd + Fl_, Md_).copy_(src.narrow(0, 2 * FMd + F_, Md_));
  }
  since_fired_.copy_(fired.narrow(0, b0, Fl_));
  start_step_ = st.value("step", int64_t{0});
  threshold_ = st.value("threshold", -1.0f);
  history_.clear();
  for (const auto& r : st.value("history", json::array())) history_.push_back(RecordFromJson(r));
  return true;
}

absl::Status ShardedTrainer::WriteOutputs(const Crosscoder& model, const TrainResult& r) {
  RETURN_IF_ERROR(model.Save(o_.out_dir));
  json fvu_named = json::object();
  const auto& names = model.config().models;
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
            {"sharding", "latent"},
            {"latents_per_rank", Fl_},
            {"threads", at::get_num_threads()},
            {"history", hist}};
  return WriteText(o_.out_dir + "/train_metrics.json", j.dump(2) + "\n");
}

absl::StatusOr<TrainResult> ShardedTrainer::Run() {
  RETURN_IF_ERROR(Validate());
  if (rank_ == 0) {
    std::error_code ec;
    fs::create_directories(o_.out_dir, ec);
    if (ec)
      return absl::PermissionDeniedError(
          absl::StrCat(o_.out_dir, ": cannot create: ", ec.message()));
  }
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t n = 2 * Fl_ * Md_ + Fl_ + Md_;
  params_ = at::zeros({n}, f32);
  grads_ = at::zeros({n}, f32);
  adam_m_ = at::zeros({n}, f32);
  adam_v_ = at::zeros({n}, f32);
  enc_ = params_.narrow(0, 0, Fl_ * Md_).view({Fl_, Md_});
  dec_ = params_.narrow(0, Fl_ * Md_, Fl_ * Md_).view({Fl_, Md_});
  benc_ = params_.narrow(0, 2 * Fl_ * Md_, Fl_);
  bdec_ = params_.narrow(0, 2 * Fl_ * Md_ + Fl_, Md_);
  x_ = at::empty({B_, Md_}, f32);
  partial_ = at::empty({B_, Md_}, f32);
  since_fired_ = at::zeros({Fl_}, at::TensorOptions().dtype(at::kLong));
  BatchStreamOptions so;
  so.train_rows = train_rows_;
  so.global_batch = B_;
  so.rank = 0;  // every rank reads the whole global batch
  so.world_size = 1;
  so.seed = o_.seed;
  so.buffer_rows = std::max<int64_t>(1024, o_.shuffle_buffer_rows);
  ASSIGN_OR_RETURN(stream_, rows_.CreateBatchStream(so));
  ASSIGN_OR_RETURN(bool resumed, TryResume());
  if (!resumed) {
    InitializeShard();
    RETURN_IF_ERROR(EstimateNormalization());
  }

  ProgressMeter meter("train", "steps", o_.steps, nullptr, 1.0);
  if (progress_) meter.set_callback(progress_);
  const int64_t timing_warmup =
      std::min<int64_t>(10, std::max<int64_t>(1, (o_.steps - start_step_) / 10));
  StepSums window;
  window.Reset(M_, Md_);
  int64_t window_steps = 0;
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
      // Loss and error sums are already global (every rank saw the whole batch); only the number
      // of active latents is per shard.
      at::Tensor nnz = at::tensor({window.nnz}, at::TensorOptions().dtype(at::kDouble));
      RETURN_IF_ERROR(AllReduce(nnz));
      MetricsRecord rec;
      rec.step = step + 1;
      rec.loss = window.loss / window_steps;
      rec.aux_loss = window.aux_loss / window_steps;
      rec.l0 = nnz.item<double>() / (static_cast<double>(B_) * window_steps);
      rec.fvu.resize(M_);
      for (int64_t m = 0; m < M_; ++m) {
        double s2 = 0;
        for (int64_t j = 0; j < d_; ++j) s2 += window.xsum[m * d_ + j] * window.xsum[m * d_ + j];
        const double var = window.x2[m] - s2 / static_cast<double>(B_);
        rec.fvu[m] = var > 0 ? window.err2[m] / var : 0;
      }
      rec.lr = LearningRate(step);
      ASSIGN_OR_RETURN(rec.dead_latents, DeadLatents());
      rec.tokens_per_second = tps;
      last_loss_ = rec.loss;
      if (val_rows_ > 0) {
        double l0 = 0;
        RETURN_IF_ERROR(GuardTorch("validation", [&]() { return Evaluate(&rec, &l0); }));
      }
      history_.push_back(rec);
      window.Reset(M_, Md_);
      window_steps = 0;
    }
    if (o_.checkpoint_every > 0 && (step + 1) % o_.checkpoint_every == 0 && step + 1 < o_.steps) {
      RETURN_IF_ERROR(SaveCheckpoint(step + 1));
    }
    meter.Update(step + 1, absl::StrFormat("loss %.4g  %.0f tok/s", last_loss_, tps));
  }
  result.steps = stop;
  result.tokens_per_second = timed_seconds_ > 0 ? timed_tokens_ / timed_seconds_ : 0;
  result.threshold = threshold_;
  ASSIGN_OR_RETURN(result.dead_latents, DeadLatents());
  result.final_loss = last_loss_;
  result.history = history_;
  if (stop < o_.steps) {
    RETURN_IF_ERROR(SaveCheckpoint(stop));
    result.interrupted = true;
    meter.Finish(stop, "interrupted (checkpoint written)");
    return result;
  }
  MetricsRecord fin;
  double l0 = 0;
  RETURN_IF_ERROR(GuardTorch("final evaluation", [&]() { return Evaluate(&fin, &l0); }));
  result.fvu = fin.val_fvu;
  result.l0 = l0;
  ASSIGN_OR_RETURN(Crosscoder model, GatherModel());
  if (rank_ == 0) RETURN_IF_ERROR(WriteOutputs(model, result));
  if (o_.checkpoint_every > 0) RETURN_IF_ERROR(SaveCheckpoint(stop));
  meter.Finish(stop,
               absl::StrFormat("loss %.4g  %.0f tok/s", last_loss_, result.tokens_per_second));
  return result;
}

}  // namespace

LatentShard LatentShardOf(int64_t dict_size, int rank, int world) {
  LatentShard s;
  s.begin = dict_size * rank / world;
  s.count = dict_size * (rank + 1) / world - s.begin;
  return s;
}

absl::StatusOr<TrainResult> RunShardedTrainingOnRows(const TrainOptions& options,
                                                     const RowProvider& rows,
                                                     comm::Communicator* comm,
                                                     ProgressMeter::Callback progress) {
  ShardedTrainer trainer(options, rows, comm, std::move(progress));
  return GuardTorch("latent-sharded crosscoder training", [&]() { return trainer.Run(); });
}

absl::StatusOr<TrainResult> RunShardedTraining(const TrainOptions& options,
                                               comm::Communicator* comm,
                                               ProgressMeter::Callback progress) {
  if (options.store_dir.empty()) {
    return absl::InvalidArgumentError("store_dir (--activations) is required");
  }
  ASSIGN_OR_RETURN(auto rows, OpenStoreRowProvider(options.store_dir));
  return RunShardedTrainingOnRows(options, *rows, comm, std::move(progress));
}

}  // namespace crossdiff::crosscoder
