// Benchmark: cost of the truncated forward that harvesting layer L runs (blocks 0..L only) against
// a full forward (every block, final norm and LM head), on the same batches of a tokens dataset.
//
//   truncation_bench --model DIR --data tokens.safetensors --layer 4 --batch 8 --batches 6
//                    --threads 2
// Prints milliseconds per batch for both and their ratio (expected near (L + 1) / num_layers,
// a bit less since the full forward also pays the LM head). Timings on a shared machine are noisy;
// the two variants are interleaved so that load changes hit both, and the ratio is also given for
// the fastest batch of each (the least disturbed by other processes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "core/common/cli_args.h"
#include "core/common/compute_threads.h"
#include "core/data/dataset.h"
#include "core/models/causal_lm.h"

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "error: %s\n", what.c_str());
  return 1;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace crossdiff;
  CommandLine cl("truncation_bench", "truncated (harvest) vs full forward cost");
  auto& model_dir = cl.AddString("model", "", "HF checkpoint directory", true);
  auto& data_path = cl.AddString("data", "", "tokens dataset (.safetensors)", true);
  auto& layer = cl.AddInt("layer", 4, "harvested block");
  auto& batch = cl.AddInt("batch", 8, "sequences per batch");
  auto& batches = cl.AddInt("batches", 6, "timed batches per variant");
  auto& threads = cl.AddInt("threads", 1, "LibTorch threads");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  crossdiff::SetComputeThreads(static_cast<int>(threads));

  auto model = models::CausalLM::Load(model_dir);
  if (!model.ok()) return Fail(std::string(model.status().message()));
  data::DatasetOptions options;
  options.path = data_path;
  options.format = data::DataFormat::kTokens;
  auto reader = data::OpenSequenceReader(options, data::TextEncoder{});
  if (!reader.ok()) return Fail(std::string(reader.status().message()));

  // Batches of token ids (all sequences of a tokens file have the same length here).
  std::vector<at::Tensor> inputs;
  data::TokenSequence seq;
  for (int64_t b = 0; b < batches + 1; ++b) {
    std::vector<int64_t> ids;
    int64_t rows = 0, width = 0;
    while (rows < batch) {
      auto more = (*reader)->Next(&seq);
      if (!more.ok()) return Fail(std::string(more.status().message()));
      if (!*more) break;
      ids.insert(ids.end(), seq.token_ids.begin(), seq.token_ids.end());
      width = seq.length();
      ++rows;
    }
    if (rows < batch) break;
    inputs.push_back(at::tensor(ids, at::kLong).reshape({rows, width}));
  }
  if (inputs.size() < 2) return Fail("dataset too small for the requested batches");

  c10::InferenceMode guard;
  models::ForwardRequest full;
  full.logits = true;
  double truncated_s = 0, full_s = 0;
  double truncated_min = 1e30, full_min = 1e30;
  int64_t tokens = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& ids = inputs[i];
    at::Tensor mask = at::ones_like(ids);
    auto t0 = std::chrono::steady_clock::now();
    auto a = (*model)->ResidualAfterBlock(ids, mask, static_cast<int>(layer));
    if (!a.ok()) return Fail(std::string(a.status().message()));
    const double ta = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    auto f = (*model)->Forward(ids, mask, full);
    if (!f.ok()) return Fail(std::string(f.status().message()));
    const double tf = Seconds(t0);
    if (i == 0) continue;  // warm-up
    truncated_s += ta;
    full_s += tf;
    truncated_min = std::min(truncated_min, ta);
    full_min = std::min(full_min, tf);
    tokens += ids.numel();
  }
  const int64_t n = static_cast<int64_t>(inputs.size()) - 1;
  const int64_t num_layers = (*model)->config().num_layers;
  std::printf("truncated forward (blocks 0..%lld of %lld): %.1f ms/batch, %.0f tokens/s\n",
              static_cast<long long>(layer), static_cast<long long>(num_layers),
              1e3 * truncated_s / n, tokens / truncated_s);
  std::printf("full forward (all blocks + LM head):      %.1f ms/batch, %.0f tokens/s\n",
              1e3 * full_s / n, tokens / full_s);
  std::printf(
      "ratio truncated / full = %.3f (mean), %.3f (fastest batch of each); blocks ratio %.3f\n",
      truncated_s / full_s, truncated_min / full_min,
      static_cast<double>(layer + 1) / static_cast<double>(num_layers));
  return 0;
}
