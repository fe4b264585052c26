#include "core/crosscoder/sharded_trainer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/crosscoder/crosscoder.h"
#include "core/crosscoder/sparse_kernels.h"
#include "core/crosscoder/training_common.h"

namespace crossdiff::crosscoder {
namespace {

using nlohmann::json;

// The history of a checkpoint, read as this trainer always has (unlike internal::RecordFromJson,
// a null metric is not read back as NaN).
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

using internal::StepSums;

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
  // The observe_step hook with this shard's flat buffers (layout [enc | dec | b_enc | b_dec] of
  // the shard).
  void Observe(int64_t step) {
    if (o_.observe_step) {
      o_.observe_step(internal::Observation(step, params_, grads_, x_, since_fired_));
    }
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
  at::Tensor pre_;          // BatchTopK: the batch's pre-activations [B, Fl]
  at::Tensor since_fired_;  // I64 [Fl]
  std::unique_ptr<BatchStream> stream_;
  kernels::SparseCodes codes_, aux_local_, aux_codes_;
  kernels::LatentEntries entries_;
  int64_t start_step_ = 0;
  float threshold_ = -1;
  internal::SelectionGuess guess_;  // not checkpointed: only a hint, results do not depend on it
  std::vector<MetricsRecord> history_;
  double last_loss_ = 0;
};

absl::Status ShardedTrainer::Validate() {
  internal::TrainingShape shape;
  RETURN_IF_ERROR(internal::ValidateShape(o_, rows_, &shape));
  M_ = shape.M;
  d_ = shape.d;
  Md_ = shape.Md;
  F_ = shape.F;
  if (F_ % world_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict_size ", F_, " is not divisible by the world size ", world_,
                     " (latent sharding gives every rank F/W latents)"));
  }
  shard_ = LatentShardOf(F_, rank_, world_);
  Fl_ = shard_.count;
  RETURN_IF_ERROR(internal::ValidateArchitectureAndSteps(o_, F_));
  B_ = o_.batch_size;
  RETURN_IF_ERROR(
      internal::ValidateRatesSplitAndDefaults(o_, rows_, shape, &train_rows_, &val_rows_));
  config_ = internal::TrainingConfig(o_, rows_, shape, "latent");
  return config_.Validate();
}

absl::StatusOr<int64_t> ShardedTrainer::DeadLatents() {
  at::Tensor n = (since_fired_ >= o_.dead_tokens_threshold).sum().to(at::kLong).reshape({1});
  RETURN_IF_ERROR(AllReduce(n));
  return n.item<int64_t>();
}

absl::Status ShardedTrainer::EstimateNormalization() {
  ASSIGN_OR_RETURN(internal::Normalization n,
                   internal::EstimateNormalization(o_, rows_, train_rows_, M_, d_));
  scale_ = n.scale;
  mean_ = n.mean;
  bdec_.copy_(n.b_dec.reshape({Md_}));
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

absl::Status ShardedTrainer::ApplyGradients(int64_t step) {
  return internal::ClipAndAdamStep(
      o_, step,
      [this]() -> absl::StatusOr<double> {
        // The squared norm of this shard's own gradients, summed over shards, plus the replicated
        // decoder bias once.
        const int64_t own = 2 * Fl_ * Md_ + Fl_;
        at::Tensor sq = at::tensor({kernels::SquaredNorm(grads_.data_ptr<float>(), own)},
                                   at::TensorOptions().dtype(at::kDouble));
        RETURN_IF_ERROR(AllReduce(sq));
        return std::sqrt(sq.item<double>() +
                         kernels::SquaredNorm(grads_.data_ptr<float>() + own, Md_));
      },
      params_, grads_, adam_m_, adam_v_);
}

absl::Status ShardedTrainer::StepBatchTopK(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t Fl = Fl_, Md = Md_, B = B_;
  at::addmm_out(pre_, benc_, x_, enc_.t());  // [B, Fl], in the buffer kept across steps
  at::Tensor w = dec_.view({Fl, M_, d_}).norm(2, {2}).sum(1).contiguous();
  const auto pre_rows = kernels::PreActivations::Whole(pre_.data_ptr<float>(), B, Fl);
  // The global k*B-th score over every shard's [B, Fl] block, found as the data-parallel trainer
  // finds it over its ranks' rows: candidates above a fraction of the last threshold, their keys
  // gathered in one all-gather (room for three times a shard's share of the selection; more falls
  // back to the exact radix selection over all-reduced histograms).
  const int64_t kth = internal::KAt(o_, step) * B;
  kernels::KeyExchange keys;
  if (distributed()) keys = internal::CandidateKeyExchange(comm_, 3 * kth / world_);
  ASSIGN_OR_RETURN(kernels::Selection sel,
                   kernels::SelectAndGather(pre_rows, w.data_ptr<float>(), kth, guess_.guess(),
                                            internal::HistogramAllReduce(comm_), &codes_, nullptr,
                                            distributed() ? &keys : nullptr));
  guess_.Update(sel, kth);

  // AuxK on latents dead for dead_tokens_threshold tokens, decided the same way on every rank.
  std::vector<int32_t> dead = internal::DeadLatentList(o_, since_fired_, Fl);
  at::Tensor any_dead =
      at::tensor({static_cast<int64_t>(dead.size())}, at::TensorOptions().dtype(at::kLong));
  RETURN_IF_ERROR(AllReduce(any_dead));
  const bool use_aux = any_dead.item<int64_t>() > 0;
  if (use_aux) {
    kernels::GatherAuxTopK(pre_rows, dead, o_.auxk_k, &aux_local_);
    RETURN_IF_ERROR(FilterAuxGlobally(aux_local_, B, &aux_codes_));
  }

  // Partial reconstructions of every shard, summed.
  kernels::SparseDecode(codes_, dec_.data_ptr<float>(), Md, nullptr, partial_.data_ptr<float>());
  RETURN_IF_ERROR(AllReduce(partial_));
  at::Tensor err = partial_.add(bdec_.unsqueeze(0)).sub_(x_);   // xhat - x, then dL/dxhat
  at::Tensor e2 = internal::PerModelSquaredError(err, M_, d_);  // [B, M]
  at::Tensor row_scale = internal::BatchTopKLoss(o_, e2, B, M_, &sums->loss);
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
    sums->aux_loss += kernels::SquaredNorm(gaux_.data_ptr<float>(), gaux_.numel()) / denom;
    gaux_.mul_(2.0 * o_.auxk_alpha / denom);
    gaux = gaux_.data_ptr<float>();
  }
  if (want_stats) internal::AccumulateStats(x_, e2, B, M_, d_, sums);
  sums->nnz += static_cast<double>(codes_.nnz());  // this shard's; summed at metric points
  internal::BatchTopKBackward(codes_, use_aux ? &aux_codes_ : nullptr, x_, err, row_scale, gaux,
                              dec_, Fl, M_, d_, &entries_, grads_);

  Observe(step);
  at::Tensor fired = internal::FiredCounts(codes_, Fl);
  RETURN_IF_ERROR(ApplyGradients(step));
  since_fired_.add_(B);
  since_fired_.masked_fill_(fired > 0, 0);
  threshold_ = internal::NextThreshold(o_, step, threshold_, sel);
  return absl::OkStatus();
}

absl::Status ShardedTrainer::StepReluL1(int64_t step, bool want_stats, StepSums* sums) {
  const int64_t Fl = Fl_, B = B_;
  at::Tensor f = at::addmm(benc_, x_, enc_.t()).relu_();  // [B, Fl]
  at::Tensor nrm = dec_.view({Fl, M_, d_}).norm(2, {2});  // [Fl, M]
  at::Tensor w = nrm.sum(1);
  at::mm_out(partial_, f, dec_);
  RETURN_IF_ERROR(AllReduce(partial_));
  at::Tensor err = partial_.add(bdec_.unsqueeze(0)).sub_(x_);
  const double lambda = internal::L1Coefficient(o_, step);
  const double inv_b = 1.0 / static_cast<double>(B);
  at::Tensor e2 = internal::PerModelSquaredError(err, M_, d_);
  at::Tensor l1 = at::mv(f, w).sum().to(at::kDouble).reshape({1});
  RETURN_IF_ERROR(AllReduce(l1));
  sums->loss += e2.sum().item<double>() * inv_b + lambda * l1.item<double>() * inv_b;
  if (want_stats) internal::AccumulateStats(x_, e2, B, M_, d_, sums);
  ASSIGN_OR_RETURN(at::Tensor active, internal::ReluL1Backward(x_, f, err, dec_, nrm, w, lambda,
                                                               inv_b, M_, d_, grads_, sums));
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
  internal::FinishEvaluation(err2, x2, xsum, loss, nnz, n, rec, l0_out);
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
  json st = internal::CheckpointState(o_, steps_done, train_rows_, threshold_, world_, history_);
  st["sharding"] = "latent";
  return internal::InstallCheckpoint(o_, model, state[0], state[1], fired, st);
}

// Resumes from DIR/checkpoint written by a sharded run of any world size or by RunTraining: every
// rank loads the full checkpoint and keeps its slice.
absl::StatusOr<bool> ShardedTrainer::TryResume() {
  ASSIGN_OR_RETURN(std::optional<json> st, internal::ReadResumeState(o_, config_));
  if (!st) return false;
  ASSIGN_OR_RETURN(Crosscoder model, Crosscoder::Load(internal::CheckpointDir(o_)));
  enc_.copy_(model.encoder_matrix().narrow(0, shard_.begin, Fl_));
  dec_.copy_(model.decoder_matrix().narrow(0, shard_.begin, Fl_));
  benc_.copy_(model.b_enc().narrow(0, shard_.begin, Fl_));
  bdec_.copy_(model.b_dec().reshape({Md_}));
  mean_ = model.activation_mean().defined() ? model.activation_mean().clone() : at::Tensor();
  scale_ = model.activation_scale().clone();
  ASSIGN_OR_RETURN(internal::OptimiserState saved,
                   internal::LoadOptimiserState(o_, Crosscoder::NumParameters(config_), F_));
  const at::Tensor &m = saved.adam_m, &v = saved.adam_v, &fired = saved.tokens_since_fired;
  const int64_t FMd = F_ * Md_, fmd = Fl_ * Md_, b0 = shard_.begin;
  for (auto [src, dst] : {std::pair<at::Tensor, at::Tensor>{m, adam_m_}, {v, adam_v_}}) {
    dst.narrow(0, 0, fmd).copy_(src.narrow(0, b0 * Md_, fmd));
    dst.narrow(0, fmd, fmd).copy_(src.narrow(0, FMd + b0 * Md_, fmd));
    dst.narrow(0, 2 * fmd, Fl_).copy_(src.narrow(0, 2 * FMd + b0, Fl_));
    dst.narrow(0, 2 * fmd + Fl_, Md_).copy_(src.narrow(0, 2 * FMd + F_, Md_));
  }
  since_fired_.copy_(fired.narrow(0, b0, Fl_));
  start_step_ = st->value("step", int64_t{0});
  threshold_ = st->value("threshold", -1.0f);
  history_.clear();
  for (const auto& r : st->value("history", json::array())) history_.push_back(RecordFromJson(r));
  return true;
}

absl::Status ShardedTrainer::WriteOutputs(const Crosscoder& model, const TrainResult& r) {
  json j = internal::MetricsJson(o_, model, r, val_rows_, F_, world_);
  j["sharding"] = "latent";
  j["latents_per_rank"] = Fl_;
  return internal::SaveModelAndMetrics(o_, model, j);
}

absl::StatusOr<TrainResult> ShardedTrainer::Run() {
  RETURN_IF_ERROR(Validate());
  RETURN_IF_ERROR(internal::CreateOutputDir(o_, rank_));
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
  if (o_.arch == Architecture::kBatchTopK) pre_ = at::empty({B_, Fl_}, f32);
  since_fired_ = at::zeros({Fl_}, at::TensorOptions().dtype(at::kLong));
  // Every rank reads the whole global batch (rank 0 of 1).
  ASSIGN_OR_RETURN(stream_,
                   rows_.CreateBatchStream(internal::StreamOptions(o_, train_rows_, B_, 0, 1)));
  ASSIGN_OR_RETURN(bool resumed, TryResume());
  if (!resumed) {
    InitializeShard();
    RETURN_IF_ERROR(EstimateNormalization());
  }

  ProgressMeter meter("train", "steps", o_.steps, nullptr, 1.0);
  if (progress_) meter.set_callback(progress_);
  StepSums window;
  window.Reset(M_, Md_);
  internal::StepLoopHooks hooks;
  hooks.step = [&](int64_t step, bool metrics_point) { return Step(step, metrics_point, &window); };
  hooks.window_record = [&](int64_t step, int64_t window_steps) -> absl::StatusOr<MetricsRecord> {
    // Loss and error sums are already global (every rank saw the whole batch); only the number
    // of active latents is per shard.
    at::Tensor nnz = at::tensor({window.nnz}, at::TensorOptions().dtype(at::kDouble));
    RETURN_IF_ERROR(AllReduce(nnz));
    MetricsRecord rec;
    rec.step = step + 1;
    rec.loss = window.loss / window_steps;
    rec.aux_loss = window.aux_loss / window_steps;
    rec.l0 = nnz.item<double>() / (static_cast<double>(B_) * window_steps);
    rec.fvu =
        internal::FvuFromSums(window.err2.data(), window.x2.data(), window.xsum.data(), M_, d_, B_);
    window.Reset(M_, Md_);
    return rec;
  };
  hooks.dead_latents = [&]() { return DeadLatents(); };
  if (val_rows_ > 0) {
    hooks.validate = [&](MetricsRecord* rec) {
      double l0 = 0;
      return Evaluate(rec, &l0);
    };
  }
  hooks.checkpoint = [&](int64_t steps_done) { return SaveCheckpoint(steps_done); };
  hooks.progress_text = [&](double tps) {
    return absl::StrFormat("loss %.4g  %.0f tok/s", last_loss_, tps);
  };
  ASSIGN_OR_RETURN(TrainResult result, internal::RunStepLoop(o_, start_step_, B_, &meter, hooks,
                                                             &last_loss_, &history_));
  const int64_t stop = result.steps;
  result.threshold = threshold_;
  ASSIGN_OR_RETURN(result.dead_latents, DeadLatents());
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
