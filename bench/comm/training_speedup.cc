// Distributed training speed on this machine: 1 process x 1 thread against 2 processes x 1 thread
// (Gloo over loopback), data-parallel and latent-sharded, on a crosscoder of the size of issue 4
// (d = 512 per model, 2 models, dict 8192) trained on random low-rank activations.
//
//   bench_comm_training [--arch batch-topk|relu-l1] [--d 512] [--dict-size 8192] [--batch 1024]
//                       [--steps 20] [--k 32] [--rounds 1]
//
// Prints, per configuration, tokens/s (training steps after warm-up, as train_metrics.json),
// the speed-up over one process, the bytes each rank sends per step (ring model, see
// docs/distributed.md), the milliseconds rank 0 spends blocked in collectives per step (transfer
// and waiting for the other rank) and the training state (parameters, gradients, Adam moments) per
// rank.
#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/comm/launch.h"
#include "core/comm/local_launcher.h"
#include "core/common/cli_args.h"
#include "core/crosscoder/batch_source.h"
#include "core/crosscoder/sharded_trainer.h"
#include "core/crosscoder/trainer.h"

namespace {

// Activations of rank 64 per model plus noise: enough structure for a realistic sparsity pattern.
at::Tensor RandomRows(int64_t n, int64_t d, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor basis = at::randn({64, 2 * d}, gen);
  at::Tensor codes = at::randn({n, 64}, gen).relu_();
  return (at::mm(codes, basis) + 0.1 * at::randn({n, 2 * d}, gen)).view({n, 2, d});
}

// One rank: trains and, on rank 0, prints "RESULT key=value ...".
int RunRank(const crossdiff::comm::LaunchFlags& launch, const std::string& arch,
            const std::string& sharding, int64_t d, int64_t dict, int64_t batch, int64_t steps,
            int64_t k, const std::string& out) {
  auto comm = crossdiff::comm::ConnectFromFlags(launch);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", comm.status().ToString().c_str());
    return 1;
  }
  crossdiff::comm::Communicator* c = comm->get();
  auto rows = crossdiff::crosscoder::MakeTensorRowProvider(RandomRows(8 * batch, d, 5), "random");
  crossdiff::crosscoder::TrainOptions o;
  o.store_dir = "random";
  o.out_dir = out + "/" + sharding + "_" + std::to_string(c->world_size());
  o.arch = *crossdiff::crosscoder::ParseArchitecture(arch);
  o.dict_size = dict;
  o.k = k;
  o.steps = steps;
  o.batch_size = batch;
  o.threads = 1;
  o.val_fraction = 0;
  o.metrics_every = steps;
  o.normalization_rows = 4 * batch;
  int64_t first_step = -1, last_step = -1, first_bytes = 0, last_bytes = 0;
  double first_wait = 0, last_wait = 0;
  o.observe_step = [&](const crossdiff::crosscoder::StepObservation& obs) {
    if (first_step < 0) {
      first_step = obs.step;
      first_bytes = c->bytes_communicated();
      first_wait = c->seconds_in_collectives();
    }
    last_step = obs.step;
    last_bytes = c->bytes_communicated();
    last_wait = c->seconds_in_collectives();
  };
  auto result = sharding == "latent"
                    ? crossdiff::crosscoder::RunShardedTrainingOnRows(o, *rows, c, {})
                    : crossdiff::crosscoder::RunTrainingOnRows(o, *rows, c, {});
  if (!result.ok()) {
    std::fprintf(stderr, "error: %s\n", result.status().ToString().c_str());
    return 1;
  }
  const int64_t md = 2 * d;
  const int64_t latents = sharding == "latent" ? dict / c->world_size() : dict;
  const int64_t state_bytes = 4 * 4 * (2 * latents * md + latents + md);
  if (c->rank() == 0) {
    const int64_t steps_seen = std::max<int64_t>(1, last_step - first_step);
    std::printf(
        "RESULT tokens_per_second=%.1f bytes_per_step=%lld comm_ms_per_step=%.2f "
        "state_bytes=%lld\n",
        result->tokens_per_second,
        static_cast<long long>(last_step > first_step ? (last_bytes - first_bytes) / steps_seen
                                                      : 0),
        last_step > first_step ? 1e3 * (last_wait - first_wait) / steps_seen : 0.0,
        static_cast<long long>(state_bytes));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("bench_comm_training", "distributed crosscoder training speed");
  std::string& arch = cl.AddString("arch", "batch-topk", "batch-topk or relu-l1");
  int64_t& d = cl.AddInt("d", 512, "d_model per model");
  int64_t& dict = cl.AddInt("dict-size", 8192, "latents");
  int64_t& batch = cl.AddInt("batch", 1024, "global batch (tokens per step)");
  int64_t& steps = cl.AddInt("steps", 20, "steps per configuration (the first 10% are warm-up)");
  int64_t& k = cl.AddInt("k", 32, "BatchTopK k");
  int64_t& rounds =
      cl.AddInt("rounds", 1,
                "times to run the configurations, interleaved; with more than one the "
                "median speedup of each is printed (each round against its own 1 "
                "process run: the machine's speed drifts)");
  std::string& role = cl.AddString("role", "", "internal: 'rank' for the started processes");
  std::string& sharding = cl.AddString("sharding", "data", "internal: data or latent");
  std::string& out = cl.AddString("out", "", "scratch directory (default: a temporary one)");
  crossdiff::comm::LaunchFlags launch = crossdiff::comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (role == "rank") return RunRank(launch, arch, sharding, d, dict, batch, steps, k, out);

  std::string scratch = out.empty() ? "/tmp/bench_comm_training_" + std::to_string(getpid()) : out;
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return 1;
  exe[n] = '\0';
  struct Config {
    int nproc;
    std::string sharding;
  };
  std::printf(
      "crosscoder %s, d=%lld x 2 models, dict %lld, batch %lld, %lld steps, 1 thread per "
      "process, gloo over 127.0.0.1\n",
      arch.c_str(), static_cast<long long>(d), static_cast<long long>(dict),
      static_cast<long long>(batch), static_cast<long long>(steps));
  std::printf("%-24s %12s %9s %16s %14s %16s\n", "configuration", "tokens/s", "speedup",
              "bytes/step/rank", "comm ms/step", "state MiB/rank");
  std::map<std::string, std::vector<double>> speedups;
  std::vector<std::string> order;
  for (int64_t round = 0; round < std::max<int64_t>(1, rounds); ++round) {
    double base = 0;
    for (const Config& cfg : {Config{1, "data"}, Config{2, "data"}, Config{2, "latent"}}) {
      crossdiff::comm::LocalLaunchSpec spec;
      spec.executable = exe;
      spec.args = {"--role",
                   "rank",
                   "--sharding",
                   cfg.sharding,
                   "--arch",
                   arch,
                   "--d",
                   std::to_string(d),
                   "--dict-size",
                   std::to_string(dict),
                   "--batch",
                   std::to_string(batch),
                   "--steps",
                   std::to_string(steps),
                   "--k",
                   std::to_string(k),
                   "--out",
                   scratch,
                   "--comm-timeout",
                   "600"};
      spec.nproc = cfg.nproc;
      std::map<std::string, double> values;
      std::string errors;
      spec.on_line = [&](int rank, bool is_stderr, const std::string& line) {
        if (!is_stderr && line.rfind("RESULT ", 0) == 0) {
          for (absl::string_view kv : absl::StrSplit(line.substr(7), ' ')) {
            std::vector<std::string> p = absl::StrSplit(kv, '=');
            double v = 0;
            if (p.size() == 2 && absl::SimpleAtod(p[1], &v)) values[p[0]] = v;
          }
        } else if (line.find("error") != std::string::npos) {
          errors += "[rank " + std::to_string(rank) + "] " + line + "\n";
        }
      };
      auto result = crossdiff::comm::RunLocalRanks(spec);
      const std::string name = std::to_string(cfg.nproc) + " proc, " +
                               (cfg.sharding == "data" ? "data-parallel" : "latent-sharded");
      if (!result.ok() || result->failed_rank >= 0 || values.empty()) {
        std::printf("%-24s failed: %s\n%s", name.c_str(),
                    result.ok() ? result->failure.c_str() : result.status().ToString().c_str(),
                    errors.c_str());
        continue;
      }
      const double tps = values["tokens_per_second"];
      if (cfg.nproc == 1) base = tps;
      std::printf("%-24s %12.1f %8.2fx %16.0f %14.1f %16.1f\n", name.c_str(), tps,
                  base > 0 ? tps / base : 0, values["bytes_per_step"], values["comm_ms_per_step"],
                  values["state_bytes"] / (1 << 20));
      std::fflush(stdout);
      if (speedups.find(name) == speedups.end()) order.push_back(name);
      if (base > 0) speedups[name].push_back(tps / base);
    }
  }
  if (rounds > 1) {
    for (const std::string& name : order) {
      std::vector<double> v = speedups[name];
      if (v.empty()) continue;
      std::sort(v.begin(), v.end());
      const double median =
          v.size() % 2 == 1 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
      std::printf("median of %zu rounds: %-24s %.2fx (%.2f-%.2fx)\n", v.size(), name.c_str(),
                  median, v.front(), v.back());
    }
  }
  std::string cleanup = "rm -rf '" + scratch + "'";
  if (out.empty()) (void)!system(cleanup.c_str());
  return 0;
}
