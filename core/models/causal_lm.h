// A decoder-only causal LM loaded from a Hugging Face checkpoint directory (config.json +
// model.safetensors or a sharded model.safetensors.index.json), for inference only.
//
// Families: GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma-2 (see SupportedModelTypes() and
// docs/models.md). The forward pass reproduces transformers 4.45 ("eager" attention) to float32
// rounding, and stops after the last block that a request needs: asking for the residual stream
// after block L runs blocks 0..L only (no later block, no final norm, no LM head).
//
// Conventions (those of ../shared/fixtures/hf/README.md):
//  * input_ids / attention_mask are [B, T] int64 (int32 accepted); mask 1 = real token, 0 = pad.
//    Positions are 0..T-1 for every row (HF's default when position_ids are not passed), so pad
//    on the right. Keys with mask 0 are hidden from every query; pad queries still produce values.
//  * hidden_states[0] = embedding output; hidden_states[i] (1 <= i < N) = residual stream after
//    block i-1; hidden_states[N] = final_norm(output of block N-1) (HF output_hidden_states).
//
// Speed: on CPU in float32 the projection matrices are stored as oneDNN tensors when LibTorch has
// oneDNN (about 1.7x faster GEMMs than the generic BLAS); the environment variable
// CROSSDIFF_ONEDNN=0, read by Load(), selects plain at::linear instead. Loading a CPU model also
// tunes glibc's allocator once per process (see host_allocator.h; CROSSDIFF_MALLOC_TUNING=0 opts
// out).
//
// Thread-safety: after Load() the object is immutable; Forward() may be called concurrently.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/models/model_config.h"

namespace crossdiff::models {

namespace internal {
struct ModelWeights;  // defined in causal_lm.cc
}  // namespace internal

struct ForwardRequest {
  // HF output_hidden_states: N + 1 entries (entry N has the final norm applied). Runs every block.
  bool all_hidden_states = false;
  // Output of the last block before the final norm. Runs every block.
  bool last_block_output = false;
  // LM-head logits [B, T, vocab] (float32; Gemma-2 final soft-capping applied). Runs every block.
  bool logits = false;
  // Residual stream after these blocks (0-based, no norm); the forward stops after the largest.
  std::vector<int> capture_blocks;
};

struct ForwardResult {
  // Tensors are on the model's device in its activation dtype, except logits (float32).
  std::vector<at::Tensor> hidden_states;    // when all_hidden_states
  at::Tensor last_block_output;             // when last_block_output
  at::Tensor logits;                        // when logits
  std::map<int, at::Tensor> block_outputs;  // block index -> [B, T, d]
  int blocks_run = 0;                       // how many transformer blocks were evaluated
};

class CausalLM {
 public:
  // Loads config.json and the weights in `model_dir`. `device` CPU => float32 by default; CUDA =>
  // bfloat16 weights and activations by default; `dtype` overrides either.
  // Errors: those of LoadModelConfig; NOT_FOUND naming the tensor and checkpoint file when a tensor
  // the architecture needs is absent; INVALID_ARGUMENT naming the tensor when its shape disagrees
  // with config.json. With `last_block` set, only the embeddings and blocks 0..last_block are
  // loaded (no final norm, no LM head): all that a harvest of that block's residual stream runs,
  // for about (last_block + 1) / num_layers of the load time and memory. Such a model answers
  // Forward requests that need no later block and returns FAILED_PRECONDITION for the others; a
  // last_block outside [0, num_layers) is INVALID_ARGUMENT.
  static absl::StatusOr<std::unique_ptr<CausalLM>> Load(
      const std::string& model_dir, at::Device device = at::kCPU,
      std::optional<at::ScalarType> dtype = std::nullopt,
      std::optional<int> last_block = std::nullopt);

  ~CausalLM();
  CausalLM(const CausalLM&) = delete;
  CausalLM& operator=(const CausalLM&) = delete;

  const ModelConfig& config() const { return config_; }
  const std::string& model_dir() const { return model_dir_; }
  at::Device device() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }

  // Runs the forward pass. INVALID_ARGUMENT for bad shapes/dtypes, token ids outside the
  // vocabulary, sequences longer than GPT-2's position table, an empty request, or a capture block
  // outside [0, num_layers) (the message names the block and the layer count);
  // FAILED_PRECONDITION for a request that needs a block a truncated Load (last_block) left out.
  absl::StatusOr<ForwardResult> Forward(const at::Tensor& input_ids,
                                        const at::Tensor& attention_mask,
                                        const ForwardRequest& req) const;

  // Residual stream after block `layer` (0-based), [B, T, d] in the model dtype on its device;
  // runs blocks 0..layer only.
  absl::StatusOr<at::Tensor> ResidualAfterBlock(const at::Tensor& input_ids,
                                                const at::Tensor& attention_mask, int layer) const;

 private:
  using Weights = internal::ModelWeights;
  CausalLM(ModelConfig config, std::string model_dir, at::Device device, at::ScalarType dtype,
           std::unique_ptr<Weights> weights);

  ModelConfig config_;
  std::string model_dir_;
  at::Device device_;
  at::ScalarType dtype_;
  std::unique_ptr<Weights> weights_;
};

}  // namespace crossdiff::models
