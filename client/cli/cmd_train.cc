// `crossdiff train`: trains a crosscoder on an activation store (DESIGN.md 3.1) and writes
// crosscoder.safetensors + config.json (3.3) and train_metrics.json (3.4) into --out.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "core/comm/launch.h"
#include "core/common/cli_args.h"
#include "core/common/progress.h"
#include "core/crosscoder/sharded_trainer.h"
#include "core/crosscoder/trainer.h"

namespace crossdiff::cli {

int RunTrain(int argc, char** argv) {
  CommandLine cl("crossdiff train", "trains a crosscoder on an activation store");
  auto& store = cl.AddString("activations", "", "activation store directory (DESIGN.md 3.2)", true);
  auto& out = cl.AddString(
      "out", "", "output directory (crosscoder.safetensors, config.json, train_metrics.json)",
      true);
  auto& arch = cl.AddString("arch", "batch-topk", "batch-topk or relu-l1");
  auto& dict_size = cl.AddInt("dict-size", 0, "number of latents F (0: 8 x d_model)");
  auto& k = cl.AddInt("k", 32, "BatchTopK: active latents per token");
  auto& steps = cl.AddInt("steps", 1000, "training steps");
  auto& batch = cl.AddInt("batch", 1024, "tokens per step (global batch)");
  auto& lr = cl.AddDouble("lr", 0, "Adam learning rate (0: 2e-4 / sqrt(F / 16384), at most 1e-3)");
  auto& seed = cl.AddInt("seed", 0, "random seed (initialisation and data order)");
  auto& threads = cl.AddInt("threads", 0, "intra-op threads (0: LibTorch default)");
  auto& warmup = cl.AddInt("warmup-steps", -1, "linear lr warm-up steps (-1: min(1000, steps/20))");
  auto& decay = cl.AddDouble("lr-decay-start", 0.8,
                             "fraction of steps after which lr decays linearly to 0 (>=1: off)");
  auto& clip = cl.AddDouble("grad-clip", 1.0, "max gradient norm (<=0: off)");
  auto& l1 = cl.AddDouble("l1-coeff", 1.0,
                          "ReLU-L1: L1 coefficient lambda (warmed up over 5% of the steps)");
  auto& val = cl.AddDouble("val-fraction", 0.01, "held-out fraction of the store (its last rows)");
  auto& metrics_every = cl.AddInt("metrics-every", 100, "steps between metric records");
  auto& ckpt_every =
      cl.AddInt("checkpoint-every", 0, "steps between checkpoints in OUT/checkpoint (0: none)");
  auto& resume = cl.AddBool("resume", "continue from OUT/checkpoint when it exists");
  auto& dead = cl.AddInt("dead-tokens", 10'000'000,
                         "BatchTopK: tokens without firing after which a latent is dead");
  auto& auxk_alpha = cl.AddDouble("auxk-alpha", 1.0 / 32, "BatchTopK: AuxK loss weight");
  auto& k_initial =
      cl.AddInt("k-initial", 0, "BatchTopK: anneal k from this value (0: no annealing)");
  auto& k_anneal = cl.AddInt("k-anneal-steps", 0, "BatchTopK: steps of k annealing");
  auto& loss = cl.AddString("loss", "l2", "BatchTopK reconstruction term: l2 (||.||_2) or squared");
  auto& dec_norm =
      cl.AddDouble("decoder-init-norm", 0.1, "initial decoder norm per model and latent");
  auto& no_center = cl.AddBool("no-center", "do not subtract the per-model mean");
  auto& shuffle = cl.AddInt("shuffle-buffer", 65536, "rows held by the shuffling reader");
  auto& quiet = cl.AddBool("quiet", "no progress line");
  // Data-parallel training: --nproc N (local ranks) or --rank/--world-size/--rendezvous.
  auto& sharding = cl.AddString("sharding", "data",
                                "with several ranks: data (data parallel) or latent (dict_size / W "
                                "latents per rank)");
  comm::LaunchFlags launch = comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (sharding != "data" && sharding != "latent") {
    std::fprintf(stderr, "error: --sharding: expected data or latent, got '%s'\n", sharding.c_str());
    return 2;
  }
  absl::StatusOr<std::optional<int>> launched = comm::MaybeLaunchLocal(launch);
  if (!launched.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(launched.status().message()).c_str());
    return 1;
  }
  if (launched->has_value()) return **launched;  // this process launched the ranks

  crosscoder::TrainOptions o;
  auto parsed_arch = crosscoder::ParseArchitecture(arch);
  if (!parsed_arch.ok()) {
    std::fprintf(stderr, "error: --arch: %s\n",
                 std::string(parsed_arch.status().message()).c_str());
    return 2;
  }
  o.store_dir = store;
  o.out_dir = out;
  o.arch = *parsed_arch;
  o.dict_size = dict_size;
  o.k = k;
  o.steps = steps;
  o.batch_size = batch;
  o.lr = lr;
  o.seed = static_cast<uint64_t>(seed);
  o.threads = static_cast<int>(threads);
  o.warmup_steps = warmup;
  o.lr_decay_start = decay;
  o.grad_clip = clip;
  o.l1_coeff = l1;
  o.val_fraction = val;
  o.metrics_every = metrics_every;
  o.checkpoint_every = ckpt_every;
  o.resume = resume;
  o.dead_tokens_threshold = dead;
  o.auxk_alpha = auxk_alpha;
  o.k_initial = k_initial;
  o.k_anneal_steps = k_anneal;
  o.batch_top_k_loss = loss;
  o.decoder_init_norm = dec_norm;
  o.center = !no_center;
  o.shuffle_buffer_rows = shuffle;

  absl::StatusOr<std::unique_ptr<comm::Communicator>> comm = comm::ConnectFromFlags(launch);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(comm.status().message()).c_str());
    return 1;
  }
  const bool rank0 = (*comm)->rank() == 0;
  const bool tty = isatty(fileno(stderr)) != 0;
  ProgressMeter::Callback progress;
  if (!quiet && rank0) {
    progress = [tty](const ProgressUpdate& u) {
      const std::string eta = u.eta_s >= 0 ? ProgressMeter::FormatDuration(u.eta_s) : "?";
      std::fprintf(stderr, "%strain: step %lld/%lld  %s  ETA %s%s", tty ? "\r\033[K" : "",
                   static_cast<long long>(u.done), static_cast<long long>(u.total), u.extra.c_str(),
                   u.final ? "0s" : eta.c_str(), tty && !u.final ? "" : "\n");
      std::fflush(stderr);
    };
  }
  auto result = sharding == "latent" ? crosscoder::RunShardedTraining(o, comm->get(), progress)
                                     : crosscoder::RunTraining(o, comm->get(), progress);
  if (!result.ok()) {
    std::fprintf(stderr, "%serror: %s\n", tty ? "\n" : "",
                 std::string(result.status().message()).c_str());
    return 1;
  }
  if (!rank0) return 0;
  std::string fvu;
  for (double f : result->fvu) fvu += absl::StrFormat(" %.4f", f);
  std::printf("trained %lld steps: loss %.5g, fvu%s, l0 %.2f, dead %lld, %.0f tokens/s -> %s\n",
              static_cast<long long>(result->steps), result->final_loss, fvu.c_str(), result->l0,
              static_cast<long long>(result->dead_latents), result->tokens_per_second, out.c_str());
  return 0;
}

}  // namespace crossdiff::cli
