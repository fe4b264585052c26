// `crossdiff activations --model DIR --input IN.safetensors --out OUT.safetensors` (DESIGN.md 3.1):
// runs a Hugging Face checkpoint on given token ids and writes every hidden state (HF
// output_hidden_states convention), the last block's raw output and the logits, all float32.
#include <ATen/ATen.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "core/common/cli_args.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/models/causal_lm.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::cli {
namespace {

absl::StatusOr<at::Tensor> ReadIds(const tensor_io::SafetensorsFile& file,
                                   const std::string& name) {
  const tensor_io::TensorInfo* info = file.Find(name);
  if (info == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(file.path(), ": no tensor '", name, "'"));
  }
  if (info->dtype != tensor_io::DType::kI64 && info->dtype != tensor_io::DType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor '", name,
                                                   "' must be I64 or I32, got ",
                                                   std::string(tensor_io::DTypeName(info->dtype))));
  }
  if (info->shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(file.path(), ": tensor '", name, "' must be 2-D [batch, seq]"));
  }
  return tensor_io::LoadTensor(file, *info);
}

absl::Status Run(const std::string& model_dir, const std::string& input, const std::string& out,
                 const std::string& device_name, const std::string& dtype_name) {
  ASSIGN_OR_RETURN(auto file, tensor_io::SafetensorsFile::Open(input));
  ASSIGN_OR_RETURN(at::Tensor ids, ReadIds(*file, "input_ids"));
  at::Tensor mask;
  if (file->Find("attention_mask") != nullptr) {
    ASSIGN_OR_RETURN(mask, ReadIds(*file, "attention_mask"));
    if (mask.sizes() != ids.sizes()) {
      return absl::InvalidArgumentError(
          absl::StrCat(input, ": attention_mask and input_ids differ in shape"));
    }
  } else {
    mask = at::ones_like(ids);
  }
  ASSIGN_OR_RETURN(at::Device device, GuardTorch(absl::StrCat("--device ", device_name),
                                                 [&]() -> absl::StatusOr<at::Device> {
                                                   return at::Device(device_name);
                                                 }));
  std::optional<at::ScalarType> dtype;
  if (dtype_name == "float32") {
    dtype = at::kFloat;
  } else if (dtype_name == "bfloat16") {
    dtype = at::kBFloat16;
  } else if (!dtype_name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be float32 or bfloat16, got '", dtype_name, "'"));
  }
  ASSIGN_OR_RETURN(auto model, models::CausalLM::Load(model_dir, device, dtype));
  models::ForwardRequest req;
  req.all_hidden_states = req.last_block_output = req.logits = true;
  ASSIGN_OR_RETURN(models::ForwardResult result, model->Forward(ids, mask, req));

  tensor_io::SafetensorsWriter writer;
  writer.SetMetadata("model_dir", model_dir);
  writer.SetMetadata("model_type", model->config().model_type);
  RETURN_IF_ERROR(GuardTorch("writing outputs", [&]() -> absl::Status {
    for (size_t i = 0; i < result.hidden_states.size(); ++i) {
      RETURN_IF_ERROR(tensor_io::AddTensor(writer, absl::StrCat("hidden_states.", i),
                                           result.hidden_states[i].to(at::kFloat)));
    }
    RETURN_IF_ERROR(
        tensor_io::AddTensor(writer, "last_block_output", result.last_block_output.to(at::kFloat)));
    return tensor_io::AddTensor(writer, "logits", result.logits.to(at::kFloat));
  }));
  return writer.Write(out);
}

}  // namespace

int RunActivations(int argc, char** argv) {
  CommandLine cl(
      "crossdiff activations",
      "runs a Hugging Face checkpoint on input ids and writes float32 hidden_states.{0..N} "
      "(HF output_hidden_states convention), last_block_output and logits");
  auto& model = cl.AddString("model", "", "model directory (config.json + safetensors)", true);
  auto& input = cl.AddString("input", "",
                             "safetensors file with input_ids [B,T] and attention_mask "
                             "[B,T] (I64; mask 1 = token, right padding)",
                             true);
  auto& out = cl.AddString("out", "", "output safetensors file", true);
  auto& device = cl.AddString("device", "cpu", "cpu or cuda:N");
  auto& dtype = cl.AddString("dtype", "",
                             "activation dtype: float32 (CPU default) or bfloat16 "
                             "(CUDA default)");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  absl::Status status = Run(model, input, out, device, dtype);
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace crossdiff::cli
