#include "core/models/causal_lm.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/models/host_allocator.h"
#include "core/models/rope.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::models {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

// Weights laid out for the forward pass: q/k/v fused into one matrix and gate/up into another
// (one GEMM each instead of three / two), every matrix [out, in] so at::linear applies it.
namespace internal {
struct ModelWeights {
  struct Norm {
    at::Tensor weight;  // kRmsNormUnitOffset: holds (1 + w) in float32
    at::Tensor bias;    // LayerNorm only
  };
  struct Layer {
    Norm attn_norm;           // input_layernorm / ln_1
    Norm mlp_norm;            // post_attention_layernorm (Llama) / pre_feedforward_layernorm / ln_2
    Norm post_attn_norm;      // Gemma-2 only: post_attention_layernorm
    Norm post_mlp_norm;       // Gemma-2 only: post_feedforward_layernorm
    at::Tensor qkv_w, qkv_b;  // [(H + 2 KV) * hd, d]
    at::Tensor o_w, o_b;      // [d, H * hd]
    at::Tensor up_w, up_b;    // gated: [2 I, d] = [gate; up]; GPT-2: c_fc [I, d]
    at::Tensor down_w, down_b;  // [d, I]
  };
  at::Tensor embed;      // [V, d]
  at::Tensor positions;  // GPT-2 wpe [P, d]
  std::vector<Layer> layers;
  Norm final_norm;
  at::Tensor lm_head;   // [V, d]; aliases embed when tied
  at::Tensor inv_freq;  // [hd / 2] float32 CPU
  double embed_scale = 1.0;
  // CPU float32: the projection matrices are held as oneDNN (mkldnn) tensors instead, because
  // oneDNN's sgemm runs about 1.7x faster than the generic BLAS that LibTorch links on CPU.
  bool onednn = false;
  bool lm_head_onednn = false;
  // A Load with last_block leaves final_norm and lm_head out (lm_head is then undefined).
  bool has_head() const { return lm_head.defined(); }
};
}  // namespace internal

namespace {

// Reads named tensors from a checkpoint, checks their shapes against config.json and converts
// them to the model's dtype and device. Tensors are read in place from the checkpoint's mapping
// (tensor_io::BorrowTensor) and copied once, into the layout the forward pass keeps: a fused
// q/k/v matrix costs one copy (the concatenation) instead of two, and a oneDNN matrix one instead
// of two.
class WeightReader {
 public:
  WeightReader(const tensor_io::Checkpoint& ckpt, std::string ckpt_path, std::string model_type,
               at::Device device, at::ScalarType dtype, bool onednn)
      : ckpt_(ckpt),
        path_(std::move(ckpt_path)),
        model_type_(std::move(model_type)),
        device_(device),
        dtype_(dtype),
        onednn_(onednn) {}

  bool Contains(const std::string& name) const { return ckpt_.Contains(name); }

  // `name` as stored (CPU, stored dtype), its shape checked. Borrowed: it reads the checkpoint's
  // read-only mapping, so it must be converted or copied (Keep, Matrix, at::cat) before Load
  // returns and never modified in place.
  absl::StatusOr<at::Tensor> Raw(const std::string& name, std::vector<int64_t> shape) const {
    if (!ckpt_.Contains(name)) {
      return absl::NotFoundError(
          absl::StrCat(path_, ": tensor '", name, "' (required by ", model_type_, ") is missing"));
    }
    ASSIGN_OR_RETURN(at::Tensor t, tensor_io::BorrowTensor(ckpt_, name));
    if (t.sizes() != at::IntArrayRef(shape)) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", name, "' has shape ",
                                                     ShapeString(t.sizes()),
                                                     ", config.json implies ", ShapeString(shape)));
    }
    if (!at::isFloatingType(t.scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          path_, ": tensor '", name, "' has non-float dtype ", c10::toString(t.scalar_type())));
    }
    return t;
  }
  // A tensor the model keeps (embeddings, norms, biases), in memory of its own.
  absl::StatusOr<at::Tensor> Get(const std::string& name, std::vector<int64_t> shape) const {
    ASSIGN_OR_RETURN(at::Tensor t, Raw(name, std::move(shape)));
    return Keep(t);
  }
  // A projection matrix [out, in] as the forward pass holds it (see Matrix).
  absl::StatusOr<at::Tensor> GetMatrix(const std::string& name, int64_t out, int64_t in) const {
    ASSIGN_OR_RETURN(at::Tensor t, Raw(name, {out, in}));
    return Matrix(t);
  }
  // Conv1D (GPT-2) stores [in, out]; we keep [out, in].
  absl::StatusOr<at::Tensor> GetTransposedMatrix(const std::string& name, int64_t in,
                                                 int64_t out) const {
    ASSIGN_OR_RETURN(at::Tensor t, Raw(name, {in, out}));
    return Matrix(t.t());
  }
  // `t` (borrowed or not) on the model's device in its dtype, contiguous, in memory of its own.
  at::Tensor Keep(const at::Tensor& t) const {
    at::Tensor kept = t.to(device_, dtype_).contiguous();
    return kept.is_alias_of(t) ? kept.clone() : kept;
  }
  // Projection matrix `t` [out, in] (borrowed or not): a oneDNN tensor when the model uses
  // oneDNN, else as Keep.
  at::Tensor Matrix(const at::Tensor& t) const {
    if (onednn_) return t.to(dtype_).contiguous().to_mkldnn();
    return Keep(t);
  }
  // The concatenation of borrowed tensors along dim 0 (q/k/v, gate/up) as a projection matrix.
  at::Tensor FusedMatrix(std::initializer_list<at::Tensor> parts) const {
    at::Tensor fused = Concatenate(parts);
    return onednn_ ? fused.to_mkldnn() : fused.to(device_);
  }
  // ... and as a bias.
  at::Tensor FusedBias(std::initializer_list<at::Tensor> parts) const {
    return Concatenate(parts).to(device_);
  }
  at::Device device() const { return device_; }

 private:
  const tensor_io::Checkpoint& ckpt_;
  std::string path_;
  std::string model_type_;
  at::Device device_;
  at::ScalarType dtype_;
  bool onednn_;

  // A new CPU tensor in the model dtype (at::cat always writes a fresh one).
  at::Tensor Concatenate(std::initializer_list<at::Tensor> parts) const {
    std::vector<at::Tensor> converted;
    converted.reserve(parts.size());
    for (const at::Tensor& part : parts) converted.push_back(part.to(dtype_));
    return at::cat(converted, 0);
  }
};

absl::StatusOr<internal::ModelWeights::Norm> LoadNorm(const WeightReader& r, const ModelConfig& c,
                                                      const std::string& prefix) {
  internal::ModelWeights::Norm n;
  const int64_t d = c.hidden_size;
  if (c.norm == NormKind::kRmsNormUnitOffset) {
    // HF computes (1 + w.float()) in float32; precomputing it is exact.
    ASSIGN_OR_RETURN(at::Tensor w, r.Raw(prefix + ".weight", {d}));
    n.weight = (w.to(at::kFloat) + 1.0).to(r.device()).contiguous();
    return n;
  }
  ASSIGN_OR_RETURN(n.weight, r.Get(prefix + ".weight", {d}));
  if (c.norm == NormKind::kLayerNorm) {
    ASSIGN_OR_RETURN(n.bias, r.Get(prefix + ".bias", {d}));
  }
  return n;
}

// What a Load reads: blocks 0..blocks-1, and the final norm and the LM head when `head`.
struct LoadScope {
  int64_t blocks = 0;
  bool head = true;
};

// The final norm and the LM head, when the scope asks for them.
absl::Status LoadHead(const WeightReader& r, const ModelConfig& c, const LoadScope& scope,
                      const std::string& final_norm, internal::ModelWeights& w) {
  if (!scope.head) return absl::OkStatus();
  ASSIGN_OR_RETURN(w.final_norm, LoadNorm(r, c, final_norm));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    ASSIGN_OR_RETURN(w.lm_head, r.Get("lm_head.weight", {c.vocab_size, c.hidden_size}));
  }
  return absl::OkStatus();
}

absl::Status LoadGpt2(const WeightReader& r, const ModelConfig& c, const LoadScope& scope,
                      internal::ModelWeights& w) {
  // The original OpenAI checkpoints store names without the "transformer." prefix.
  const std::string p =
      r.Contains("wte.weight") && !r.Contains("transformer.wte.weight") ? "" : "transformer.";
  const int64_t d = c.hidden_size, inner = c.intermediate_size;
  ASSIGN_OR_RETURN(w.embed, r.Get(p + "wte.weight", {c.vocab_size, d}));
  ASSIGN_OR_RETURN(w.positions, r.Get(p + "wpe.weight", {c.max_position_embeddings, d}));
  for (int64_t i = 0; i < scope.blocks; ++i) {
    const std::string lp = absl::StrCat(p, "h.", i, ".");
    internal::ModelWeights::Layer L;
    ASSIGN_OR_RETURN(L.attn_norm, LoadNorm(r, c, lp + "ln_1"));
    ASSIGN_OR_RETURN(L.mlp_norm, LoadNorm(r, c, lp + "ln_2"));
    ASSIGN_OR_RETURN(L.qkv_w, r.GetTransposedMatrix(lp + "attn.c_attn.weight", d, 3 * d));
    ASSIGN_OR_RETURN(L.qkv_b, r.Get(lp + "attn.c_attn.bias", {3 * d}));
    ASSIGN_OR_RETURN(L.o_w, r.GetTransposedMatrix(lp + "attn.c_proj.weight", d, d));
    ASSIGN_OR_RETURN(L.o_b, r.Get(lp + "attn.c_proj.bias", {d}));
    ASSIGN_OR_RETURN(L.up_w, r.GetTransposedMatrix(lp + "mlp.c_fc.weight", d, inner));
    ASSIGN_OR_RETURN(L.up_b, r.Get(lp + "mlp.c_fc.bias", {inner}));
    ASSIGN_OR_RETURN(L.down_w, r.GetTransposedMatrix(lp + "mlp.c_proj.weight", inner, d));
    ASSIGN_OR_RETURN(L.down_b, r.Get(lp + "mlp.c_proj.bias", {d}));
    w.layers.push_back(std::move(L));
  }
  return LoadHead(r, c, scope, p + "ln_f", w);
}

absl::Status LoadLlamaLike(const WeightReader& r, const ModelConfig& c, const LoadScope& scope,
                           internal::ModelWeights& w) {
  const int64_t d = c.hidden_size, hd = c.head_dim, inner = c.intermediate_size;
  const int64_t q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  ASSIGN_OR_RETURN(w.embed, r.Get("model.embed_tokens.weight", {c.vocab_size, d}));
  for (int64_t i = 0; i < scope.blocks; ++i) {
    const std::string lp = absl::StrCat("model.layers.", i, ".");
    internal::ModelWeights::Layer L;
    ASSIGN_OR_RETURN(L.attn_norm, LoadNorm(r, c, lp + "input_layernorm"));
    if (c.sandwich_norms) {
      ASSIGN_OR_RETURN(L.post_attn_norm, LoadNorm(r, c, lp + "post_attention_layernorm"));
      ASSIGN_OR_RETURN(L.mlp_norm, LoadNorm(r, c, lp + "pre_feedforward_layernorm"));
      ASSIGN_OR_RETURN(L.post_mlp_norm, LoadNorm(r, c, lp + "post_feedforward_layernorm"));
    } else {
      ASSIGN_OR_RETURN(L.mlp_norm, LoadNorm(r, c, lp + "post_attention_layernorm"));
    }
    const std::string ap = lp + "self_attn.";
    ASSIGN_OR_RETURN(at::Tensor q, r.Raw(ap + "q_proj.weight", {q_out, d}));
    ASSIGN_OR_RETURN(at::Tensor k, r.Raw(ap + "k_proj.weight", {kv_out, d}));
    ASSIGN_OR_RETURN(at::Tensor v, r.Raw(ap + "v_proj.weight", {kv_out, d}));
    L.qkv_w = r.FusedMatrix({q, k, v});
    if (c.qkv_bias) {
      ASSIGN_OR_RETURN(at::Tensor qb, r.Raw(ap + "q_proj.bias", {q_out}));
      ASSIGN_OR_RETURN(at::Tensor kb, r.Raw(ap + "k_proj.bias", {kv_out}));
      ASSIGN_OR_RETURN(at::Tensor vb, r.Raw(ap + "v_proj.bias", {kv_out}));
      L.qkv_b = r.FusedBias({qb, kb, vb});
    }
    ASSIGN_OR_RETURN(L.o_w, r.GetMatrix(ap + "o_proj.weight", d, q_out));
    if (c.o_bias) {
      ASSIGN_OR_RETURN(L.o_b, r.Get(ap + "o_proj.bias", {d}));
    }
    const std::string mp = lp + "mlp.";
    ASSIGN_OR_RETURN(at::Tensor gate, r.Raw(mp + "gate_proj.weight", {inner, d}));
    ASSIGN_OR_RETURN(at::Tensor up, r.Raw(mp + "up_proj.weight", {inner, d}));
    L.up_w = r.FusedMatrix({gate, up});
    ASSIGN_OR_RETURN(L.down_w, r.GetMatrix(mp + "down_proj.weight", d, inner));
    if (c.mlp_bias) {
      ASSIGN_OR_RETURN(at::Tensor gb, r.Raw(mp + "gate_proj.bias", {inner}));
      ASSIGN_OR_RETURN(at::Tensor ub, r.Raw(mp + "up_proj.bias", {inner}));
      L.up_b = r.FusedBias({gb, ub});
      ASSIGN_OR_RETURN(L.down_b, r.Get(mp + "down_proj.bias", {d}));
    }
    w.layers.push_back(std::move(L));
  }
  return LoadHead(r, c, scope, "model.norm", w);
}

// The checkpoint file of a model directory: the shard index when present, else model.safetensors.
absl::StatusOr<std::string> CheckpointPath(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (const char* name : {"model.safetensors.index.json", "model.safetensors"}) {
    fs::path p = fs::path(model_dir) / name;
    if (fs::exists(p, ec)) return p.string();
  }
  return absl::NotFoundError(absl::StrCat(
      model_dir, ": no model.safetensors or model.safetensors.index.json in the model directory"));
}

// Additive attention mask [B, 1, T, T]: 0 where query i may see key j, the dtype's lowest value
// elsewhere (as transformers does, so a row never becomes all -inf). Key j is visible iff
// j <= i, attention_mask[b, j] != 0 and, with a window W > 0, j > i - W.
at::Tensor AdditiveMask(const at::Tensor& key_ok, int64_t seq_len, int64_t window,
                        at::ScalarType dtype) {
  auto opts = at::TensorOptions().device(key_ok.device());
  at::Tensor idx = at::arange(seq_len, opts.dtype(at::kLong));
  at::Tensor rel = idx.unsqueeze(1) - idx.unsqueeze(0);  // i - j
  at::Tensor allowed = rel.ge(0);
  if (window > 0) allowed.logical_and_(rel.lt(window));
  allowed = allowed.unsqueeze(0).logical_and(key_ok.unsqueeze(1)).unsqueeze(1);  // [B,1,T,T]
  const double lowest = dtype == at::kBFloat16 ? -3.3895313892515355e38
                        : dtype == at::kHalf   ? -65504.0
                        : dtype == at::kDouble ? std::numeric_limits<double>::lowest()
                                               : std::numeric_limits<float>::lowest();
  return at::zeros(allowed.sizes(), opts.dtype(dtype)).masked_fill_(allowed.logical_not(), lowest);
}

// oneDNN serves CPU float32 when LibTorch has it; CROSSDIFF_ONEDNN=0 turns it off (plain
// at::linear).
bool UseOneDnn(at::Device device, at::ScalarType dtype) {
  const char* env = std::getenv("CROSSDIFF_ONEDNN");
  if (env != nullptr && std::string(env) == "0") return false;
  return device.is_cpu() && dtype == at::kFloat && at::hasMKLDNN();
}

}  // namespace

CausalLM::CausalLM(ModelConfig config, std::string model_dir, at::Device device,
                   at::ScalarType dtype, std::unique_ptr<Weights> weights)
    : config_(std::move(config)),
      model_dir_(std::move(model_dir)),
      device_(device),
      dtype_(dtype),
      weights_(std::move(weights)) {}

CausalLM::~CausalLM() = default;

absl::StatusOr<std::unique_ptr<CausalLM>> CausalLM::Load(const std::string& model_dir,
                                                         at::Device device,
                                                         std::optional<at::ScalarType> dtype,
                                                         std::optional<int> last_block) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  if (last_block.has_value() && (*last_block < 0 || *last_block >= config.num_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_dir, ": layer ", *last_block, " is out of range: the model has ",
                     config.num_layers, " blocks (valid layers 0..", config.num_layers - 1, ")"));
  }
  LoadScope scope;
  scope.blocks = last_block.has_value() ? *last_block + 1 : config.num_layers;
  scope.head = !last_block.has_value();
  const at::ScalarType act_dtype = dtype.value_or(device.is_cuda() ? at::kBFloat16 : at::kFloat);
  if (!at::isFloatingType(act_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation dtype must be floating point, got ", c10::toString(act_dtype)));
  }
  if (device.is_cuda() && !at::hasCUDA()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", device.str(), " requested for ", model_dir,
                     " but this LibTorch has no CUDA support or no GPU is visible"));
  }
  if (device.is_cpu()) TuneHostAllocatorForInference();
  ASSIGN_OR_RETURN(std::string ckpt_path, CheckpointPath(model_dir));
  ASSIGN_OR_RETURN(auto ckpt, tensor_io::Checkpoint::Open(ckpt_path));
  auto weights = std::make_unique<Weights>();
  RETURN_IF_ERROR(GuardTorch(absl::StrCat(model_dir, ": loading weights"), [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    weights->onednn = UseOneDnn(device, act_dtype);
    WeightReader reader(*ckpt, ckpt_path, config.model_type, device, act_dtype, weights->onednn);
    if (config.family == ModelFamily::kGpt2) {
      RETURN_IF_ERROR(LoadGpt2(reader, config, scope, *weights));
    } else {
      RETURN_IF_ERROR(LoadLlamaLike(reader, config, scope, *weights));
      weights->inv_freq = RopeInverseFrequencies(config);
    }
    // A tied head stays dense (shared with the embedding; a oneDNN copy would double the largest
    // matrix of the model for an output that harvesting never asks for).
    if (weights->onednn && weights->has_head() && !config.tie_word_embeddings) {
      weights->lm_head_onednn = true;
      weights->lm_head = weights->lm_head.to_mkldnn();
    }
    if (config.scale_embeddings) {
      // transformers multiplies by torch.tensor(sqrt(hidden_size), dtype=activation dtype).
      weights->embed_scale =
          at::scalar_tensor(std::sqrt(static_cast<double>(config.hidden_size)), at::kDouble)
              .to(act_dtype)
              .item<double>();
    }
    return absl::OkStatus();
  }));
  return std::unique_ptr<CausalLM>(
      new CausalLM(std::move(config), model_dir, device, act_dtype, std::move(weights)));
}

namespace {

// The per-forward context shared by every block: masks and RoPE tables are built once.
struct ForwardContext {
  int64_t batch = 0, seq = 0;
  std::map<int64_t, at::Tensor> masks;  // window (0 = global) -> additive mask [B, 1, T, T]
  RopeTables rope;
  // A window at least as long as the sequence changes nothing: such layers share the global mask.
  int64_t EffectiveWindow(const ModelConfig& c, int64_t layer) const {
    const int64_t window = c.SlidingWindow(layer);
    return window >= seq ? 0 : window;
  }
};

// y = x W^T + b for x [..., in]; W is dense [out, in], or a oneDNN tensor when `onednn`.
at::Tensor Project(bool onednn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (!onednn) return b.defined() ? at::linear(x, w, b) : at::linear(x, w);
  const int64_t in = x.size(-1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.size(0);
  at::Tensor x2 = x.reshape({-1, in}).contiguous().to_mkldnn();
  at::Tensor y = b.defined() ? at::mkldnn_linear(x2, w, b) : at::mkldnn_linear(x2, w);
  return y.to_dense().view(out_shape);
}

at::Tensor ApplyNorm(const ModelConfig& c, const internal::ModelWeights::Norm& n,
                     const at::Tensor& x) {
  if (c.norm == NormKind::kLayerNorm) {
    return at::layer_norm(x, {c.hidden_size}, n.weight, n.bias, c.norm_eps);
  }
  // RMSNorm in float32 (as transformers does for every dtype).
  const bool upcast = x.scalar_type() != at::kFloat;
  at::Tensor xf = upcast ? x.to(at::kFloat) : x;
  at::Tensor inv_rms = xf.pow(2).mean(-1, /*keepdim=*/true).add_(c.norm_eps).rsqrt_();
  at::Tensor y = xf * inv_rms;
  if (c.norm == NormKind::kRmsNormUnitOffset) {
    y.mul_(n.weight);  // (1 + w) in float32, then cast (Gemma)
    return upcast ? y.to(x.scalar_type()) : y;
  }
  if (upcast) y = y.to(x.scalar_type());  // Llama: cast first, then multiply in the input dtype
  return y.mul_(n.weight);
}

at::Tensor Activate(Activation a, at::Tensor x) {
  switch (a) {
    case Activation::kSilu:
      return at::silu_(x);
    case Activation::kGeluErf:
      return at::gelu_(x, "none");
    case Activation::kGeluTanh:
      return at::gelu_(x, "tanh");
    case Activation::kRelu:
      return at::relu_(x);
  }
  return x;
}

at::Tensor Attention(const ModelConfig& c, const internal::ModelWeights::Layer& L, int64_t layer,
                     const ForwardContext& ctx, bool onednn, const at::Tensor& x) {
  const int64_t B = ctx.batch, T = ctx.seq, H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim;
  const int64_t groups = H / KV;
  at::Tensor qkv = Project(onednn, x, L.qkv_w, L.qkv_b);
  at::Tensor q = qkv.narrow(2, 0, H * hd).view({B, T, H, hd});
  at::Tensor k = qkv.narrow(2, H * hd, KV * hd).view({B, T, KV, hd});
  at::Tensor v = qkv.narrow(2, (H + KV) * hd, KV * hd).view({B, T, KV, hd});
  if (c.uses_rope) {
    q = ApplyRopeToHeadsFirst(q, ctx.rope);  // [B, H, T, hd]
    k = ApplyRopeToHeadsFirst(k, ctx.rope);  // [B, KV, T, hd]
  } else {
    q = q.permute({0, 2, 1, 3}).contiguous();
    k = k.permute({0, 2, 1, 3});
  }
  double scale = c.attention_scale;
  if (c.scale_attn_by_inverse_layer_idx) scale /= static_cast<double>(layer + 1);
  // The scale is folded into q (T*hd multiplies instead of T*T).
  q.mul_(scale);
  // Grouped-query attention without repeating k/v: the `groups` query heads that share a kv head
  // are stacked along the row dimension, so one batched GEMM serves them all.
  at::Tensor scores =
      at::matmul(q.view({B, KV, groups * T, hd}), k.transpose(-1, -2)).view({B, H, T, T});
  if (c.attn_logit_softcapping > 0) {
    scores.div_(c.attn_logit_softcapping).tanh_().mul_(c.attn_logit_softcapping);
  }
  scores.add_(ctx.masks.at(ctx.EffectiveWindow(c, layer)));
  at::Tensor probs = scores.scalar_type() == at::kFloat
                         ? at::softmax(scores, -1)
                         : at::softmax(scores, -1, at::kFloat).to(scores.scalar_type());
  at::Tensor out = at::matmul(probs.view({B, KV, groups * T, T}), v.permute({0, 2, 1, 3}));
  out = out.view({B, H, T, hd}).permute({0, 2, 1, 3}).reshape({B, T, H * hd});
  return Project(onednn, out, L.o_w, L.o_b);
}

at::Tensor Mlp(const ModelConfig& c, const internal::ModelWeights::Layer& L, bool onednn,
               const at::Tensor& x) {
  at::Tensor up = Project(onednn, x, L.up_w, L.up_b);
  at::Tensor hidden;
  if (c.gated_mlp) {
    const int64_t inner = c.intermediate_size;
    hidden = Activate(c.activation, up.narrow(-1, 0, inner).contiguous());
    hidden.mul_(up.narrow(-1, inner, inner));
  } else {
    hidden = Activate(c.activation, up);
  }
  return Project(onednn, hidden, L.down_w, L.down_b);
}

// One transformer block; returns the new residual stream (a fresh tensor: `h` is not modified,
// so captured hidden states stay valid).
at::Tensor Block(const ModelConfig& c, const internal::ModelWeights::Layer& L, int64_t layer,
                 const ForwardContext& ctx, bool onednn, const at::Tensor& h) {
  at::Tensor attn = Attention(c, L, layer, ctx, onednn, ApplyNorm(c, L.attn_norm, h));
  if (c.sandwich_norms) attn = ApplyNorm(c, L.post_attn_norm, attn);
  at::Tensor h1 = attn.add_(h);
  at::Tensor mlp = Mlp(c, L, onednn, ApplyNorm(c, L.mlp_norm, h1));
  if (c.sandwich_norms) mlp = ApplyNorm(c, L.post_mlp_norm, mlp);
  return mlp.add_(h1);
}

}  // namespace

absl::StatusOr<ForwardResult> CausalLM::Forward(const at::Tensor& input_ids,
                                                const at::Tensor& attention_mask,
                                                const ForwardRequest& req) const {
  const ModelConfig& c = config_;
  const int64_t n_layers = c.num_layers;
  // Which blocks are needed: everything for the full-model outputs, else up to the largest capture.
  const bool needs_all = req.all_hidden_states || req.last_block_output || req.logits;
  int64_t last_block = needs_all ? n_layers - 1 : -1;
  for (int b : req.capture_blocks) {
    if (b < 0 || b >= n_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_dir_, ": layer ", b, " is out of range: the model has ", n_layers,
                       " blocks (valid layers 0..", n_layers - 1, ")"));
    }
    last_block = std::max<int64_t>(last_block, b);
  }
  if (last_block < 0) {
    return absl::InvalidArgumentError("forward request asks for no output");
  }
  const int64_t loaded = static_cast<int64_t>(weights_->layers.size());
  if (last_block >= loaded || (needs_all && !weights_->has_head())) {
    return absl::FailedPreconditionError(
        absl::StrCat(model_dir_, ": the request needs block ", last_block,
                     needs_all ? " and the final norm" : "",
                     ", but the model was loaded up to block ", loaded - 1, " only"));
  }
  if (!input_ids.defined() || input_ids.dim() != 2) {
    return absl::InvalidArgumentError("input_ids must be a [batch, seq] tensor");
  }
  if (input_ids.scalar_type() != at::kLong && input_ids.scalar_type() != at::kInt) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids must be int64 or int32, got ",
                                                   c10::toString(input_ids.scalar_type())));
  }
  if (!attention_mask.defined() || attention_mask.sizes() != input_ids.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention_mask must have the shape of input_ids ", ShapeString(input_ids.sizes()),
        attention_mask.defined() ? absl::StrCat(", got ", ShapeString(attention_mask.sizes()))
                                 : ""));
  }
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (B == 0 || T == 0) return absl::InvalidArgumentError("input_ids is empty");
  if (c.family == ModelFamily::kGpt2 && T > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence length ", T, " exceeds the model's n_positions ", c.max_position_embeddings));
  }

  return GuardTorch(absl::StrCat(model_dir_, ": forward"), [&]() -> absl::StatusOr<ForwardResult> {
    at::NoGradGuard no_grad;
    const Weights& w = *weights_;
    at::Tensor ids = input_ids.to(device_, at::kLong);
    const int64_t min_id = ids.min().item<int64_t>(), max_id = ids.max().item<int64_t>();
    if (min_id < 0 || max_id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("input_ids holds token id ", min_id < 0 ? min_id : max_id,
                       " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    ForwardContext ctx;
    ctx.batch = B;
    ctx.seq = T;
    at::Tensor key_ok = attention_mask.to(device_).ne(0);
    for (int64_t i = 0; i <= last_block; ++i) {
      const int64_t window = ctx.EffectiveWindow(c, i);
      if (!ctx.masks.count(window)) ctx.masks[window] = AdditiveMask(key_ok, T, window, dtype_);
    }
    if (c.uses_rope) ctx.rope = MakeRopeTables(w.inv_freq, T, dtype_, device_);

    ForwardResult result;
    at::Tensor h = at::embedding(w.embed, ids);
    if (c.family == ModelFamily::kGpt2) h.add_(w.positions.narrow(0, 0, T));
    if (c.scale_embeddings) h.mul_(w.embed_scale);
    if (req.all_hidden_states) result.hidden_states.push_back(h);

    std::set<int> captures(req.capture_blocks.begin(), req.capture_blocks.end());
    for (int64_t i = 0; i <= last_block; ++i) {
      h = Block(c, w.layers[i], i, ctx, w.onednn, h);
      ++result.blocks_run;
      if (captures.count(static_cast<int>(i))) result.block_outputs[static_cast<int>(i)] = h;
      if (req.all_hidden_states && i < n_layers - 1) result.hidden_states.push_back(h);
    }
    if (needs_all) {
      if (req.last_block_output) result.last_block_output = h;
      at::Tensor normed = ApplyNorm(c, w.final_norm, h);
      if (req.all_hidden_states) result.hidden_states.push_back(normed);
      if (req.logits) {
        at::Tensor logits =
            Project(w.lm_head_onednn, normed, w.lm_head, at::Tensor()).to(at::kFloat);
        if (c.final_logit_softcapping > 0) {
          logits.div_(c.final_logit_softcapping).tanh_().mul_(c.final_logit_softcapping);
        }
        result.logits = logits;
      }
    }
    return result;
  });
}

absl::StatusOr<at::Tensor> CausalLM::ResidualAfterBlock(const at::Tensor& input_ids,
                                                        const at::Tensor& attention_mask,
                                                        int layer) const {
  ForwardRequest req;
  req.capture_blocks = {layer};
  ASSIGN_OR_RETURN(ForwardResult r, Forward(input_ids, attention_mask, req));
  return r.block_outputs.at(layer);
}

}  // namespace crossdiff::models
