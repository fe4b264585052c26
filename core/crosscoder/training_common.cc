#include "core/crosscoder/training_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/common/compute_threads.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::crosscoder::internal {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::vector<double> NumbersOf(const json& j, const char* key) {
  std::vector<double> v;
  if (!j.contains(key) || !j[key].is_array()) return v;
  for (const auto& x : j[key]) v.push_back(x.is_number() ? x.get<double>() : std::nan(""));
  return v;
}

}  // namespace

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

double NumberOr(const json& j, const char* key, double def) {
  if (!j.contains(key)) return def;
  return j[key].is_number() ? j[key].get<double>() : std::nan("");
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

void AccumulateStats(const at::Tensor& x, const at::Tensor& e2, int64_t rows, int64_t M, int64_t d,
                     StepSums* sums) {
  at::Tensor xv = x.view({rows, M, d});
  at::Tensor e2m = e2.sum(0).to(at::kDouble),
             x2m = xv.pow(2).sum(at::IntArrayRef{0, 2}).to(at::kDouble);
  at::Tensor xs = xv.sum(0).to(at::kDouble).contiguous();  // [M, d]
  for (int64_t m = 0; m < M; ++m) {
    sums->err2[m] += e2m[m].item<double>();
    sums->x2[m] += x2m[m].item<double>();
  }
  sums->xsum.assign(xs.data_ptr<double>(), xs.data_ptr<double>() + M * d);  // squared later
}

std::vector<double> FvuFromSums(const double* err2, const double* x2, const double* xsum, int64_t M,
                                int64_t d, int64_t batch) {
  std::vector<double> fvu(M);
  for (int64_t m = 0; m < M; ++m) {
    double s2 = 0;
    for (int64_t j = 0; j < d; ++j) s2 += xsum[m * d + j] * xsum[m * d + j];
    const double var = x2[m] - s2 / static_cast<double>(batch);
    fvu[m] = var > 0 ? err2[m] / var : 0;
  }
  return fvu;
}

void FinishEvaluation(const std::vector<double>& err2, const std::vector<double>& x2,
                      const at::Tensor& xsum, double loss, double nnz, int64_t n,
                      MetricsRecord* rec, double* l0_out) {
  const int64_t M = static_cast<int64_t>(err2.size());
  rec->val_fvu.assign(M, 0);
  for (int64_t m = 0; m < M; ++m) {
    const double var = x2[m] - xsum[m].pow(2).sum().item<double>() / static_cast<double>(n);
    rec->val_fvu[m] = var > 0 ? err2[m] / var : 0;
  }
  rec->val_loss = loss / static_cast<double>(n);
  *l0_out = nnz / static_cast<double>(n);
}

std::vector<int32_t> DeadLatentList(const TrainOptions& o, const at::Tensor& since_fired,
                                    int64_t n) {
  std::vector<int32_t> dead;
  if (o.auxk_alpha > 0) {
    const int64_t* sf = since_fired.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (sf[i] >= o.dead_tokens_threshold) dead.push_back(static_cast<int32_t>(i));
    }
  }
  return dead;
}

at::Tensor BatchTopKLoss(const TrainOptions& o, const at::Tensor& e2, int64_t global_batch,
                         int64_t M, double* loss) {
  const double bm = static_cast<double>(global_batch * M);
  const bool l2 = o.batch_top_k_loss == "l2";
  at::Tensor e = e2.contiguous();
  at::Tensor row_scale = at::empty_like(e);
  const float* ep = e.data_ptr<float>();
  float* rp = row_scale.data_ptr<float>();
  double sum = 0;
  for (int64_t i = 0; i < e.numel(); ++i) {
    sum += kernels::LossTerm(l2, ep[i]);
    rp[i] = kernels::LossRowScale(l2, ep[i], bm);
  }
  *loss += sum / bm;
  return row_scale;
}

void BatchTopKBackward(const kernels::SparseCodes& codes, const kernels::SparseCodes* aux_codes,
                       const at::Tensor& x, at::Tensor& err, const at::Tensor& row_scale,
                       const float* gaux, const at::Tensor& dec, int64_t n, int64_t M, int64_t d,
                       kernels::LatentEntries* entries, at::Tensor& grads,
                       std::vector<double>* latent_sq) {
  ScaleToOutputGradient(err, row_scale, M, d);
  BatchTopKGradients(codes, aux_codes, x.data_ptr<float>(), err.data_ptr<float>(), gaux, dec, n, M,
                     d, entries, grads, latent_sq);
  at::Tensor g_bdec = grads.narrow(0, 2 * n * M * d + n, M * d);
  at::sum_out(g_bdec, err, {0});
}

void ScaleToOutputGradient(at::Tensor& err, const at::Tensor& row_scale, int64_t M, int64_t d) {
  err.view({err.size(0), M, d}).mul_(row_scale.to(at::kFloat).unsqueeze(2));
}

void BatchTopKGradients(const kernels::SparseCodes& codes, const kernels::SparseCodes* aux_codes,
                        const float* x, const float* gmain, const float* gaux,
                        const at::Tensor& dec, int64_t n, int64_t M, int64_t d,
                        kernels::LatentEntries* entries, at::Tensor& grads,
                        std::vector<double>* latent_sq, kernels::RowMap x_rows) {
  const int64_t Md = M * d, fmd = n * Md;
  float* g = grads.data_ptr<float>();
  kernels::BuildLatentEntries(codes, aux_codes, n, entries);
  if (latent_sq != nullptr) latent_sq->resize(n);
  kernels::SparseBackward(*entries, x, gmain, gaux, dec.data_ptr<float>(), n, Md, g, g + fmd,
                          g + 2 * fmd, latent_sq != nullptr ? latent_sq->data() : nullptr, x_rows);
}

at::Tensor FiredCounts(const kernels::SparseCodes& codes, int64_t n) {
  at::Tensor fired = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* fp = fired.data_ptr<int64_t>();
  for (int64_t e = 0; e < codes.nnz(); ++e) ++fp[codes.latent[e]];
  return fired;
}

absl::StatusOr<at::Tensor> ReluL1Backward(const at::Tensor& x, const at::Tensor& f, at::Tensor& err,
                                          const at::Tensor& dec, const at::Tensor& nrm,
                                          const at::Tensor& w, double lambda, double inv_b,
                                          int64_t M, int64_t d, at::Tensor& grads, StepSums* sums,
                                          const GradientReady& ready, int64_t block_latents) {
  const int64_t n = f.size(1), Md = M * d;
  at::Tensor active = f > 0;
  sums->nnz += static_cast<double>(active.sum().item<int64_t>());
  err.mul_(2.0 * inv_b);  // dL/dxhat
  const int64_t fmd = n * Md;
  at::Tensor g_enc = grads.narrow(0, 0, fmd).view({n, Md});
  at::Tensor g_dec = grads.narrow(0, fmd, fmd).view({n, Md});
  at::Tensor g_benc = grads.narrow(0, 2 * fmd, n);
  at::Tensor g_bdec = grads.narrow(0, 2 * fmd + n, Md);
  const int64_t block = ready && block_latents > 0 ? std::min(block_latents, n) : n;
  auto hand_over = [&](int64_t offset, int64_t count) {
    return ready ? ready(offset, count) : absl::OkStatus();
  };
  // d/d dec of lambda/B * sum_b sum_i f_bi sum_m ||dec_m[i]||, beside the reconstruction's term.
  at::Tensor l1_scale =  // [n, M]
      nrm.clamp_min(1e-12).reciprocal().mul_((f.sum(0) * (lambda * inv_b)).unsqueeze(1));
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t nb = std::min(block, n - i0);
    at::Tensor g = g_dec.narrow(0, i0, nb);
    at::mm_out(g, f.narrow(1, i0, nb).t(), err);
    g.view({nb, M, d})
        .add_(dec.narrow(0, i0, nb).view({nb, M, d}) * l1_scale.narrow(0, i0, nb).unsqueeze(2));
    RETURN_IF_ERROR(hand_over(fmd + i0 * Md, nb * Md));
  }
  at::sum_out(g_bdec, err, {0});
  RETURN_IF_ERROR(hand_over(2 * fmd + n, Md));
  at::Tensor gpre = at::mm(err, dec.t()).add_(w.unsqueeze(0), lambda * inv_b).mul_(active);
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t nb = std::min(block, n - i0);
    at::Tensor g = g_enc.narrow(0, i0, nb);
    at::mm_out(g, gpre.narrow(1, i0, nb).t(), x);
    RETURN_IF_ERROR(hand_over(i0 * Md, nb * Md));
  }
  at::sum_out(g_benc, gpre, {0});
  RETURN_IF_ERROR(hand_over(2 * fmd, n));
  return active;
}

absl::Status ValidateShape(const TrainOptions& o, const RowProvider& rows, TrainingShape* shape) {
  if (o.out_dir.empty()) return absl::InvalidArgumentError("out_dir (--out) is required");
  shape->M = rows.num_models();
  shape->d = rows.d_model();
  shape->Md = shape->M * shape->d;
  shape->src = o.store_dir.empty() ? std::string("the training rows") : o.store_dir;
  const std::string& src = shape->src;
  if (rows.rows() <= 0)
    return absl::InvalidArgumentError(absl::StrCat(src, ": the store holds no rows"));
  if (shape->M < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": the store holds ", shape->M,
                     " model; a crosscoder needs at least 2 (base and fine-tune)"));
  }
  if (shape->d <= 0)
    return absl::InvalidArgumentError(absl::StrCat(src, ": d_model must be positive"));
  shape->F = o.dict_size == 0 ? 8 * shape->d : o.dict_size;
  if (shape->F < 1 || shape->F > kMaxDictSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict_size must be in [1, ", kMaxDictSize, "], got ", shape->F));
  }
  return absl::OkStatus();
}

absl::Status ValidateArchitectureAndSteps(const TrainOptions& o, int64_t F) {
  if (o.arch == Architecture::kBatchTopK) {
    if (o.k < 1 || o.k > F) {
      return absl::InvalidArgumentError(
          absl::StrCat("k must be in [1, dict_size=", F, "], got ", o.k));
    }
    if (o.k_initial < 0 || o.k_initial > F) {
      return absl::InvalidArgumentError(
          absl::StrCat("k_initial must be in [0, dict_size=", F, "]"));
    }
    if (o.batch_top_k_loss != "l2" && o.batch_top_k_loss != "squared") {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch_top_k_loss must be 'l2' or 'squared', got '", o.batch_top_k_loss, "'"));
    }
  }
  if (o.steps < 1)
    return absl::InvalidArgumentError(absl::StrCat("steps must be positive, got ", o.steps));
  if (o.gradient_bucket_floats < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gradient_bucket_floats must be positive, got ", o.gradient_bucket_floats));
  }
  if (o.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size must be positive, got ", o.batch_size));
  }
  return absl::OkStatus();
}

absl::Status ValidateRatesSplitAndDefaults(TrainOptions& o, const RowProvider& rows,
                                           const TrainingShape& shape, int64_t* train_rows,
                                           int64_t* val_rows) {
  if (o.lr < 0 || !std::isfinite(o.lr))
    return absl::InvalidArgumentError("lr must be finite and >= 0");
  if (o.val_fraction < 0 || o.val_fraction > 0.5) {
    return absl::InvalidArgumentError(
        absl::StrCat("val_fraction must be in [0, 0.5], got ", o.val_fraction));
  }
  if (o.l1_coeff < 0) return absl::InvalidArgumentError("l1_coeff must be >= 0");
  if (o.dead_tokens_threshold < 1)
    return absl::InvalidArgumentError("dead_tokens_threshold must be positive");
  *val_rows = static_cast<int64_t>(std::floor(o.val_fraction * static_cast<double>(rows.rows())));
  if (o.val_fraction > 0 && *val_rows == 0 && rows.rows() > 1) *val_rows = 1;
  *train_rows = rows.rows() - *val_rows;
  if (*train_rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(shape.src, ": no training rows left after the split"));
  }
  SetComputeThreads(static_cast<int>(o.threads));
  const int64_t F = shape.F;
  if (o.lr == 0) o.lr = std::min(1e-3, 2e-4 / std::sqrt(static_cast<double>(F) / 16384.0));
  if (o.warmup_steps < 0) o.warmup_steps = std::min<int64_t>(1000, o.steps / 20);
  if (o.threshold_start_step < 0) o.threshold_start_step = std::min<int64_t>(1000, o.steps / 10);
  if (o.threshold_beta <= 0 || o.threshold_beta >= 1) {
    const double span = static_cast<double>(std::max<int64_t>(1, o.steps - o.threshold_start_step));
    o.threshold_beta = std::clamp(1.0 - 20.0 / span, 0.9, 0.999);
  }
  if (o.auxk_k <= 0) o.auxk_k = std::max<int64_t>(1, shape.Md / 2);
  o.auxk_k = std::min(o.auxk_k, F);
  if (o.metrics_every <= 0) o.metrics_every = o.steps;
  return absl::OkStatus();
}

CrosscoderConfig TrainingConfig(const TrainOptions& o, const RowProvider& rows,
                                const TrainingShape& shape, const char* sharding) {
  CrosscoderConfig cfg;
  cfg.architecture = o.arch;
  cfg.activation_dim = shape.d;
  cfg.dict_size = shape.F;
  cfg.num_models = shape.M;
  cfg.k = o.arch == Architecture::kBatchTopK ? o.k : 0;
  cfg.models = rows.models();
  if (!cfg.models.empty() && static_cast<int64_t>(cfg.models.size()) != shape.M) {
    cfg.models.clear();
  }
  cfg.layer = rows.layer();
  json extra =
      json::parse(o.extra_config_json.empty() ? "{}" : o.extra_config_json, nullptr, false);
  if (!extra.is_object()) extra = json::object();
  extra["training"] = {{"store", o.store_dir},
                       {"steps", o.steps},
                       {"batch_size", o.batch_size},
                       {"lr", o.lr},
                       {"seed", o.seed},
                       {"warmup_steps", o.warmup_steps},
                       {"lr_decay_start", o.lr_decay_start},
                       {"grad_clip", o.grad_clip},
                       {"l1_coeff", o.l1_coeff},
                       {"auxk_alpha", o.auxk_alpha},
                       {"auxk_k", o.auxk_k},
                       {"dead_tokens_threshold", o.dead_tokens_threshold},
                       {"batch_top_k_loss", o.batch_top_k_loss},
                       {"decoder_init_norm", o.decoder_init_norm},
                       {"val_fraction", o.val_fraction}};
  if (sharding != nullptr) extra["training"]["sharding"] = sharding;
  cfg.extra_json = extra.dump();
  return cfg;
}

double LearningRate(const TrainOptions& o, int64_t step) {
  double lr = o.lr;
  if (o.warmup_steps > 0 && step < o.warmup_steps)
    lr *= static_cast<double>(step + 1) / o.warmup_steps;
  if (o.lr_decay_start < 1) {
    const int64_t decay_start =
        static_cast<int64_t>(o.lr_decay_start * static_cast<double>(o.steps));
    if (step >= decay_start && o.steps > decay_start) {
      lr *= static_cast<double>(o.steps - step) / static_cast<double>(o.steps - decay_start);
    }
  }
  return lr;
}

double L1Coefficient(const TrainOptions& o, int64_t step) {
  const double warm = o.l1_warmup_fraction * static_cast<double>(o.steps);
  if (warm <= 0) return o.l1_coeff;
  return o.l1_coeff * std::min(1.0, static_cast<double>(step + 1) / warm);
}

at::Tensor PerModelSquaredError(const at::Tensor& err, int64_t M, int64_t d) {
  at::Tensor e = err.contiguous();
  at::Tensor out = at::empty({e.size(0), M}, e.options());
  kernels::SegmentSquaredNorms(e.data_ptr<float>(), e.size(0) * M, d, out.data_ptr<float>());
  return out;
}

int64_t PreActivationChunkRows(int64_t buffer_floats, int64_t dict_size, int64_t rows) {
  if (rows * dict_size <= buffer_floats) return rows;
  return std::max<int64_t>(32, buffer_floats / dict_size / 32 * 32);
}

int64_t KAt(const TrainOptions& o, int64_t step) {
  if (o.k_initial <= 0 || o.k_anneal_steps <= 0 || step >= o.k_anneal_steps) return o.k;
  const double t = static_cast<double>(step) / static_cast<double>(o.k_anneal_steps);
  return std::max<int64_t>(1, std::llround(o.k_initial + (o.k - o.k_initial) * t));
}

float NextThreshold(const TrainOptions& o, int64_t step, float threshold,
                    const kernels::Selection& sel) {
  if (step < o.threshold_start_step || sel.keep_all_positive) return threshold;
  return threshold < 0 ? sel.threshold
                       : static_cast<float>(o.threshold_beta * threshold +
                                            (1 - o.threshold_beta) * sel.threshold);
}

absl::Status ClipAndAdamStep(const TrainOptions& o, int64_t step,
                             const std::function<absl::StatusOr<double>()>& grad_norm,
                             at::Tensor& params, at::Tensor& grads, at::Tensor& adam_m,
                             at::Tensor& adam_v) {
  double scale = 1.0;
  if (o.grad_clip > 0) {
    ASSIGN_OR_RETURN(double norm, grad_norm());
    if (!std::isfinite(norm)) {
      return absl::InternalError(
          absl::StrCat("non-finite gradient at step ", step, " (lower --lr?)"));
    }
    scale = std::min(1.0, o.grad_clip / (norm + 1e-6));
  }
  kernels::AdamUpdate(params.data_ptr<float>(), grads.data_ptr<float>(), adam_m.data_ptr<float>(),
                      adam_v.data_ptr<float>(), params.numel(), LearningRate(o, step), o.adam_beta1,
                      o.adam_beta2, o.adam_eps, scale, step + 1);
  return absl::OkStatus();
}

absl::StatusOr<TrainResult> RunStepLoop(const TrainOptions& o, int64_t start_step,
                                        int64_t global_batch, ProgressMeter* meter,
                                        const StepLoopHooks& hooks, double* last_loss,
                                        std::vector<MetricsRecord>* history) {
  const int64_t B = global_batch;
  const int64_t timing_warmup =
      std::min<int64_t>(10, std::max<int64_t>(1, (o.steps - start_step) / 10));
  double timed_seconds = 0;
  int64_t timed_tokens = 0;
  int64_t window_steps = 0;
  const int64_t stop = StopStep(o);
  for (int64_t step = start_step; step < stop; ++step) {
    const bool metrics_point = (step + 1) % o.metrics_every == 0 || step + 1 == o.steps;
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(GuardTorch(absl::StrCat("training step ", step),
                               [&]() -> absl::Status { return hooks.step(step, metrics_point); }));
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++window_steps;
    if (step - start_step >= timing_warmup) {
      timed_seconds += dt;
      timed_tokens += B;
    }
    const double tps = timed_seconds > 0 ? timed_tokens / timed_seconds : B / std::max(dt, 1e-9);
    if (metrics_point) {
      ASSIGN_OR_RETURN(MetricsRecord rec, hooks.window_record(step, window_steps));
      rec.lr = LearningRate(o, step);
      ASSIGN_OR_RETURN(rec.dead_latents, hooks.dead_latents());
      rec.tokens_per_second = tps;
      *last_loss = rec.loss;
      if (hooks.validate) {
        RETURN_IF_ERROR(GuardTorch("validation", [&]() { return hooks.validate(&rec); }));
      }
      history->push_back(rec);
      window_steps = 0;
    }
    if (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 && step + 1 < o.steps) {
      RETURN_IF_ERROR(hooks.checkpoint(step + 1));
    }
    meter->Update(step + 1, hooks.progress_text(tps));
  }
  TrainResult r;
  r.batch_size = B;
  r.steps = stop;
  r.tokens_per_second = timed_seconds > 0 ? timed_tokens / timed_seconds : 0;
  r.final_loss = *last_loss;
  r.history = *history;
  return r;
}

StepObservation Observation(int64_t step, const at::Tensor& params, const at::Tensor& grads,
                            const at::Tensor& x, const at::Tensor& tokens_since_fired) {
  StepObservation obs;
  obs.step = step;
  obs.params = params;
  obs.grads = grads;
  obs.x = x;
  obs.tokens_since_fired = tokens_since_fired;
  return obs;
}

absl::StatusOr<Normalization> EstimateNormalization(const TrainOptions& o, const RowProvider& rows,
                                                    int64_t train_rows, int64_t M, int64_t d) {
  constexpr int64_t kChunk = 1024;  // small chunks: the pass must not raise the resident peak
  const int64_t sample = std::min(train_rows, std::max<int64_t>(1, o.normalization_rows));
  const int64_t n_chunks = (sample + kChunk - 1) / kChunk;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t len = std::min(kChunk, sample - c * kChunk);
    // Evenly spread over the training rows (contiguous from row 0 when the sample is all of them).
    const int64_t begin = n_chunks == 1 ? 0 : (train_rows - len) * c / (n_chunks - 1);
    ranges.emplace_back(begin, len);
  }
  at::Tensor sum = at::zeros({M, d}, at::TensorOptions().dtype(at::kDouble));
  int64_t count = 0;
  for (auto [begin, len] : ranges) {
    ASSIGN_OR_RETURN(at::Tensor part, rows.Read(begin, begin + len));
    RETURN_IF_ERROR(CheckFinite(rows, part, begin));
    sum += part.sum(0, false, at::kDouble);
    count += len;
  }
  at::Tensor data_mean = sum / static_cast<double>(count);
  at::Tensor mean = o.center ? data_mean : at::zeros({M, d}, sum.options());
  at::Tensor mean_f = mean.to(at::kFloat).unsqueeze(0);
  at::Tensor norm_sum = at::zeros({M}, sum.options());
  for (auto [begin, len] : ranges) {
    ASSIGN_OR_RETURN(at::Tensor part, rows.Read(begin, begin + len));
    norm_sum += (part - mean_f).norm(2, {2}).sum(0, false, at::kDouble);
  }
  at::Tensor mean_norm = norm_sum / static_cast<double>(count);
  for (int64_t m = 0; m < M; ++m) {
    if (!(mean_norm[m].item<double>() > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(o.store_dir, ": the activations of model ", m,
                                                     " are constant; they cannot be normalised"));
    }
  }
  Normalization n;
  n.scale = (std::sqrt(static_cast<double>(d)) / mean_norm).to(at::kFloat);
  n.mean = o.center ? mean.to(at::kFloat) : at::Tensor();
  n.b_dec = ((data_mean - mean) * n.scale.to(at::kDouble).unsqueeze(1)).to(at::kFloat);
  return n;
}

BatchStreamOptions StreamOptions(const TrainOptions& o, int64_t train_rows, int64_t global_batch,
                                 int rank, int world) {
  BatchStreamOptions so;
  so.train_rows = train_rows;
  so.global_batch = global_batch;
  so.rank = rank;
  so.world_size = world;
  so.seed = o.seed;
  so.buffer_rows = std::max<int64_t>(1024, o.shuffle_buffer_rows);
  return so;
}

absl::Status CreateOutputDir(const TrainOptions& o, int rank) {
  if (rank != 0) return absl::OkStatus();
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(absl::StrCat(o.out_dir, ": cannot create: ", ec.message()));
  }
  return absl::OkStatus();
}

std::string CheckpointDir(const TrainOptions& o) { return o.out_dir + "/" + kCheckpointDir; }

absl::StatusOr<std::optional<json>> ReadResumeState(const TrainOptions& o,
                                                    const CrosscoderConfig& config) {
  const std::string dir = CheckpointDir(o);
  if (!o.resume || !fs::exists(dir + "/" + kStateJson)) return std::optional<json>();
  ASSIGN_OR_RETURN(CrosscoderConfig saved, LoadCrosscoderConfig(dir));
  RETURN_IF_ERROR(config.CheckCompatible(saved, absl::StrCat("cannot resume from ", dir)));
  ASSIGN_OR_RETURN(json state, ReadJson(dir + "/" + kStateJson));
  if (state.value("batch_size", int64_t{-1}) != o.batch_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot resume from ", dir, ": batch_size is ",
                     state.value("batch_size", int64_t{-1}), " but this run has ", o.batch_size));
  }
  if (state.value("seed", uint64_t{0}) != o.seed) {
    return absl::FailedPreconditionError(absl::StrCat("cannot resume from ", dir, ": seed is ",
                                                      state.value("seed", uint64_t{0}),
                                                      " but this run has ", o.seed));
  }
  return std::optional<json>(std::move(state));
}

absl::StatusOr<OptimiserState> LoadOptimiserState(const TrainOptions& o, int64_t num_params,
                                                  int64_t F) {
  const std::string dir = CheckpointDir(o);
  ASSIGN_OR_RETURN(auto file, tensor_io::SafetensorsFile::Open(dir + "/" + kStateTensors));
  OptimiserState s;
  ASSIGN_OR_RETURN(s.adam_m, tensor_io::LoadTensor(*file, "adam.exp_avg"));
  ASSIGN_OR_RETURN(s.adam_v, tensor_io::LoadTensor(*file, "adam.exp_avg_sq"));
  ASSIGN_OR_RETURN(s.tokens_since_fired, tensor_io::LoadTensor(*file, "tokens_since_fired"));
  if (s.adam_m.numel() != num_params || s.adam_v.numel() != num_params ||
      s.tokens_since_fired.numel() != F || s.adam_m.scalar_type() != at::kFloat ||
      s.adam_v.scalar_type() != at::kFloat || s.tokens_since_fired.scalar_type() != at::kLong) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, "/", kStateTensors, ": optimiser state does not match the model's size"));
  }
  return s;
}

json CheckpointState(const TrainOptions& o, int64_t steps_done, int64_t train_rows, float threshold,
                     int world, const std::vector<MetricsRecord>& history) {
  json hist = json::array();
  for (const auto& r : history) hist.push_back(RecordJson(r));
  return {
      {"format", "crossdiff.trainer_state"},
      {"version", 1},
      {"step", steps_done},
      {"batch_size", o.batch_size},
      {"seed", o.seed},
      // The data order and every other random choice derive from (seed, stream position):
      // this pair is the RNG state and the data cursor.
      {"rng", {{"kind", "splitmix64-counter"}, {"seed", o.seed}}},
      {"data_cursor", {{"stream_position", steps_done * o.batch_size}, {"train_rows", train_rows}}},
      {"threshold", threshold},
      {"world_size", world},
      {"history", hist}};
}

absl::Status InstallCheckpoint(const TrainOptions& o, const Crosscoder& model,
                               const at::Tensor& adam_m, const at::Tensor& adam_v,
                               const at::Tensor& tokens_since_fired, const json& state) {
  const std::string final_dir = CheckpointDir(o);
  const std::string tmp = final_dir + ".tmp", old = final_dir + ".old";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  RETURN_IF_ERROR(model.Save(tmp));
  tensor_io::SafetensorsWriter writer;
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg", adam_m));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "adam.exp_avg_sq", adam_v));
  RETURN_IF_ERROR(tensor_io::AddTensor(writer, "tokens_since_fired", tokens_since_fired));
  RETURN_IF_ERROR(writer.Write(tmp + "/" + kStateTensors));
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

json MetricsJson(const TrainOptions& o, const Crosscoder& model, const TrainResult& r,
                 int64_t val_rows, int64_t F, int world) {
  json fvu_named = json::object();
  const auto& names = model.config().models;
  for (size_t m = 0; m < r.fvu.size(); ++m) {
    fvu_named[m < names.size() ? names[m] : absl::StrCat("model_", m)] = r.fvu[m];
  }
  json hist = json::array();
  for (const auto& rec : r.history) hist.push_back(RecordJson(rec));
  return {{"tokens_per_second", r.tokens_per_second},
          {"steps", r.steps},
          {"batch_size", r.batch_size},
          {"final_loss", r.final_loss},
          {"fvu", r.fvu},
          {"fvu_per_model", fvu_named},
          {"fvu_split", val_rows > 0 ? "validation" : "train"},
          {"l0", r.l0},
          {"dead_latents", r.dead_latents},
          {"architecture", std::string(ArchitectureName(o.arch))},
          {"dict_size", F},
          {"k", o.arch == Architecture::kBatchTopK ? o.k : 0},
          {"threshold", r.threshold},
          {"world_size", world},
          {"threads", at::get_num_threads()},
          {"history", hist}};
}

absl::Status SaveModelAndMetrics(const TrainOptions& o, const Crosscoder& model,
                                 const json& metrics) {
  RETURN_IF_ERROR(model.Save(o.out_dir));
  return WriteText(o.out_dir + "/train_metrics.json", metrics.dump(2) + "\n");
}

kernels::AllReduceI64 HistogramAllReduce(comm::Communicator* comm) {
  return [comm](std::vector<int64_t>& h) -> absl::Status {
    if (comm == nullptr || comm->world_size() == 1) return absl::OkStatus();
    at::Tensor t = at::from_blob(h.data(), {static_cast<int64_t>(h.size())},
                                 at::TensorOptions().dtype(at::kLong));
    return comm->AllReduce(t);
  };
}

kernels::KeyExchange CandidateKeyExchange(comm::Communicator* comm, int64_t capacity) {
  kernels::KeyExchange keys;
  keys.capacity = capacity;
  keys.all_gather = [comm](const std::vector<uint32_t>& mine,
                           std::vector<uint32_t>* all) -> absl::Status {
    all->resize(mine.size() * comm->world_size());
    auto i32 = at::TensorOptions().dtype(at::kInt);
    at::Tensor in =
        at::from_blob(const_cast<uint32_t*>(mine.data()), {static_cast<int64_t>(mine.size())}, i32);
    at::Tensor out = at::from_blob(all->data(), {static_cast<int64_t>(all->size())}, i32);
    return comm->AllGather(in, out);
  };
  return keys;
}

}  // namespace crossdiff::crosscoder::internal
