// Crosscoder training benchmark (bench/crosscoder/run.sh drives it).
//
//   crosscoder_bench make-store --out DIR --d D --rows N [--seed S]
//       writes a synthetic F32 activation store (two models, a planted sparse dictionary + noise)
//   crosscoder_bench train --store DIR --out DIR --dict F --k K --batch B --steps N --threads T
//       trains a BatchTopK crosscoder and prints tokens/s, achieved GFLOP/s and resident memory
//   crosscoder_bench matmul --rows B --inner K --cols F --threads T
//       GFLOP/s of a plain at::mm of that shape (the encoder's product), for comparison
//
// Figures are printed as `key value` lines. The machine may be shared: repeat runs to see the
// noise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

#include "core/activations/store.h"
#include "core/common/cli_args.h"
#include "core/common/compute_threads.h"
#include "core/crosscoder/trainer.h"

namespace {

using namespace crossdiff;

// kB of a /proc/self/status field ("VmRSS", "RssAnon", "VmHWM").
double CpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double WallSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t StatusKb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

int MakeStore(int argc, char** argv) {
  CommandLine cl("crosscoder_bench make-store", "writes a synthetic activation store");
  auto& out = cl.AddString("out", "", "store directory", true);
  auto& d = cl.AddInt("d", 64, "d_model");
  auto& rows = cl.AddInt("rows", 100000, "rows");
  auto& seed = cl.AddInt("seed", 0, "seed");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  activations::StoreWriter::Options o;
  o.models = {"bench-base", "bench-finetune"};
  o.layer = 1;
  o.d_model = d;
  o.dtype = "float32";
  o.rows_per_shard = 32768;
  auto writer = activations::StoreWriter::Create(out, o);
  if (!writer.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(writer.status().message()).c_str());
    return 1;
  }
  at::Generator gen = at::detail::createCPUGenerator(seed);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t features = 4 * d;
  at::Tensor dict = at::randn({features, 2, d}, gen, f32) / std::sqrt(static_cast<double>(d));
  dict.narrow(0, 0, features / 8).select(1, 1).zero_();
  dict.narrow(0, features / 8, features / 8).select(1, 0).zero_();
  const int64_t chunk = 8192;
  for (int64_t a = 0; a < rows; a += chunk) {
    const int64_t n = std::min(chunk, rows - a);
    at::Tensor coef = at::rand({n, features}, gen, f32) *
                      (at::rand({n, features}, gen, f32) < 0.02).to(at::kFloat);
    at::Tensor x =
        at::einsum("nf,fmd->nmd", {coef, dict}) + 0.05 * at::randn({n, 2, d}, gen, f32) + 0.3;
    activations::ActivationBatch b;
    b.activations = x;
    b.token_ids = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    b.sequence_ids = at::arange(a, a + n, at::TensorOptions().dtype(at::kLong));
    b.positions = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
    if (auto s = (*writer)->Append(b); !s.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  auto m = (*writer)->Finish();
  if (!m.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(m.status().message()).c_str());
    return 1;
  }
  std::printf("store %s rows %lld d %lld\n", out.c_str(), static_cast<long long>(rows),
              static_cast<long long>(d));
  return 0;
}

int Train(int argc, char** argv) {
  CommandLine cl("crosscoder_bench train", "trains and reports throughput and memory");
  auto& store = cl.AddString("store", "", "activation store", true);
  auto& out = cl.AddString("out", "", "output directory", true);
  auto& dict = cl.AddInt("dict", 512, "dict size");
  auto& k = cl.AddInt("k", 6, "k");
  auto& batch = cl.AddInt("batch", 1024, "batch");
  auto& steps = cl.AddInt("steps", 200, "steps");
  auto& threads = cl.AddInt("threads", 1, "threads");
  auto& lr = cl.AddDouble("lr", 1e-3, "lr");
  auto& shuffle = cl.AddInt("shuffle-buffer", 8192, "rows in the shuffle window");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  crossdiff::SetComputeThreads(static_cast<int>(threads));
  const int64_t base_anon_kb = StatusKb("RssAnon"), base_rss_kb = StatusKb("VmRSS");
  crosscoder::TrainOptions o;
  o.store_dir = store;
  o.out_dir = out;
  o.dict_size = dict;
  o.k = k;
  o.batch_size = batch;
  o.steps = steps;
  o.threads = static_cast<int>(threads);
  o.lr = lr;
  o.val_fraction = 0;
  o.metrics_every = steps;
  o.shuffle_buffer_rows = shuffle;
  o.normalization_rows = 8192;
  o.observe_batch = false;  // a copy of the batch would count against the memory figure
  int64_t peak_anon_kb = 0, peak_rss_kb = 0, nnz_sum = 0, observed = 0, d_model = 0;
  // Steps 10 .. last, measured between the same point of consecutive steps: wall and CPU time (the
  // CPU figure is the fairer one on a machine shared with other work).
  double cpu0 = 0, wall0 = 0, cpu1 = 0, wall1 = 0;
  int64_t first_timed = -1, last_timed = -1;
  o.observe_step = [&](const crosscoder::StepObservation& obs) {
    if (obs.step == 10) {
      cpu0 = CpuSeconds();
      wall0 = WallSeconds();
      first_timed = obs.step;
    } else if (obs.step > 10) {
      cpu1 = CpuSeconds();
      wall1 = WallSeconds();
      last_timed = obs.step;
    }
    peak_anon_kb = std::max(peak_anon_kb, StatusKb("RssAnon"));
    peak_rss_kb = std::max(peak_rss_kb, StatusKb("VmRSS"));
    nnz_sum += obs.nnz;
    ++observed;
    // Flat parameters: 2 * F * Md + F + Md.
    d_model = (obs.params.numel() - dict) / (2 * dict + 1) / 2;
  };
  auto r = crosscoder::RunTraining(o, nullptr, nullptr);
  if (!r.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  const double Md = 2.0 * d_model, F = static_cast<double>(dict), B = static_cast<double>(batch);
  const double nnz = static_cast<double>(nnz_sum) / std::max<int64_t>(1, observed);
  // FLOPs this implementation executes per step: the dense encoder product, the sparse decode and
  // the sparse backward (decoder grad, encoder-side dot, encoder grad); and the FLOPs of the dense
  // eager formulation (encoder, decoder, and their three backward products).
  const double executed = 2 * B * Md * F + 2 * nnz * Md + 6 * nnz * Md;
  const double dense = 10 * B * Md * F;
  const double steps_per_s = r->tokens_per_second / B;
  const double params = 2 * F * Md + F + Md;
  const double budget_bytes = 4 * (3 * params + 2 * B * Md);
  std::printf("tokens_per_second %.1f\n", r->tokens_per_second);
  if (last_timed > first_timed && first_timed >= 0) {
    const double tokens = B * static_cast<double>(last_timed - first_timed);
    std::printf("tokens_per_wall_second_steps10plus %.1f\n", tokens / (wall1 - wall0));
    std::printf("tokens_per_cpu_second %.1f\n", tokens / (cpu1 - cpu0));
  }
  std::printf("final_loss %.5f\nl0 %.2f\nfvu %.4f %.4f\n", r->final_loss, r->l0,
              r->fvu.size() > 0 ? r->fvu[0] : -1, r->fvu.size() > 1 ? r->fvu[1] : -1);
  std::printf("executed_gflop_per_step %.3f\nexecuted_gflops %.2f\n", executed / 1e9,
              executed * steps_per_s / 1e9);
  if (last_timed > first_timed && first_timed >= 0) {
    std::printf("executed_gflops_per_cpu_second %.2f\n",
                executed * static_cast<double>(last_timed - first_timed) / (cpu1 - cpu0) / 1e9);
  }
  std::printf("dense_equivalent_gflops %.2f\n", dense * steps_per_s / 1e9);
  std::printf("budget_mib %.1f\n", budget_bytes / (1 << 20));
  std::printf("baseline_rss_mib %.1f\nbaseline_anon_mib %.1f\n", base_rss_kb / 1024.0,
              base_anon_kb / 1024.0);
  std::printf("peak_rss_mib %.1f\npeak_anon_mib %.1f\n", peak_rss_kb / 1024.0,
              peak_anon_kb / 1024.0);
  std::printf("training_anon_mib %.1f\nmemory_ratio %.2f\n", (peak_anon_kb - base_anon_kb) / 1024.0,
              (peak_anon_kb - base_anon_kb) * 1024.0 / budget_bytes);
  return 0;
}

int Matmul(int argc, char** argv) {
  CommandLine cl("crosscoder_bench matmul", "GFLOP/s of a plain at::mm");
  auto& rows = cl.AddInt("rows", 1024, "B");
  auto& inner = cl.AddInt("inner", 128, "M*d");
  auto& cols = cl.AddInt("cols", 512, "F");
  auto& threads = cl.AddInt("threads", 1, "threads");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  crossdiff::SetComputeThreads(static_cast<int>(threads));
  at::Tensor a = at::randn({rows, inner}), b = at::randn({cols, inner}),
             c = at::empty({rows, cols});
  for (int i = 0; i < 3; ++i) at::mm_out(c, a, b.t());
  int reps = 0;
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < 2.0 || reps < 5) {
    at::mm_out(c, a, b.t());
    ++reps;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double flops = 2.0 * rows * inner * cols * reps;
  std::printf("matmul_gflops %.2f\n", flops / elapsed / 1e9);
  std::printf("matmul_gflops_per_cpu_second %.2f\n", flops / (CpuSeconds() - cpu0) / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "make-store") return MakeStore(argc - 1, argv + 1);
  if (cmd == "train") return Train(argc - 1, argv + 1);
  if (cmd == "matmul") return Matmul(argc - 1, argv + 1);
  std::fprintf(stderr, "usage: crosscoder_bench make-store|train|matmul --help\n");
  return 2;
}
