#include "core/crosscoder/trainer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/crosscoder/factor_exchange.h"
#include "core/crosscoder/sparse_kernels.h"
#include "core/crosscoder/training_common.h"

namespace crossdiff::crosscoder {
namespace {

using nlohmann::json;

using internal::StepSums;

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
  // Data-parallel BatchTopK gathers every rank's factors and computes the global batch's gradients
  // and firing counts itself (factor_exchange.h): nothing of those is all-reduced.
  bool exchanges_factors() const { return distributed() && o_.arch == Architecture::kBatchTopK; }
  absl::Status AllReduce(at::Tensor& t) {
    return distributed() ? comm_->AllReduce(t) : absl::OkStatus();
  }
  absl::Status Validate();
  absl::Status EstimateNormalization();
  absl::StatusOr<bool> TryResume();
  absl::Status AllocateState();
  absl::Status Step(int64_t step, bool want_stats, StepSums* sums);
  // Reads (this rank's rows of) global batch `step` into `batch` and normalises it.
  absl::Status ReadBatch(int64_t step, at::Tensor& batch);
  // With the factor exchange: reads the next step's batch into x_next_ while the exchange runs
  // (when that step will be trained).
  absl::Status PrefetchNextBatch(int64_t step);
  absl::Status StepBatchTopK(int64_t step, bool want_stats, StepSums* sums);
  absl::Status StepReluL1(int64_t step, bool want_stats, StepSums* sums);
  // One process: the loss and gradients of the selected codes_ (and aux_codes_) with the batch x_
  // as the only batch-sized buffer (kernels::InPlaceBackward; x_ is overwritten).
  absl::Status LossAndGradientsInPlace(bool use_aux, bool want_stats, StepSums* sums);
  // The gathered factors' loss and gradients (exchanges_factors()).
  absl::Status LossAndGradientsExchanged(int64_t step, bool use_aux, bool want_stats,
                                         StepSums* sums);
  // Clips and steps Adam on gradients already summed across ranks (by the factor exchange or the
  // ReLU-L1 step's bucketed all-reduce).
  absl::Status ApplyGradients(int64_t step);
  // fired_counts: this rank's (summed across ranks), or with exchanges_factors() the global
  // batch's.
  absl::Status UpdateDeadCounters(const at::Tensor& fired_counts);
  absl::Status SaveCheckpoint(int64_t steps_done);
  absl::Status Evaluate(MetricsRecord* rec, double* l0_out);
  absl::Status WriteOutputs(const TrainResult& result);
  int64_t DeadLatents() const;

  TrainOptions o_;
  const RowProvider& rows_;
  comm::Communicator* comm_;
  ProgressMeter::Callback progress_;
  int rank_ = 0, world_ = 1;

  int64_t M_ = 0, d_ = 0, Md_ = 0, F_ = 0, B_ = 0, Bl_ = 0;
  int64_t chunk_rows_ = 0;  // BatchTopK: rows of pre-activations computed at a time
  int64_t train_rows_ = 0, val_rows_ = 0;
  Crosscoder model_;
  at::Tensor params_, grads_, adam_m_, adam_v_, workspace_;
  at::Tensor x_, xhat_, gaux_;
  at::Tensor x_global_;     // with the factor exchange: the whole global batch, x_ its rank's rows
  at::Tensor x_next_;       // with the factor exchange: the next step's batch, read during this one
  int64_t next_step_ = -1;  // the step whose batch x_next_ holds (-1: none)
  at::Tensor observed_x_;   // the batch for observe_step when the step overwrites x_
  kernels::InPlaceBackward in_place_;
  at::Tensor since_fired_;  // I64 [F]: tokens since each latent last fired
  std::unique_ptr<BatchStream> stream_;
  kernels::SparseCodes codes_, aux_codes_;
  kernels::LatentEntries entries_;
  std::vector<double> latent_sq_;      // BatchTopK: each latent's squared gradient norm this step
  internal::FactorExchange exchange_;  // data-parallel BatchTopK: every rank's factors
  int64_t start_step_ = 0;
  float threshold_ = -1;
  internal::SelectionGuess guess_;  // not checkpointed: only a hint, results do not depend on it
  std::vector<MetricsRecord> history_;
  double last_loss_ = 0;
};

absl::Status Trainer::Validate() {
  internal::TrainingShape shape;
  RETURN_IF_ERROR(internal::ValidateShape(o_, rows_, &shape));
  M_ = shape.M;
  d_ = shape.d;
  Md_ = shape.Md;
  F_ = shape.F;
  RETURN_IF_ERROR(internal::ValidateArchitectureAndSteps(o_, F_));
  B_ = o_.batch_size;
  if (B_ % world_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size ", B_, " is not divisible by the world size ", world_));
  }
  Bl_ = B_ / world_;
  RETURN_IF_ERROR(
      internal::ValidateRatesSplitAndDefaults(o_, rows_, shape, &train_rows_, &val_rows_));
  ASSIGN_OR_RETURN(model_, Crosscoder::Create(internal::TrainingConfig(o_, rows_, shape, nullptr)));
  return absl::OkStatus();
}

int64_t Trainer::DeadLatents() const {
  return (since_fired_ >= o_.dead_tokens_threshold).sum().item<int64_t>();
}

absl::Status Trainer::EstimateNormalization() {
  ASSIGN_OR_RETURN(internal::Normalization n,
                   internal::EstimateNormalization(o_, rows_, train_rows_, M_, d_));
  RETURN_IF_ERROR(model_.SetNormalization(n.mean, n.scale));
  model_.b_dec().copy_(n.b_dec);
  return absl::OkStatus();
}

absl::Status Trainer::AllocateState() {
  params_ = model_.FlattenParameters();
  const int64_t n = params_.numel();
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  adam_m_ = at::zeros({n}, f32);
  adam_v_ = at::zeros({n}, f32);
  if (o_.arch == Architecture::kBatchTopK) {
    // The pre-activations are dead once the selection is made, before the backward pass writes
    // gradients: one workspace serves both. They are computed in chunks of rows that fit in the
    // gradient buffer (at least 32 rows), so the workspace grows with the batch only while the
    // whole batch fits.
    chunk_rows_ = internal::PreActivationChunkRows(n, F_, Bl_);
    workspace_ = at::empty({std::max(n, chunk_rows_ * F_)}, f32);
    grads_ = workspace_.narrow(0, 0, n);
  } else {
    workspace_ = at::empty({Bl_ * F_}, f32);
    grads_ = at::empty({n}, f32);
  }
  if (exchanges_factors()) {
    // Every rank reads and normalises the whole global batch (the backward needs every token's x:
    // reading it costs less than sending it); x_ is this rank's rows of it. The reconstruction
    // (then dL/dxhat) and the AuxK gradient live in the factor exchange's send buffer.
    const int64_t k_max = std::max(o_.k, o_.k_initial);
    exchange_ = internal::FactorExchange(Bl_, Md_, 2 * Bl_ * k_max + 64, o_.auxk_k);
    x_global_ = at::empty({B_, Md_}, f32);
    x_next_ = at::empty({B_, Md_}, f32);
    x_ = x_global_.narrow(0, rank_ * Bl_, Bl_);
    xhat_ = exchange_.gmain();
    gaux_ = exchange_.gaux();
  } else {
    x_ = at::empty({Bl_, Md_}, f32);
    // BatchTopK's single-process step needs no reconstruction buffer (LossAndGradientsInPlace).
    if (o_.arch != Architecture::kBatchTopK) xhat_ = at::empty({Bl_, Md_}, f32);
  }
  since_fired_ = at::zeros({F_}, at::TensorOptions().dtype(at::kLong));
  const bool whole_batch = exchanges_factors();
  ASSIGN_OR_RETURN(stream_,
                   rows_.CreateBatchStream(internal::StreamOptions(
                       o_, train_rows_, B_, whole_batch ? 0 : rank_, whole_batch ? 1 : world_)));
  return absl::OkStatus();
}

absl::StatusOr<bool> Trainer::TryResume() {
  ASSIGN_OR_RETURN(std::optional<json> state, internal::ReadResumeState(o_, model_.config()));
  if (!state) return false;
  ASSIGN_OR_RETURN(Crosscoder saved_model, Crosscoder::Load(internal::CheckpointDir(o_)));
  model_.CopyFrom(saved_model);
  RETURN_IF_ERROR(
      model_.SetNormalization(saved_model.activation_mean(), saved_model.activation_scale()));
  ASSIGN_OR_RETURN(internal::OptimiserState saved,
                   internal::LoadOptimiserState(o_, adam_m_.numel(), F_));
  adam_m_.copy_(saved.adam_m);
  adam_v_.copy_(saved.adam_v);
  since_fired_.copy_(saved.tokens_since_fired);
  start_step_ = state->value("step", int64_t{0});
  threshold_ = static_cast<float>(internal::NumberOr(*state, "threshold", -1.0));
  model_.set_threshold(threshold_);
  history_.clear();
  for (const auto& r : state->value("history", json::array())) {
    history_.push_back(internal::RecordFromJson(r));
  }
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
  model_.set_threshold(threshold_);
  json state = internal::CheckpointState(o_, steps_done, train_rows_, threshold_, world_, history_);
  state["weights_checksum"] = absl::StrFormat("%016x", hash);
  return internal::InstallCheckpoint(o_, model_, adam_m_, adam_v_, since_fired_, state);
}

absl::Status Trainer::UpdateDeadCounters(const at::Tensor& fired_counts) {
  at::Tensor counts = fired_counts.to(at::kLong).contiguous();
  if (!exchanges_factors()) RETURN_IF_ERROR(AllReduce(counts));
  since_fired_.add_(B_);
  since_fired_.masked_fill_(counts > 0, 0);
  return absl::OkStatus();
}

absl::Status Trainer::ApplyGradients(int64_t step) {
  return internal::ClipAndAdamStep(
      o_, step,
      [this]() -> absl::StatusOr<double> {
        if (o_.arch != Architecture::kBatchTopK) {
          return std::sqrt(kernels::SquaredNorm(grads_.data_ptr<float>(), grads_.numel()));
        }
        // The backward summed each latent's rows while they were in cache; the decoder bias
        // remains (its Md floats are the tail of the flat gradient).
        double sq = 0;
        for (double v : latent_sq_) sq += v;
        const int64_t n = grads_.numel();
        return std::sqrt(sq + kernels::SquaredNorm(grads_.data_ptr<float>() + n - Md_, Md_));
      },
      params_, grads_, adam_m_, adam_v_);
}

absl::Status Trainer::StepBatchTopK(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t F = F_, Bl = Bl_;
  const double loss_before = sums->loss, aux_before = sums->aux_loss;
  at::Tensor enc = model_.encoder_matrix();
  at::Tensor w = model_.LatentWeights().contiguous();
  // The pre-activations, computed chunk_rows_ rows at a time into the workspace (one chunk, the
  // whole batch, unless the batch's [Bl, F] outgrows the gradient buffer).
  const auto pre = kernels::PreActivations::Chunked(
      Bl, F, chunk_rows_, workspace_.data_ptr<float>(), [&](int64_t b0, int64_t b1, float* rows) {
        at::Tensor out = at::from_blob(rows, {b1 - b0, F}, x_.options());
        at::addmm_out(out, model_.b_enc(), x_.narrow(0, b0, b1 - b0), enc.t());
      });
  kernels::AllReduceI64 reduce = internal::HistogramAllReduce(comm_);
  // AuxK on latents dead for dead_tokens_threshold tokens (before this step), gathered while the
  // selection visits the pre-activations.
  std::vector<int32_t> dead = internal::DeadLatentList(o_, since_fired_, F);
  const bool use_aux = !dead.empty();
  kernels::AuxRequest aux_request{&dead, o_.auxk_k, &aux_codes_};
  // A fraction of the previous step's threshold bounds this step's candidates (one visit of
  // `pre`); when the threshold drops further in one step the exact full selection runs instead.
  // Several ranks agree on the threshold in one all-gather of their candidates' keys (room for
  // three times a rank's share of the batch's entries; more falls back to the exact selection).
  kernels::KeyExchange keys;
  if (distributed()) keys = internal::CandidateKeyExchange(comm_, 3 * internal::KAt(o_, step) * Bl);
  ASSIGN_OR_RETURN(
      kernels::Selection sel,
      kernels::SelectAndGather(pre, w.data_ptr<float>(), internal::KAt(o_, step) * B_,
                               guess_.guess(), reduce, &codes_, use_aux ? &aux_request : nullptr,
                               distributed() ? &keys : nullptr));
  guess_.Update(sel, internal::KAt(o_, step) * B_);
  // `pre` is dead from here on (the workspace becomes the gradient).

  if (exchanges_factors()) {
    RETURN_IF_ERROR(LossAndGradientsExchanged(step, use_aux, want_stats, sums));
  } else {
    RETURN_IF_ERROR(LossAndGradientsInPlace(use_aux, want_stats, sums));
  }
  sums->nnz += static_cast<double>(codes_.nnz());
  if (o_.observe_step) {
    // The single-process step overwrote x_: its copy, when asked for (observe_batch).
    StepObservation obs = internal::Observation(
        step, params_, grads_, exchanges_factors() ? x_ : observed_x_, since_fired_);
    obs.loss = sums->loss - loss_before;
    obs.aux_loss = sums->aux_loss - aux_before;
    obs.k = internal::KAt(o_, step);
    obs.nnz = codes_.nnz();
    o_.observe_step(obs);
  }

  // Latents that fired in the main selection this step (over the global batch when the factors
  // were gathered).
  at::Tensor fired = internal::FiredCounts(exchanges_factors() ? exchange_.codes() : codes_, F);
  RETURN_IF_ERROR(ApplyGradients(step));
  RETURN_IF_ERROR(UpdateDeadCounters(fired));
  threshold_ = internal::NextThreshold(o_, step, threshold_, sel);
  return absl::OkStatus();
}

absl::Status Trainer::LossAndGradientsExchanged(int64_t step, bool use_aux, bool want_stats,
                                                StepSums* sums) {
  const int64_t F = F_, Md = Md_, Bl = Bl_;
  at::Tensor dec = model_.decoder_matrix();
  kernels::SparseDecode(codes_, dec.data_ptr<float>(), Md, model_.b_dec().data_ptr<float>(),
                        xhat_.data_ptr<float>());
  at::Tensor err = xhat_;  // becomes xhat - x, then dL/dxhat
  err.sub_(x_);
  at::Tensor e2 = internal::PerModelSquaredError(err, M_, d_);  // [Bl, M]
  at::Tensor row_scale = internal::BatchTopKLoss(o_, e2, B_, M_, &sums->loss);

  if (use_aux) {
    // Residual e = x - xhat = -err; aux loss = sum ||e - ahat||^2 / sum ||e - mean(e)||^2 (global).
    at::Tensor stats = at::cat({err.sum(0).to(at::kDouble), e2.sum().to(at::kDouble).reshape({1})});
    RETURN_IF_ERROR(AllReduce(stats));
    const double s2 = stats[Md].item<double>();
    const double s1 = stats.narrow(0, 0, Md).pow(2).sum().item<double>();
    const double denom = std::max(s2 - s1 / static_cast<double>(B_), 1e-12);
    kernels::SparseDecode(aux_codes_, dec.data_ptr<float>(), Md, nullptr, gaux_.data_ptr<float>());
    gaux_.add_(err);  // ahat - e
    sums->aux_loss += kernels::SquaredNorm(gaux_.data_ptr<float>(), gaux_.numel()) / denom;
    gaux_.mul_(2.0 * o_.auxk_alpha / denom);
  }
  if (want_stats) internal::AccumulateStats(x_, e2, Bl, M_, d_, sums);
  // Backward: gradients into the flat buffer [g_enc | g_dec | g_benc | g_bdec]. Every rank
  // computes the global batch's gradients from the whole batch's x (every rank read it) and every
  // rank's dL/dxhat, AuxK gradient and codes (err and gaux_ are the exchange's send rows).
  internal::ScaleToOutputGradient(err, row_scale, M_, d_);
  // The next batch is read while the factors travel: the all-gather mostly waits for the other
  // ranks, and the read fills that wait.
  RETURN_IF_ERROR(exchange_.Start(*comm_, codes_, use_aux, use_aux ? &aux_codes_ : nullptr));
  absl::Status prefetched = PrefetchNextBatch(step);
  RETURN_IF_ERROR(exchange_.Finish(*comm_, codes_));
  RETURN_IF_ERROR(prefetched);
  internal::BatchTopKGradients(exchange_.codes(), use_aux ? &exchange_.aux_codes() : nullptr,
                               x_global_.data_ptr<float>(), exchange_.gmain_rows(),
                               use_aux ? exchange_.gaux_rows() : nullptr, dec, F, M_, d_, &entries_,
                               grads_, &latent_sq_, exchange_.XRows());
  exchange_.SumGmain(grads_.data_ptr<float>() + 2 * F * Md + F);
  return absl::OkStatus();
}

absl::Status Trainer::LossAndGradientsInPlace(bool use_aux, bool want_stats, StepSums* sums) {
  kernels::InPlaceBackward::Problem p;
  p.main = &codes_;
  p.aux = use_aux ? &aux_codes_ : nullptr;
  p.dec = model_.decoder_matrix().data_ptr<float>();
  p.b_dec = model_.b_dec().data_ptr<float>();
  p.F = F_;
  p.M = M_;
  p.d = d_;
  p.l2_loss = o_.batch_top_k_loss == "l2";
  p.aux_alpha = o_.auxk_alpha;
  // The decoder-gradient rows are free until the encoder gradients are done: Forward keeps the
  // residual there when it fits (B <= F), which saves decoding the batch a second time.
  float* g = grads_.data_ptr<float>();
  const int64_t fmd = F_ * Md_;
  in_place_.Forward(p, x_.data_ptr<float>(), g + fmd, fmd);
  sums->loss += in_place_.loss();
  if (use_aux) sums->aux_loss += in_place_.aux_loss();
  if (want_stats) {
    at::Tensor e2 =
        at::from_blob(const_cast<float*>(in_place_.e2().data()), {Bl_, M_}, x_.options());
    internal::AccumulateStats(x_, e2, Bl_, M_, d_, sums);
  }
  if (o_.observe_step && o_.observe_batch) {
    if (!observed_x_.defined()) observed_x_ = at::empty_like(x_);
    observed_x_.copy_(x_);
  }
  latent_sq_.resize(F_);
  in_place_.Backward(x_.data_ptr<float>(), g, g + fmd, g + 2 * fmd, g + 2 * fmd + F_,
                     latent_sq_.data());
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
  const double lambda = internal::L1Coefficient(o_, step);
  const double inv_b = 1.0 / static_cast<double>(B_);
  at::Tensor e2 = internal::PerModelSquaredError(err, M_, d_);
  sums->loss +=
      e2.sum().item<double>() * inv_b + lambda * at::mv(f, w).sum().item<double>() * inv_b;
  if (want_stats) internal::AccumulateStats(x_, e2, Bl, M_, d_, sums);
  // Several ranks sum the gradients bucket by bucket, each all-reduce running while the backward
  // computes the next buckets; the step waits for all of them before it observes or clips.
  std::vector<std::unique_ptr<comm::PendingCollective>> reducing;
  internal::GradientReady ready;
  if (distributed()) {
    ready = [&](int64_t offset, int64_t count) -> absl::Status {
      at::Tensor bucket = grads_.narrow(0, offset, count);
      ASSIGN_OR_RETURN(std::unique_ptr<comm::PendingCollective> p, comm_->StartAllReduce(bucket));
      reducing.push_back(std::move(p));
      return absl::OkStatus();
    };
  }
  ASSIGN_OR_RETURN(
      at::Tensor active,
      internal::ReluL1Backward(x_, f, err, dec, nrm, w, lambda, inv_b, M_, d_, grads_, sums, ready,
                               std::max<int64_t>(1, o_.gradient_bucket_floats / Md)));
  for (auto& p : reducing) RETURN_IF_ERROR(p->Wait());
  if (o_.observe_step) {
    StepObservation obs = internal::Observation(step, params_, grads_, x_, since_fired_);
    obs.loss = sums->loss - loss_before;
    obs.l1_coeff = lambda;
    obs.nnz = active.sum().item<int64_t>();
    o_.observe_step(obs);
  }
  RETURN_IF_ERROR(ApplyGradients(step));
  RETURN_IF_ERROR(UpdateDeadCounters(active.sum(0)));
  return absl::OkStatus();
}

absl::Status Trainer::ReadBatch(int64_t step, at::Tensor& batch) {
  RETURN_IF_ERROR(stream_->Next(step, batch.data_ptr<float>()));
  at::Tensor xv = batch.view({batch.size(0), M_, d_});
  if (model_.activation_mean().defined()) xv.sub_(model_.activation_mean().unsqueeze(0));
  xv.mul_(model_.activation_scale().view({1, M_, 1}));
  return absl::OkStatus();
}

absl::Status Trainer::PrefetchNextBatch(int64_t step) {
  if (step + 1 >= internal::StopStep(o_)) return absl::OkStatus();
  RETURN_IF_ERROR(ReadBatch(step + 1, x_next_));
  next_step_ = step + 1;
  return absl::OkStatus();
}

absl::Status Trainer::Step(int64_t step, bool want_stats, StepSums* sums) {
  // This rank's slice of global batch `step`: stream positions [step*B + rank*Bl, ... + Bl) (with
  // the factor exchange, the whole batch, of which x_ is that slice).
  if (exchanges_factors() && next_step_ == step) {
    std::swap(x_global_, x_next_);
    x_ = x_global_.narrow(0, rank_ * Bl_, Bl_);
    next_step_ = -1;
  } else {
    RETURN_IF_ERROR(ReadBatch(step, exchanges_factors() ? x_global_ : x_));
  }
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
  internal::FinishEvaluation(err2, x2, xsum, loss, nnz, n, rec, l0_out);
  return absl::OkStatus();
}

absl::Status Trainer::WriteOutputs(const TrainResult& r) {
  model_.set_threshold(threshold_);
  return internal::SaveModelAndMetrics(o_, model_,
                                       internal::MetricsJson(o_, model_, r, val_rows_, F_, world_));
}

absl::StatusOr<TrainResult> Trainer::Run() {
#if defined(__GLIBC__)
  // A fixed mmap threshold keeps glibc from raising it after the first large free, which would let
  // every transient buffer (a batch, a validation chunk) stay resident in the heap for the rest of
  // the run. Large blocks are then mapped and unmapped, and resident memory tracks live buffers.
  mallopt(M_MMAP_THRESHOLD, 256 << 10);
#endif
  RETURN_IF_ERROR(Validate());
  RETURN_IF_ERROR(internal::CreateOutputDir(o_, rank_));
  RETURN_IF_ERROR(AllocateState());
  ASSIGN_OR_RETURN(bool resumed, TryResume());
  if (!resumed) {
    model_.InitializeWeights(o_.seed, o_.decoder_init_norm);
    RETURN_IF_ERROR(EstimateNormalization());
  }
#if defined(__GLIBC__)
  // The set-up's transients (the normalisation pass, the checkpoint read) leave free holes in the
  // heap below live blocks: hand their pages back before the steps start.
  malloc_trim(0);
  if (exchanges_factors()) {
    // Gloo's all-gather allocates its flat receive buffer at every call (2 x 2.6 MB per step at
    // B=2048, d=512): mapped and unmapped each step, its pages were faulted in and zeroed anew
    // every time. Kept in the heap from here on, the same block is reused.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
  }
#endif

  ProgressMeter meter("train", "steps", o_.steps, nullptr, 1.0);
  if (progress_) meter.set_callback(progress_);
  StepSums window;
  window.Reset(M_, Md_);
  internal::StepLoopHooks hooks;
  hooks.step = [&](int64_t step, bool metrics_point) { return Step(step, metrics_point, &window); };
  hooks.window_record = [&](int64_t step, int64_t window_steps) -> absl::StatusOr<MetricsRecord> {
    // Reduce the window's sums across ranks: [loss, aux, nnz, err2[M], x2[M], xsum[M*d]].
    std::vector<double> v = {window.loss, window.aux_loss, window.nnz};
    v.insert(v.end(), window.err2.begin(), window.err2.end());
    v.insert(v.end(), window.x2.begin(), window.x2.end());
    v.insert(v.end(), window.xsum.begin(), window.xsum.end());
    at::Tensor t = at::tensor(v, at::TensorOptions().dtype(at::kDouble));
    RETURN_IF_ERROR(AllReduce(t));
    const double* p = t.data_ptr<double>();
    MetricsRecord rec;
    rec.step = step + 1;
    rec.loss = p[0] / window_steps;
    rec.aux_loss = p[1] / window_steps;
    rec.l0 = p[2] / (static_cast<double>(B_) * window_steps);
    rec.fvu = internal::FvuFromSums(p + 3, p + 3 + M_, p + 3 + 2 * M_, M_, d_,
                                    B_);  // the metric point's batch
    window.Reset(M_, Md_);
    return rec;
  };
  hooks.dead_latents = [&]() -> absl::StatusOr<int64_t> { return DeadLatents(); };
  if (rank_ == 0 && val_rows_ > 0) {
    hooks.validate = [&](MetricsRecord* rec) {
      double l0 = 0;
      return Evaluate(rec, &l0);
    };
  }
  hooks.checkpoint = [&](int64_t steps_done) { return SaveCheckpoint(steps_done); };
  hooks.progress_text = [&](double tps) {
    return absl::StrFormat("loss %.4g  %.0f tok/s%s", last_loss_, tps,
                           threshold_ >= 0 ? absl::StrFormat("  thr %.3g", threshold_) : "");
  };
  ASSIGN_OR_RETURN(TrainResult result, internal::RunStepLoop(o_, start_step_, B_, &meter, hooks,
                                                             &last_loss_, &history_));
  const int64_t stop = result.steps;
  result.threshold = threshold_;
  result.dead_latents = DeadLatents();
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
