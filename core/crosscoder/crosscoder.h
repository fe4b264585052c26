// A crosscoder (DESIGN.md section 4): one sparse dictionary of F latents read from and decoded into
// each of M models' activations (d each).
//
//   f      = act(sum_m xn_m W_enc^m + b_enc)             pre-activations EncodePre, latents Encode
//   xhat_m = f W_dec^m + b_dec^m                         Decode
//   xn_m   = (x_m - activation_mean_m) * activation_scale_m   Normalize (weights live in this
//   space) w_i    = sum_m ||W_dec^m[i]||                        LatentWeights
//
// Architectures: BatchTopK (Minder et al. 2025; inference keeps relu(pre_i) where
// relu(pre_i) * w_i > threshold, the threshold estimated during training) and ReLU with the
// decoder-norm-weighted L1 penalty (Anthropic 2024; act = relu).
//
// Checkpoint format (DESIGN.md 3.3, a contract; docs/crosscoder.md): DIR/crosscoder.safetensors
// with `encoder.weight` [M,d,F], `encoder.bias` [F], `decoder.weight` [M,F,d], `decoder.bias`
// [M,d], `activation_scale` [M], optionally `activation_mean` [M,d], and `threshold` [] for
// BatchTopK; all F32. DIR/config.json: {"architecture": "batch_top_k"|"relu_l1", "activation_dim",
// "dict_size", "num_models", "k", "models", "layer", ...}.
//
// Storage: encoder and decoder are both kept latent-major, [F, M*d] (one contiguous row per latent:
// what the sparse forward/backward kernels touch); W_enc() and W_dec() return the contract's
// [M,d,F] and [M,F,d] as permuted views. Accessors return tensors that share storage with the
// model: writing into them changes the model.
//
// Thread-safety: const methods may run concurrently; anything that writes parameters may not.
// Errors: INVALID_ARGUMENT for bad shapes/configs (naming the field), NOT_FOUND / INVALID_ARGUMENT
// for missing or malformed checkpoint files (naming the file and the field).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::crosscoder {

enum class Architecture { kBatchTopK, kReluL1 };

// "batch_top_k" / "relu_l1" (the config.json spelling).
std::string_view ArchitectureName(Architecture arch);
// Accepts the config spelling and the CLI spelling ("batch-topk", "relu-l1"). INVALID_ARGUMENT
// naming the value otherwise.
absl::StatusOr<Architecture> ParseArchitecture(std::string_view name);

struct CrosscoderConfig {
  Architecture architecture = Architecture::kBatchTopK;
  int64_t activation_dim = 0;       // d
  int64_t dict_size = 0;            // F
  int64_t num_models = 2;           // M
  int64_t k = 0;                    // BatchTopK: mean active latents per token; 0 for relu_l1
  std::vector<std::string> models;  // model names, base first (size M when known, else empty)
  int layer = 0;
  // Extra config.json fields written verbatim (a JSON object text, e.g. the training options);
  // keys that collide with the fields above are ignored on save.
  std::string extra_json = "{}";

  // Positive sizes, num_models >= 2, 1 <= k <= dict_size for BatchTopK, models empty or of size M.
  absl::Status Validate() const;
  // The same model shape: architecture, d, F, M and k. Used to reject resuming into another run.
  // Returns FAILED_PRECONDITION naming the first field that differs (`what` prefixes the message).
  absl::Status CheckCompatible(const CrosscoderConfig& other, std::string_view what) const;
};

class Crosscoder {
 public:
  // An empty model; use Create or Load. Copies share parameter storage (tensors are handles): use
  // Clone() for an independent copy.
  Crosscoder() = default;

  // Parameters of the configured shape (F32, CPU), all zero; activation_scale = 1, no mean,
  // threshold = -1 (unset).
  static absl::StatusOr<Crosscoder> Create(const CrosscoderConfig& config);
  // The published initialisation: a random direction per latent (shared by every model), each
  // model's decoder row scaled to `decoder_init_norm`, encoder = decoder transposed, zero biases.
  // Deterministic for a seed.
  void InitializeWeights(uint64_t seed, double decoder_init_norm);

  // Reads DIR/config.json + DIR/crosscoder.safetensors, validating names, shapes and dtypes.
  static absl::StatusOr<Crosscoder> Load(const std::string& dir);
  // Writes both files (atomically each) into DIR, creating DIR.
  absl::Status Save(const std::string& dir) const;

  const CrosscoderConfig& config() const { return config_; }
  CrosscoderConfig& mutable_config() { return config_; }
  Architecture architecture() const { return config_.architecture; }
  int64_t d() const { return config_.activation_dim; }
  int64_t F() const { return config_.dict_size; }
  int64_t M() const { return config_.num_models; }

  // Contract views (shared storage).
  at::Tensor W_enc() const;  // [M, d, F] (non-contiguous view of the latent-major storage)
  at::Tensor b_enc() const { return b_enc_; }  // [F]
  at::Tensor W_dec() const;  // [M, F, d] (non-contiguous view of the latent-major storage)
  at::Tensor b_dec() const { return b_dec_; }  // [M, d]
  // Storage layouts (contiguous), for the trainer's kernels.
  at::Tensor encoder_matrix() const { return enc_; }  // [F, M*d]: row i = latent i's encoder
  at::Tensor decoder_matrix() const { return dec_; }  // [F, M*d]: row i = latent i's decoder

  // Moves the four parameters into one contiguous F32 buffer laid out as
  // [encoder F*M*d | decoder F*M*d | b_enc F | b_dec M*d] and returns it (the parameters become
  // views of it; values unchanged). For flat optimisers and bucketed all-reduce. Idempotent.
  at::Tensor FlattenParameters();
  static int64_t NumParameters(const CrosscoderConfig& c) {
    const int64_t md = c.num_models * c.activation_dim;
    return 2 * c.dict_size * md + c.dict_size + md;
  }

  // Normalisation: undefined mean means no centring. scale is [M].
  at::Tensor activation_mean() const { return activation_mean_; }
  at::Tensor activation_scale() const { return activation_scale_; }
  // INVALID_ARGUMENT on shape mismatch or non-finite/non-positive scale.
  absl::Status SetNormalization(at::Tensor mean /*[M,d] or undefined*/, at::Tensor scale /*[M]*/);

  // BatchTopK inference threshold on scores relu(pre) * w; negative when not yet estimated.
  double threshold() const { return threshold_; }
  void set_threshold(double t) { threshold_ = t; }

  // x: raw activations [B, M, d] (any floating dtype) -> normalised F32 [B, M, d].
  at::Tensor Normalize(const at::Tensor& x) const;
  // Normalised [B, M, d] -> raw space.
  at::Tensor Denormalize(const at::Tensor& xn) const;
  // xn: normalised [B, M, d] -> pre-activations [B, F].
  at::Tensor EncodePre(const at::Tensor& xn) const;
  // xn: normalised [B, M, d] -> inference latents [B, F]. BatchTopK: relu(pre) kept where the score
  // relu(pre) * w exceeds threshold(); before a threshold exists, the batch's own top k*B scores.
  // ReLU-L1: relu(pre).
  at::Tensor Encode(const at::Tensor& xn) const;
  // f [B, F] -> normalised reconstruction [B, M, d].
  at::Tensor Decode(const at::Tensor& f) const;
  // ||W_dec^m[i]||: [M, F].
  at::Tensor DecoderNorms() const;
  // w_i = sum_m ||W_dec^m[i]||: [F].
  at::Tensor LatentWeights() const;

  // Replaces all parameters from `other` (same config required; checked by the caller).
  void CopyFrom(const Crosscoder& other);
  // Deep copy.
  Crosscoder Clone() const;

 private:
  CrosscoderConfig config_;
  at::Tensor enc_;               // [F, M*d]
  at::Tensor b_enc_;             // [F]
  at::Tensor dec_;               // [F, M*d]
  at::Tensor flat_;              // when flattened: the buffer the four parameters view
  at::Tensor b_dec_;             // [M, d]
  at::Tensor activation_mean_;   // [M, d] or undefined
  at::Tensor activation_scale_;  // [M]
  double threshold_ = -1;
};

// Reads only DIR/config.json (no tensors): for checking compatibility before loading.
absl::StatusOr<CrosscoderConfig> LoadCrosscoderConfig(const std::string& dir);

// Selects the k*B largest scores of a [B, F] score matrix (BatchTopK over the whole batch) and
// returns a 0/1 F32 mask of the same shape; scores <= 0 are never selected. Reference helper for
// inference and tests (the trainer uses its own kernels).
at::Tensor BatchTopKMask(const at::Tensor& scores, int64_t k_times_b);

}  // namespace crossdiff::crosscoder
