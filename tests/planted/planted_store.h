// Test support: activation stores generated from a known crosscoder dictionary ("planted features",
// DESIGN.md section 6), and the matching of a learned dictionary against the planted one.
//
// Each row draws every feature i independently: active with probability p_i, then with a magnitude
// uniform in [magnitude_min, magnitude_max]; model m's activation is sum_i a_i D_m[i] + noise.
// Three groups of features:
//   shared:        a unit vector in both models (the fine-tune's at cosine `shared_cosine` to the
//   base's) base_only:     a unit vector in the base model (model 0), zero in the fine-tune
//   finetune_only: zero in the base, a unit vector in the fine-tune (model 1)
// Frequencies are log-uniform in [freq_min, freq_max] and the same list is used for every group, so
// both models carry the same variance (their normalisation scales agree and shared features keep a
// relative decoder norm near 0.5).
//
// Token metadata: sequences of `seq_len` rows (sequence_ids = row / seq_len, positions = row %
// seq_len); token_ids = 1 + the index of the row's strongest feature, 0 when none is active.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::planted {

enum class FeatureGroup { kShared, kBaseOnly, kFinetuneOnly };
const char* GroupName(FeatureGroup g);

struct PlantedOptions {
  int64_t d_model = 32;
  int64_t num_shared = 16;
  int64_t num_base_only = 16;
  int64_t num_finetune_only = 16;
  int64_t rows = 32768;
  double freq_min = 0.02, freq_max = 0.1;
  double magnitude_min = 0.5, magnitude_max = 1.5;
  double shared_cosine = 0.8;
  double noise_std = 0.01;
  int64_t seq_len = 64;
  int64_t rows_per_shard = 8192;
  std::string dtype = "float32";
  std::vector<std::string> models = {"planted-base", "planted-finetune"};
  uint64_t seed = 1;
};

struct PlantedStore {
  std::string dir;
  at::Tensor dictionary;             // F32 [2, N, d]: D_base, D_ft (zero rows where absent)
  std::vector<FeatureGroup> groups;  // [N]
  at::Tensor frequencies;            // F64 [N]
  int64_t num_features() const { return static_cast<int64_t>(groups.size()); }
};

// Generates the dictionary and writes the store to `dir` (which must not hold a store yet).
absl::StatusOr<PlantedStore> WritePlantedStore(const std::string& dir,
                                               const PlantedOptions& options);

struct FeatureMatch {
  int64_t feature = 0;
  int64_t latent = -1;  // best latent
  double cosine = 0;    // between the concatenated true and learned decoder vectors
};

// For each planted feature, the learned latent whose concatenated decoder [W_dec^0[j], W_dec^1[j]]
// has the largest cosine with the planted [s_0 D_0[i], s_1 D_1[i]] (s_m = the crosscoder's
// activation_scale: the learned decoder lives in the normalised space). `learned_decoder` is
// [2, F, d]; `scale` is [2].
std::vector<FeatureMatch> MatchFeatures(const PlantedStore& store,
                                        const at::Tensor& learned_decoder, const at::Tensor& scale);

}  // namespace crossdiff::planted
