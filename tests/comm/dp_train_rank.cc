// One rank of the distributed training tests and benchmark: trains a crosscoder on planted
// synthetic activations (generated identically on every rank from --data-seed) with the
// communicator of the launch flags, data-parallel (crosscoder::RunTrainingOnRows) or
// latent-sharded (crosscoder::RunShardedTrainingOnRows). Rank 0 writes --out and prints
//   TRAIN_OK steps=S final_loss=L fvu=a,b tokens_per_second=T bytes_per_step=B state_bytes=P
// (state_bytes: this rank's parameters + gradients + Adam moments, in bytes).
//
//   dp_train_rank --arch relu-l1|batch-topk --out DIR [--sharding data|latent --steps 200 ...]
//                 [--stop-after N] [--resume] + launch flags
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/comm/launch.h"
#include "core/common/cli_args.h"
#include "core/crosscoder/batch_source.h"
#include "core/crosscoder/sharded_trainer.h"
#include "core/crosscoder/trainer.h"

namespace {

// Rows [n, 2, d]: each row mixes ~3 of `features` planted directions (some shared by both models,
// some only in one), with exponential magnitudes and a little noise.
at::Tensor PlantedRows(int64_t n, int64_t d, int64_t features, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor dirs = at::randn({features, 2, d}, gen);
  dirs = dirs / dirs.norm(2, {2}, true);
  // A third of the features exist only in the base model, a third only in the fine-tune.
  const int64_t third = features / 3;
  dirs.narrow(0, 0, third).select(1, 1).zero_();
  dirs.narrow(0, third, third).select(1, 0).zero_();
  at::Tensor active = at::rand({n, features}, gen) < (3.0 / static_cast<double>(features));
  at::Tensor magnitude = at::empty({n, features}).exponential_(1.0, gen) * active;
  at::Tensor rows = at::einsum("nf,fmd->nmd", {magnitude, dirs});
  return rows + 0.01 * at::randn({n, 2, d}, gen);
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("dp_train_rank", "one rank of the data-parallel training tests");
  std::string& arch = cl.AddString("arch", "relu-l1", "relu-l1 or batch-topk");
  std::string& out = cl.AddString("out", "", "output directory (rank 0 writes it)", true);
  int64_t& steps = cl.AddInt("steps", 200, "training steps");
  int64_t& batch = cl.AddInt("batch", 256, "global batch (tokens per step)");
  int64_t& d = cl.AddInt("d", 16, "d_model of the planted data");
  int64_t& dict = cl.AddInt("dict-size", 64, "crosscoder latents");
  int64_t& k = cl.AddInt("k", 4, "BatchTopK k");
  int64_t& rows = cl.AddInt("rows", 8192, "planted rows");
  int64_t& features = cl.AddInt("features", 48, "planted features");
  int64_t& seed = cl.AddInt("seed", 7, "training seed");
  int64_t& data_seed = cl.AddInt("data-seed", 11, "planted data seed");
  int64_t& threads = cl.AddInt("threads", 1, "intra-op threads per rank");
  std::string& sharding = cl.AddString("sharding", "data", "data (replicated weights) or latent");
  int64_t& stop_after = cl.AddInt("stop-after", 0, "stop after this many steps with a checkpoint");
  bool& resume = cl.AddBool("resume", "continue from --out/checkpoint");
  int64_t& dead_tokens =
      cl.AddInt("dead-tokens", 10'000'000, "tokens before a latent counts as dead");
  int64_t& metrics_every = cl.AddInt("metrics-every", 50, "steps between metric records");
  int64_t& bucket_floats =
      cl.AddInt("bucket-floats", int64_t{1} << 20, "ReLU-L1 gradient all-reduce bucket (floats)");
  crossdiff::comm::LaunchFlags launch = crossdiff::comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto launched = crossdiff::comm::MaybeLaunchLocal(launch);
  if (!launched.ok()) {
    std::fprintf(stderr, "error: %s\n", launched.status().ToString().c_str());
    return 2;
  }
  if (launched->has_value()) return **launched;

  auto comm = crossdiff::comm::ConnectFromFlags(launch);
  if (!comm.ok()) {
    std::fprintf(stderr, "error: %s\n", comm.status().ToString().c_str());
    return 1;
  }
  auto architecture = crossdiff::crosscoder::ParseArchitecture(arch);
  if (!architecture.ok()) {
    std::fprintf(stderr, "error: --arch: %s\n", architecture.status().ToString().c_str());
    return 2;
  }
  std::unique_ptr<crossdiff::crosscoder::RowProvider> provider =
      crossdiff::crosscoder::MakeTensorRowProvider(
          PlantedRows(rows, d, features, static_cast<uint64_t>(data_seed)), "planted");

  crossdiff::crosscoder::TrainOptions o;
  o.store_dir = "planted";
  o.out_dir = out;
  o.arch = *architecture;
  o.dict_size = dict;
  o.k = k;
  o.steps = steps;
  o.batch_size = batch;
  o.seed = static_cast<uint64_t>(seed);
  o.threads = static_cast<int>(threads);
  o.lr = 1e-3;
  o.l1_coeff = 0.3;
  o.normalization_rows = 4096;
  o.val_fraction = 0.05;
  o.metrics_every = metrics_every;
  o.dead_tokens_threshold = dead_tokens;
  o.stop_after_step = stop_after;
  o.resume = resume;
  o.shuffle_buffer_rows = 4096;
  o.gradient_bucket_floats = bucket_floats;
  // Bytes per training step, measured between the first and last steps' observations (so the
  // normalisation pass and evaluation are not counted).
  crossdiff::comm::Communicator* c = comm->get();
  int64_t first_step = -1, last_step = -1, first_bytes = 0, last_bytes = 0;
  o.observe_step = [&](const crossdiff::crosscoder::StepObservation& obs) {
    if (first_step < 0) {
      first_step = obs.step;
      first_bytes = c->bytes_communicated();
    }
    last_step = obs.step;
    last_bytes = c->bytes_communicated();
  };
  if (sharding != "data" && sharding != "latent") {
    std::fprintf(stderr, "error: --sharding: '%s' is not data or latent\n", sharding.c_str());
    return 2;
  }
  auto result = sharding == "latent"
                    ? crossdiff::crosscoder::RunShardedTrainingOnRows(o, *provider, c, {})
                    : crossdiff::crosscoder::RunTrainingOnRows(o, *provider, c, {});
  // Training state held by this rank: parameters, gradients and two Adam moments (F32).
  const int64_t md = 2 * d;
  const int64_t latents = sharding == "latent" ? dict / c->world_size() : dict;
  const int64_t state_bytes = 4 * 4 * (2 * latents * md + latents + md);
  if (!result.ok()) {
    std::fprintf(stderr, "error: rank %d: %s\n", (*comm)->rank(),
                 result.status().ToString().c_str());
    return 1;
  }
  if ((*comm)->rank() == 0) {
    std::printf(
        "TRAIN_OK steps=%lld final_loss=%.6g fvu=%s tokens_per_second=%.1f "
        "bytes_per_step=%lld state_bytes=%lld\n",
        static_cast<long long>(result->steps), result->final_loss,
        absl::StrJoin(result->fvu, ",").c_str(), result->tokens_per_second,
        static_cast<long long>(
            last_step > first_step ? (last_bytes - first_bytes) / (last_step - first_step) : 0),
        static_cast<long long>(state_bytes));
  }
  return 0;
}
