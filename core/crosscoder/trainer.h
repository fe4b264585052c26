// Crosscoder training (DESIGN.md section 4): reads an activation store, estimates the per-model
// normalisation, trains a BatchTopK or ReLU-L1 crosscoder with hand-written forward/backward passes
// and Adam, and writes DIR/crosscoder.safetensors + DIR/config.json (3.3) and
// DIR/train_metrics.json (3.4). The CLI (`crossdiff train`) and the worker daemon both call
// RunTraining; nothing here prints except through the progress callback.
//
// Determinism: for a given seed, store and world size the run is bit-for-bit reproducible on CPU,
// and a run resumed from a checkpoint ends with exactly the weights of an uninterrupted one.
//
// Data parallel: with a communicator of world size W > 1 every rank calls RunTraining with the same
// options. BatchTopK selects over the global batch (the ranks agree on the k*B-th largest score)
// and exchanges the batch's factors instead of gradients (factor_exchange.h); ReLU-L1 reads
// batch_size / W rows of every global batch and all-reduces its gradients in buckets, each started
// while the backward pass computes the next. Every rank holds identical weights (checked with a
// checksum at each checkpoint). Only rank 0 writes files.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/common/progress.h"
#include "core/crosscoder/batch_source.h"
#include "core/crosscoder/crosscoder.h"

namespace crossdiff::crosscoder {

struct TrainOptions {
  std::string store_dir;  // activation store (DESIGN.md 3.2)
  std::string out_dir;    // output directory; checkpoints go to out_dir/checkpoint

  Architecture arch = Architecture::kBatchTopK;
  int64_t dict_size = 0;  // 0: 8 * d_model
  int64_t k = 32;         // BatchTopK: latents per token (mean over the batch)
  int64_t steps = 1000;
  int64_t batch_size = 1024;  // global batch (tokens per step), split over ranks
  double lr = 0;              // 0: automatic (2e-4 / sqrt(F / 16384), at most 1e-3)
  uint64_t seed = 0;
  int threads = 0;  // intra-op threads; 0 leaves LibTorch's setting

  int64_t warmup_steps = -1;    // linear lr warm-up; -1: min(1000, steps / 20)
  double lr_decay_start = 0.8;  // linear decay to 0 from this fraction of the steps; >= 1 disables
  double grad_clip = 1.0;       // max global gradient norm; <= 0 disables
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_eps = 1e-8;

  // ReLU-L1: lambda, linearly warmed up from 0 over the first l1_warmup_fraction of the steps.
  double l1_coeff = 1.0;
  double l1_warmup_fraction = 0.05;

  // BatchTopK.
  double auxk_alpha = 1.0 / 32;                // weight of the AuxK loss
  int64_t auxk_k = 0;                          // 0: (M * d) / 2
  int64_t dead_tokens_threshold = 10'000'000;  // a latent is dead after this many tokens unused
  int64_t k_anneal_steps = 0;                  // k goes linearly from k_initial to k over these
  int64_t k_initial = 0;                       // 0: no annealing
  int64_t threshold_start_step = -1;           // -1: min(1000, steps / 10)
  // EMA factor of the inference threshold; 0: automatic, 1 - 20 / (steps after the start) within
  // [0.9, 0.999] (0.999 as published for long runs; short runs need a shorter memory).
  double threshold_beta = 0;
  // "l2": mean over (b, m) of ||x_m - xhat_m||_2 (DESIGN.md section 4 as written);
  // "squared": mean over (b, m) of ||x_m - xhat_m||_2^2 (the dictionary_learning code).
  std::string batch_top_k_loss = "l2";

  double decoder_init_norm = 0.1;      // initial ||W_dec^m[i]|| per model
  bool center = true;                  // subtract the per-model mean before scaling
  int64_t normalization_rows = 65536;  // rows sampled (evenly over the training rows) for the stats

  double val_fraction = 0.01;           // held-out rows (the store's last rows), 0 disables
  int64_t val_max_rows = 4096;          // rows evaluated at each metrics point
  int64_t metrics_every = 100;          // steps between metric records (and validation)
  int64_t checkpoint_every = 0;         // steps between checkpoints; 0: none until the end
  bool resume = false;                  // continue from out_dir/checkpoint when present
  int64_t shuffle_buffer_rows = 65536;  // bound on rows held by the shuffling reader
  // Data-parallel ReLU-L1: floats per gradient all-reduce bucket (rounded to whole latents); each
  // bucket's all-reduce starts as soon as the backward has written it.
  int64_t gradient_bucket_floats = int64_t{1} << 20;
  // Testing hook: stop after this many steps (having written a checkpoint), as if interrupted.
  int64_t stop_after_step = 0;

  // Provenance merged into config.json.
  std::string extra_config_json = "{}";

  // Testing hook: called after each step's backward pass, before the Adam update (see
  // StepObservation). Tensors are views of the trainer's buffers: read only.
  std::function<void(const struct StepObservation&)> observe_step;
  // Whether StepObservation::x holds the batch. The single-process BatchTopK step overwrites its
  // batch buffer, so observing x costs a copy of the batch per step (false: x is undefined there).
  bool observe_batch = true;
};

struct StepObservation {
  int64_t step = 0;
  at::Tensor params;  // flat, Crosscoder::FlattenParameters layout
  // Flat (same layout): this rank's gradient of the loss; summed over the ranks already in
  // data-parallel ReLU-L1 runs (whose all-reduce overlaps the backward pass).
  at::Tensor grads;
  at::Tensor x;                   // this rank's normalised batch [B_local, M*d]
  at::Tensor tokens_since_fired;  // I64 [F], as used by this step's AuxK
  double loss = 0;                // this rank's share of the main loss (+ L1 term for relu_l1)
  double aux_loss = 0;            // the AuxK loss (before auxk_alpha); 0 when no latent is dead
  double l1_coeff = 0;            // relu_l1: lambda at this step
  int64_t k = 0;                  // BatchTopK: k at this step
  int64_t nnz = 0;                // active (token, latent) pairs of the main selection
};

struct MetricsRecord {
  int64_t step = 0;
  double loss = 0;
  double aux_loss = 0;
  std::vector<double> fvu;      // per model, training batch
  std::vector<double> val_fvu;  // per model, held-out rows (empty when val_fraction = 0)
  double val_loss = 0;
  double l0 = 0;
  int64_t dead_latents = 0;
  double lr = 0;
  double tokens_per_second = 0;
};

struct TrainResult {
  int64_t steps = 0;  // steps done in total (including before a resume)
  int64_t batch_size = 0;
  double tokens_per_second = 0;  // training steps only, after warm-up (contract 3.4)
  double final_loss = 0;
  std::vector<double> fvu;  // per model, over the held-out rows (training rows if none)
  double l0 = 0;            // mean active latents per token with the inference encoder
  int64_t dead_latents = 0;
  double threshold = -1;
  bool interrupted = false;  // stopped by stop_after_step
  std::vector<MetricsRecord> history;
};

// Runs (or resumes) a training run. `comm` may be nullptr (single process). `progress` may be
// empty. Errors: INVALID_ARGUMENT for bad options or store contents (an empty store, one model,
// dict size or k out of range, NaN/Inf activations named by shard and row), FAILED_PRECONDITION for
// a checkpoint of another architecture/size, errors of the store reader and communicator as they
// come.
absl::StatusOr<TrainResult> RunTraining(const TrainOptions& options, comm::Communicator* comm,
                                        ProgressMeter::Callback progress);

// The same on rows from any provider (tests and planted problems generate rows in memory);
// options.store_dir is only recorded in config.json. `rows` must outlive the call.
absl::StatusOr<TrainResult> RunTrainingOnRows(const TrainOptions& options, const RowProvider& rows,
                                              comm::Communicator* comm,
                                              ProgressMeter::Callback progress);

}  // namespace crossdiff::crosscoder
