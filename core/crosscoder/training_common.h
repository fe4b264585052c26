// Internal: the pieces shared by the data-parallel trainer (trainer.cc, RunTraining) and the
// latent-sharded trainer (sharded_trainer.cc, RunShardedTraining): option validation and
// defaults, the normalisation pass, the schedules, the checkpoint layout and the metrics files.
// Keeping them in one place keeps the two trainers' checkpoints and outputs interchangeable.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/crosscoder/batch_source.h"
#include "core/crosscoder/crosscoder.h"
#include "core/crosscoder/sparse_kernels.h"
#include "core/crosscoder/trainer.h"

namespace crossdiff::crosscoder::internal {

inline constexpr int64_t kMaxDictSize = int64_t{1} << 24;
// The checkpoint layout (DIR/checkpoint), the same for both trainers.
inline constexpr char kCheckpointDir[] = "checkpoint";
inline constexpr char kStateTensors[] = "trainer_state.safetensors";
inline constexpr char kStateJson[] = "trainer_state.json";

// Writes `text` to `path` through a temporary file and a rename.
absl::Status WriteText(const std::string& path, const std::string& text);
absl::StatusOr<nlohmann::json> ReadJson(const std::string& path);

nlohmann::json RecordJson(const MetricsRecord& r);
// NaN metrics (a diverged run) are written as JSON null; read them back as NaN.
double NumberOr(const nlohmann::json& j, const char* key, double def);
MetricsRecord RecordFromJson(const nlohmann::json& j);

// Sums of one step's statistics (per model; xsum [M*d], raw sums squared at metric points).
struct StepSums {
  double loss = 0, aux_loss = 0, nnz = 0;
  std::vector<double> err2, x2, xsum;
  void Reset(int64_t M, int64_t Md) {
    loss = aux_loss = nnz = 0;
    err2.assign(M, 0);
    x2.assign(M, 0);
    xsum.assign(Md, 0);
  }
};
// Adds the error and signal sums of one batch x [rows, M*d] with squared errors e2 [rows, M].
void AccumulateStats(const at::Tensor& x, const at::Tensor& e2, int64_t rows, int64_t M, int64_t d,
                     StepSums* sums);
// Per-model FVU of a batch of `batch` rows from its sums err2 [M], x2 [M] and xsum [M*d].
std::vector<double> FvuFromSums(const double* err2, const double* x2, const double* xsum, int64_t M,
                                int64_t d, int64_t batch);
// Fills rec->val_fvu, rec->val_loss and *l0_out from the sums of an evaluation over n rows.
void FinishEvaluation(const std::vector<double>& err2, const std::vector<double>& x2,
                      const at::Tensor& xsum, double loss, double nnz, int64_t n,
                      MetricsRecord* rec, double* l0_out);

// The latents among the n whose counters reach dead_tokens_threshold (none when auxk_alpha is 0).
std::vector<int32_t> DeadLatentList(const TrainOptions& o, const at::Tensor& since_fired,
                                    int64_t n);
// The BatchTopK reconstruction loss of squared errors e2 [rows, M] in a global batch of
// global_batch rows, added to *loss; returns the per-row, per-model scale of dL/dxhat.
at::Tensor BatchTopKLoss(const TrainOptions& o, const at::Tensor& e2, int64_t global_batch,
                         int64_t M, double* loss);
// The BatchTopK backward over n latents: scales err (xhat - x, [rows, M*d]) by row_scale into
// dL/dxhat and writes the gradients into grads, laid out [enc n*Md | dec n*Md | b_enc n | b_dec Md]
// (gaux, when not null, is the AuxK gradient of the aux codes).
void BatchTopKBackward(const kernels::SparseCodes& codes, const kernels::SparseCodes* aux_codes,
                       const at::Tensor& x, at::Tensor& err, const at::Tensor& row_scale,
                       const float* gaux, const at::Tensor& dec, int64_t n, int64_t M, int64_t d,
                       kernels::LatentEntries* entries, at::Tensor& grads,
                       std::vector<double>* latent_sq = nullptr);
// BatchTopKBackward's first step: err (xhat - x, [rows, M*d]) times row_scale ([rows, M], from
// BatchTopKLoss) becomes dL/dxhat, in place.
void ScaleToOutputGradient(at::Tensor& err, const at::Tensor& row_scale, int64_t M, int64_t d);
// BatchTopKBackward's encoder, decoder and encoder-bias gradients (not the decoder bias's) from
// rows of x and of dL/dxhat gmain (already scaled), token t's at x + x_rows(t)*M*d and
// gmain + t*M*d. latent_sq (optional) receives each latent's squared gradient norm
// (kernels::SparseBackward's row_sq): their sum plus the decoder bias's is the gradient norm.
void BatchTopKGradients(const kernels::SparseCodes& codes, const kernels::SparseCodes* aux_codes,
                        const float* x, const float* gmain, const float* gaux,
                        const at::Tensor& dec, int64_t n, int64_t M, int64_t d,
                        kernels::LatentEntries* entries, at::Tensor& grads,
                        std::vector<double>* latent_sq = nullptr, kernels::RowMap x_rows = {});
// How often each of the n latents fired in codes (I64 [n]).
at::Tensor FiredCounts(const kernels::SparseCodes& codes, int64_t n);
// Told each range [offset, offset + count) of the flat gradient as soon as the backward has written
// it, so that its all-reduce can run while the rest is computed; an error stops the backward.
using GradientReady = std::function<absl::Status(int64_t offset, int64_t count)>;
// The ReLU-L1 backward over n latents with codes f [rows, n], decoder dec [n, M*d] (row norms nrm
// [n, M], weights w [n]): scales err (xhat - x) into dL/dxhat, writes the gradients into grads (the
// layout of BatchTopKBackward), adds the active codes to sums->nnz and returns them (f > 0).
// With `ready`, the encoder and decoder gradients are computed in blocks of block_latents latents
// and every block, then each bias gradient, is handed to it in the order decoder blocks, decoder
// bias, encoder blocks, encoder bias (the same on every rank).
absl::StatusOr<at::Tensor> ReluL1Backward(const at::Tensor& x, const at::Tensor& f, at::Tensor& err,
                                          const at::Tensor& dec, const at::Tensor& nrm,
                                          const at::Tensor& w, double lambda, double inv_b,
                                          int64_t M, int64_t d, at::Tensor& grads, StepSums* sums,
                                          const GradientReady& ready = {},
                                          int64_t block_latents = 0);

// The shape of the training rows and the dictionary size.
struct TrainingShape {
  int64_t M = 0, d = 0, Md = 0, F = 0;
  std::string src;  // the rows' name in messages
};
// Validation, in order: out_dir, the rows and the dictionary size ...
absl::Status ValidateShape(const TrainOptions& o, const RowProvider& rows, TrainingShape* shape);
// ... the architecture's options, steps and batch_size ...
absl::Status ValidateArchitectureAndSteps(const TrainOptions& o, int64_t F);
// ... the rates, the validation split (train_rows, val_rows) and the defaults of `o`.
absl::Status ValidateRatesSplitAndDefaults(TrainOptions& o, const RowProvider& rows,
                                           const TrainingShape& shape, int64_t* train_rows,
                                           int64_t* val_rows);
// The model configuration of a run; extra_json holds the training options under "training".
CrosscoderConfig TrainingConfig(const TrainOptions& o, const RowProvider& rows,
                                const TrainingShape& shape, const char* sharding);

double LearningRate(const TrainOptions& o, int64_t step);
double L1Coefficient(const TrainOptions& o, int64_t step);
int64_t KAt(const TrainOptions& o, int64_t step);

// [rows, M]: the squared norm of each row's per-model error (err [rows, M*d], contiguous), without
// a [rows, M*d] temporary.
at::Tensor PerModelSquaredError(const at::Tensor& err, int64_t M, int64_t d);

// SelectAndGather's collectives over `comm`'s ranks: the histogram all-reduce (the identity on one
// rank) and the candidate-key all-gather of `capacity` keys per rank.
kernels::AllReduceI64 HistogramAllReduce(comm::Communicator* comm);
kernels::KeyExchange CandidateKeyExchange(comm::Communicator* comm, int64_t capacity);

// The guess SelectAndGather collects candidates above: a fraction of the previous step's
// threshold, the fraction tuned so that the candidates stay between 1.15 and 2 times the entries
// selected (fewer risks the exact fallback, more costs memory and exchange). Only global counts
// drive it, so it is identical on every rank. It changes speed, never the selection.
class SelectionGuess {
 public:
  float guess() const { return static_cast<float>(last_threshold_ * (1.0 - gap_)); }
  void Update(const kernels::Selection& sel, int64_t kth) {
    if (sel.candidates >= 0) {
      if (sel.candidates < kth) {
        gap_ = std::min(0.5, gap_ * 2);
      } else if (sel.candidates > 2 * kth) {
        gap_ = std::max(0.002, gap_ * 0.7);
      } else if (20 * sel.candidates < 23 * kth) {
        gap_ = std::min(0.5, gap_ * 1.25);
      }
    }
    last_threshold_ = sel.keep_all_positive ? 0.0 : sel.threshold;
  }
  double gap() const { return gap_; }

 private:
  double last_threshold_ = 0;
  double gap_ = 0.05;
};

// Rows of [rows, dict_size] pre-activations computed at a time so that a chunk fits in a buffer of
// `buffer_floats` (the gradient buffer): a multiple of 32 rows, at least 32, all `rows` when they
// fit.
int64_t PreActivationChunkRows(int64_t buffer_floats, int64_t dict_size, int64_t rows);
// The BatchTopK inference threshold after a step's selection (an EMA from threshold_start_step).
float NextThreshold(const TrainOptions& o, int64_t step, float threshold,
                    const kernels::Selection& sel);
// Clips by the gradient norm (grad_norm is called only when grad_clip > 0) and takes an Adam step.
absl::Status ClipAndAdamStep(const TrainOptions& o, int64_t step,
                             const std::function<absl::StatusOr<double>()>& grad_norm,
                             at::Tensor& params, at::Tensor& grads, at::Tensor& adam_m,
                             at::Tensor& adam_v);

// The step the loop stops before: min(steps, stop_after_step) (steps when stop_after_step <= 0).
inline int64_t StopStep(const TrainOptions& o) {
  return o.stop_after_step > 0 ? std::min(o.steps, o.stop_after_step) : o.steps;
}
// The step loop of both trainers: steps [start_step, StopStep(o)), each under GuardTorch. After
// every metric point (every metrics_every steps and the last step) a record: the window's figures
// (over the steps since the previous metric point; the hook starts a new window), the learning
// rate, the dead latents, the throughput and, where `validate` is set, the validation figures; its
// loss becomes *last_loss and it is appended to *history. A checkpoint every checkpoint_every steps
// before the last; progress after every step.
struct StepLoopHooks {
  std::function<absl::Status(int64_t step, bool metrics_point)> step;
  std::function<absl::StatusOr<MetricsRecord>(int64_t step, int64_t window_steps)> window_record;
  std::function<absl::StatusOr<int64_t>()> dead_latents;
  std::function<absl::Status(MetricsRecord* rec)> validate;  // empty: no validation
  std::function<absl::Status(int64_t steps_done)> checkpoint;
  std::function<std::string(double tokens_per_second)> progress_text;
};
// global_batch rows (tokens) a step. Returns the result's batch_size, steps (the stop),
// tokens_per_second (over the timed steps: the first few are not timed; 0 if none), final_loss
// (*last_loss) and history (*history).
absl::StatusOr<TrainResult> RunStepLoop(const TrainOptions& o, int64_t start_step,
                                        int64_t global_batch, ProgressMeter* meter,
                                        const StepLoopHooks& hooks, double* last_loss,
                                        std::vector<MetricsRecord>* history);
// The observation of a step for the observe_step hook, without the per-architecture figures.
StepObservation Observation(int64_t step, const at::Tensor& params, const at::Tensor& grads,
                            const at::Tensor& x, const at::Tensor& tokens_since_fired);

// Per-model mean and scale (E||x_m - mu_m|| = sqrt(d)) from up to normalization_rows training rows,
// read in evenly spaced chunks. Every rank reads the same rows, so the statistics agree exactly.
struct Normalization {
  at::Tensor mean;   // F32 [M, d]; undefined without centring
  at::Tensor scale;  // F32 [M]
  at::Tensor b_dec;  // F32 [M, d]: the mean of the normalised sample (zero when centring)
};
absl::StatusOr<Normalization> EstimateNormalization(const TrainOptions& o, const RowProvider& rows,
                                                    int64_t train_rows, int64_t M, int64_t d);

BatchStreamOptions StreamOptions(const TrainOptions& o, int64_t train_rows, int64_t global_batch,
                                 int rank, int world);
// Rank 0 creates out_dir.
absl::Status CreateOutputDir(const TrainOptions& o, int rank);

std::string CheckpointDir(const TrainOptions& o);
// The checkpoint's trainer state when o.resume and one exists (nullopt otherwise), after checking
// its config, batch size and seed against this run.
absl::StatusOr<std::optional<nlohmann::json>> ReadResumeState(const TrainOptions& o,
                                                              const CrosscoderConfig& config);
struct OptimiserState {
  at::Tensor adam_m, adam_v, tokens_since_fired;
};
// The checkpoint's optimiser state: num_params floats each and F counters.
absl::StatusOr<OptimiserState> LoadOptimiserState(const TrainOptions& o, int64_t num_params,
                                                  int64_t F);
// The trainer state JSON of a checkpoint.
nlohmann::json CheckpointState(const TrainOptions& o, int64_t steps_done, int64_t train_rows,
                               float threshold, int world,
                               const std::vector<MetricsRecord>& history);
// Writes model, optimiser state and trainer state into DIR/checkpoint.tmp and installs it as
// DIR/checkpoint.
absl::Status InstallCheckpoint(const TrainOptions& o, const Crosscoder& model,
                               const at::Tensor& adam_m, const at::Tensor& adam_v,
                               const at::Tensor& tokens_since_fired, const nlohmann::json& state);

// train_metrics.json's content.
nlohmann::json MetricsJson(const TrainOptions& o, const Crosscoder& model, const TrainResult& r,
                           int64_t val_rows, int64_t F, int world);
// Saves the model into out_dir and writes out_dir/train_metrics.json.
absl::Status SaveModelAndMetrics(const TrainOptions& o, const Crosscoder& model,
                                 const nlohmann::json& metrics);

}  // namespace crossdiff::crosscoder::internal
