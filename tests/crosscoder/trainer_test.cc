// The crosscoder trainer: hand-written gradients against autograd, AuxK, the inference threshold,
// metrics against an independent computation, checkpoints and resume, and bad input.
#include "core/crosscoder/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace crossdiff::crosscoder {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kM = 2, kD = 8, kF = 48, kK = 4;

std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("crosscoder_trainer_test_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// Rows built from a random dictionary of 32 features (shared, base-only, fine-tune-only blocks)
// with sparse non-negative coefficients, an offset and noise: [n, 2, d].
at::Tensor MakeRows(int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t features = 32;
  at::Tensor dict = at::randn({features, kM, kD}, gen, f32);
  dict.narrow(0, 20, 6).select(1, 1).zero_();  // base only
  dict.narrow(0, 26, 6).select(1, 0).zero_();  // fine-tune only
  at::Tensor coef =
      at::rand({n, features}, gen, f32) * (at::rand({n, features}, gen, f32) < 0.1).to(at::kFloat);
  at::Tensor x = at::einsum("nf,fmd->nmd", {coef, dict});
  return x + 0.5 + 0.01 * at::randn({n, kM, kD}, gen, f32);
}

TrainOptions SmallOptions(const std::string& out) {
  TrainOptions o;
  o.out_dir = out;
  o.dict_size = kF;
  o.k = kK;
  o.steps = 30;
  o.batch_size = 64;
  o.lr = 3e-3;
  o.seed = 1;
  o.threads = 1;
  o.metrics_every = 10;
  o.val_fraction = 0.1;
  return o;
}

struct Reference {
  double loss = 0, aux = 0;
  at::Tensor grads;
};

// The training loss recomputed from its definition (DESIGN.md section 4) with autograd.
Reference AutogradReference(const StepObservation& obs, const TrainOptions& o) {
  const int64_t F = kF, Md = kM * kD;
  const int64_t fmd = F * Md;
  at::Tensor p = obs.params.detach().clone();
  at::Tensor enc = p.narrow(0, 0, fmd).view({F, Md}).clone().requires_grad_(true);
  at::Tensor dec = p.narrow(0, fmd, fmd).view({F, Md}).clone().requires_grad_(true);
  at::Tensor benc = p.narrow(0, 2 * fmd, F).clone().requires_grad_(true);
  at::Tensor bdec = p.narrow(0, 2 * fmd + F, Md).clone().requires_grad_(true);
  at::Tensor x = obs.x.detach().clone();
  const int64_t B = x.size(0);
  at::Tensor pre = at::mm(x, enc.t()) + benc;
  at::Tensor act = at::relu(pre);
  at::Tensor norms = dec.view({F, kM, kD}).norm(2, {2});  // [F, M]
  Reference ref;
  at::Tensor total;
  if (o.arch == Architecture::kBatchTopK) {
    at::Tensor w = norms.sum(1).detach();
    at::Tensor mask = BatchTopKMask(act.detach() * w, obs.k * B);
    at::Tensor f = act * mask;
    at::Tensor e = (at::mm(f, dec) + bdec - x).view({B, kM, kD});
    at::Tensor main = o.batch_top_k_loss == "l2" ? e.norm(2, {2}).sum() / double(B * kM)
                                                 : e.pow(2).sum() / double(B * kM);
    total = main;
    ref.loss = main.item<double>();
    at::Tensor dead = obs.tokens_since_fired >= o.dead_tokens_threshold;
    const int64_t n_dead = dead.sum().item<int64_t>();
    if (n_dead > 0) {
      at::Tensor resid = -e.detach().view({B, Md});
      at::Tensor candidates = act.detach().masked_fill(dead.logical_not().unsqueeze(0), -1.0);
      const int64_t k_aux = std::min<int64_t>({o.auxk_k > 0 ? o.auxk_k : Md / 2, n_dead, F});
      at::Tensor idx = std::get<1>(at::topk(candidates, k_aux, 1));
      at::Tensor fa = at::zeros_like(act).scatter(1, idx, act.gather(1, idx));
      at::Tensor ahat = at::mm(fa, dec);
      at::Tensor denom = (resid - resid.mean(0, true)).pow(2).sum();
      at::Tensor aux = (resid - ahat).pow(2).sum() / denom;
      ref.aux = aux.item<double>();
      total = total + o.auxk_alpha * aux;
    }
  } else {
    at::Tensor e = at::mm(act, dec) + bdec - x;
    total = e.pow(2).sum() / double(B) + obs.l1_coeff * (act * norms.sum(1)).sum() / double(B);
    ref.loss = total.item<double>();
  }
  total.backward();
  ref.grads = at::cat({enc.grad().flatten(), dec.grad().flatten(), benc.grad(), bdec.grad()});
  return ref;
}

void ExpectGradientsMatchAutograd(TrainOptions o, const std::string& what, bool expect_aux) {
  auto rows = MakeTensorRowProvider(MakeRows(1024, 3));
  int checked = 0, with_aux = 0;
  o.observe_step = [&](const StepObservation& obs) {
    Reference ref = AutogradReference(obs, o);
    EXPECT_NEAR(obs.loss, ref.loss, 1e-4 * std::max(1.0, std::abs(ref.loss)))
        << what << " step " << obs.step;
    EXPECT_NEAR(obs.aux_loss, ref.aux, 1e-4 * std::max(1.0, ref.aux))
        << what << " step " << obs.step;
    const double scale = ref.grads.abs().max().item<double>();
    const double diff = (obs.grads - ref.grads).abs().max().item<double>();
    EXPECT_LT(diff, 1e-4 * scale + 1e-7) << what << " step " << obs.step << " max |grad| " << scale;
    ++checked;
    if (ref.aux > 0) ++with_aux;
  };
  auto result = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(checked, o.steps);
  if (expect_aux) {
    EXPECT_GT(with_aux, 0) << what;
  } else {
    EXPECT_EQ(with_aux, 0) << what;
  }
}

TEST(TrainerGradientTest, BatchTopKL2MatchesAutograd) {
  TrainOptions o = SmallOptions(TempDir("grad_l2"));
  o.steps = 6;
  ExpectGradientsMatchAutograd(o, "batch_top_k l2", false);
}

TEST(TrainerGradientTest, BatchTopKSquaredWithAuxKMatchesAutograd) {
  TrainOptions o = SmallOptions(TempDir("grad_sq"));
  o.steps = 8;
  o.batch_top_k_loss = "squared";
  o.dead_tokens_threshold = 128;  // two steps without firing make a latent dead
  o.dict_size = kF;
  o.k = 2;
  ExpectGradientsMatchAutograd(o, "batch_top_k squared + auxk", true);
  // A batch no larger than the dictionary: the step keeps its residual in the decoder-gradient rows
  // instead of decoding the batch twice.
  o.out_dir = TempDir("grad_sq_stash");
  o.batch_size = 32;
  o.dead_tokens_threshold = 64;
  ExpectGradientsMatchAutograd(o, "batch_top_k squared + auxk, batch <= dict", true);
}

TEST(TrainerGradientTest, ReluL1MatchesAutograd) {
  TrainOptions o = SmallOptions(TempDir("grad_relu"));
  o.arch = Architecture::kReluL1;
  o.steps = 6;
  o.l1_coeff = 0.5;
  ExpectGradientsMatchAutograd(o, "relu_l1", false);
}

TEST(TrainerTest, AuxKEngagesOnlyWhenLatentsAreDead) {
  auto rows = MakeTensorRowProvider(MakeRows(2048, 4));
  TrainOptions o = SmallOptions(TempDir("auxk"));
  o.steps = 40;
  o.k = 2;
  o.dead_tokens_threshold = 640;                 // dead after 10 steps without firing
  std::vector<std::pair<int64_t, double>> seen;  // (dead latents, aux loss) per step
  o.observe_step = [&](const StepObservation& obs) {
    seen.emplace_back((obs.tokens_since_fired >= o.dead_tokens_threshold).sum().item<int64_t>(),
                      obs.aux_loss);
  };
  auto result = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  int dead_steps = 0;
  for (size_t s = 0; s < seen.size(); ++s) {
    if (s < 10) {
      EXPECT_EQ(seen[s].first, 0) << "nothing can be dead before 640 tokens";
    }
    if (seen[s].first == 0) {
      EXPECT_EQ(seen[s].second, 0.0) << "step " << s;
    } else {
      EXPECT_GT(seen[s].second, 0.0) << "step " << s;
      ++dead_steps;
    }
  }
  EXPECT_GT(dead_steps, 0) << "the test needs some dead latents (k=2 of 48)";
}

TEST(TrainerTest, KAnnealingSelectsKTimesBOverTheBatch) {
  auto rows = MakeTensorRowProvider(MakeRows(2048, 10));
  TrainOptions o = SmallOptions(TempDir("anneal"));
  o.steps = 20;
  o.k_initial = 16;
  o.k_anneal_steps = 10;
  std::vector<std::pair<int64_t, int64_t>> seen;  // (k, active pairs)
  o.observe_step = [&](const StepObservation& obs) { seen.emplace_back(obs.k, obs.nnz); };
  auto result = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(seen.size(), 20u);
  EXPECT_EQ(seen[0].first, 16);
  EXPECT_EQ(seen[5].first, 10);
  for (size_t s = 10; s < seen.size(); ++s) EXPECT_EQ(seen[s].first, kK);
  for (size_t s = 1; s < seen.size(); ++s) EXPECT_LE(seen[s].first, seen[s - 1].first);
  // The batch-level selection keeps exactly k * B (token, latent) pairs (no ties in random data).
  for (const auto& [k, nnz] : seen) EXPECT_EQ(nnz, k * o.batch_size);
}

TEST(TrainerTest, MetricsAgreeWithAnIndependentComputation) {
  const std::string out = TempDir("metrics");
  at::Tensor data = MakeRows(2000, 5);
  auto rows = MakeTensorRowProvider(data);
  TrainOptions o = SmallOptions(out);
  o.steps = 300;
  o.batch_size = 128;
  o.val_fraction = 0.2;
  o.val_max_rows = 400;
  auto result = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();

  // Recompute FVU and L0 on the held-out rows from the written checkpoint, by the equations.
  auto cc = Crosscoder::Load(out);
  ASSERT_TRUE(cc.ok()) << cc.status();
  at::Tensor val = data.narrow(0, 1600, 400);
  at::Tensor xn =
      (val - cc->activation_mean().unsqueeze(0)) * cc->activation_scale().view({1, kM, 1});
  at::Tensor pre = at::einsum("bmd,mdf->bf", {xn, cc->W_enc()}) + cc->b_enc();
  at::Tensor w = cc->W_dec().norm(2, {2}).sum(0);
  at::Tensor act = at::relu(pre);
  at::Tensor f = act * ((act * w) > cc->threshold()).to(at::kFloat);
  at::Tensor xhat = at::einsum("bf,mfd->bmd", {f, cc->W_dec()}) + cc->b_dec().unsqueeze(0);
  for (int64_t m = 0; m < kM; ++m) {
    const double err = (xhat.select(1, m) - xn.select(1, m)).pow(2).sum().item<double>();
    const double var =
        (xn.select(1, m) - xn.select(1, m).mean(0, true)).pow(2).sum().item<double>();
    EXPECT_NEAR(result->fvu[m], err / var, 1e-4) << "model " << m;
    EXPECT_LT(result->fvu[m], 0.5) << "the crosscoder should explain most of the variance";
  }
  const double l0 = (f > 0).sum().item<double>() / 400.0;
  EXPECT_NEAR(result->l0, l0, 1e-9);
  // The inference threshold makes L0 close to k.
  EXPECT_NEAR(result->l0, double(kK), 0.3 * kK);

  // train_metrics.json (contract 3.4).
  std::ifstream in(out + "/train_metrics.json");
  nlohmann::json j = nlohmann::json::parse(in);
  for (const char* field :
       {"tokens_per_second", "steps", "batch_size", "final_loss", "fvu", "l0", "dead_latents"}) {
    EXPECT_TRUE(j.contains(field)) << field;
  }
  EXPECT_EQ(j["steps"], 300);
  EXPECT_EQ(j["batch_size"], 128);
  EXPECT_GT(j["tokens_per_second"].get<double>(), 0);
  EXPECT_EQ(j["fvu"].size(), 2u);
  std::filesystem::remove_all(out);
}

TEST(TrainerTest, ResumeEndsWithTheWeightsOfAnUninterruptedRun) {
  auto rows = MakeTensorRowProvider(MakeRows(3000, 6));
  const std::string full = TempDir("full"), parts = TempDir("parts");
  TrainOptions o = SmallOptions(full);
  o.steps = 40;
  o.checkpoint_every = 10;
  o.dead_tokens_threshold = 256;  // exercise the dead-latent counters and AuxK across the resume
  o.shuffle_buffer_rows = 1024;   // several shuffle windows
  auto a = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(a.ok()) << a.status();

  o.out_dir = parts;
  o.stop_after_step = 17;
  auto b1 = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(b1.ok()) << b1.status();
  EXPECT_TRUE(b1->interrupted);
  EXPECT_TRUE(std::filesystem::exists(parts + "/checkpoint/trainer_state.safetensors"));
  o.stop_after_step = 0;
  o.resume = true;
  auto b2 = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(b2.ok()) << b2.status();
  EXPECT_EQ(b2->steps, 40);

  auto wa = Crosscoder::Load(full);
  auto wb = Crosscoder::Load(parts);
  ASSERT_TRUE(wa.ok() && wb.ok());
  EXPECT_TRUE(at::equal(wa->W_enc(), wb->W_enc()));
  EXPECT_TRUE(at::equal(wa->W_dec(), wb->W_dec()));
  EXPECT_TRUE(at::equal(wa->b_enc(), wb->b_enc()));
  EXPECT_TRUE(at::equal(wa->b_dec(), wb->b_dec()));
  EXPECT_EQ(wa->threshold(), wb->threshold());
  EXPECT_EQ(a->dead_latents, b2->dead_latents);
  EXPECT_EQ(a->history.size(), b2->history.size());

  // A checkpoint of another size or architecture is rejected.
  TrainOptions other = o;
  other.dict_size = 2 * kF;
  auto bad = RunTrainingOnRows(other, *rows, nullptr, nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("dict_size is 48 but this run has 96"));
  other = o;
  other.arch = Architecture::kReluL1;
  bad = RunTrainingOnRows(other, *rows, nullptr, nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("architecture is batch_top_k but this run has relu_l1"));
  other = o;
  other.batch_size = 32;
  bad = RunTrainingOnRows(other, *rows, nullptr, nullptr);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("batch_size is 64"));
  std::filesystem::remove_all(full);
  std::filesystem::remove_all(parts);
}

TEST(TrainerTest, SameSeedSameWeights) {
  auto rows = MakeTensorRowProvider(MakeRows(1000, 7));
  const std::string first = TempDir("det1"), second = TempDir("det2");
  TrainOptions o = SmallOptions(first);
  o.arch = Architecture::kReluL1;
  auto a = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  o.out_dir = second;
  auto b = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  auto wa = Crosscoder::Load(first);
  auto wb = Crosscoder::Load(second);
  ASSERT_TRUE(wa.ok() && wb.ok());
  EXPECT_TRUE(at::equal(wa->W_enc(), wb->W_enc()));
  EXPECT_TRUE(at::equal(wa->W_dec(), wb->W_dec()));
}

void ExpectInvalid(const TrainOptions& o, const at::Tensor& data, const std::string& substr) {
  auto rows = MakeTensorRowProvider(data, "rows.bin");
  auto r = RunTrainingOnRows(o, *rows, nullptr, nullptr);
  ASSERT_FALSE(r.ok()) << substr;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(substr));
}

TEST(TrainerBadInputTest, RejectsBadStoresAndOptions) {
  TrainOptions o = SmallOptions(TempDir("bad"));
  at::Tensor good = MakeRows(256, 8);
  ExpectInvalid(o, at::empty({0, 2, kD}), "holds no rows");
  ExpectInvalid(o, good.narrow(1, 0, 1), "holds 1 model; a crosscoder needs at least 2");
  TrainOptions bad = o;
  bad.dict_size = -4;
  ExpectInvalid(bad, good, "dict_size must be in [1, 16777216], got -4");
  bad.dict_size = int64_t{1} << 25;
  ExpectInvalid(bad, good, "dict_size must be in");
  bad = o;
  bad.k = 0;
  ExpectInvalid(bad, good, "k must be in [1, dict_size=48], got 0");
  bad.k = kF + 1;
  ExpectInvalid(bad, good, "got 49");
  bad = o;
  bad.batch_size = 0;
  ExpectInvalid(bad, good, "batch_size must be positive");
  std::filesystem::remove_all(o.out_dir);
}

TEST(TrainerBadInputTest, NonFiniteActivationsAreReportedWithTheirRow) {
  TrainOptions o = SmallOptions(TempDir("nan"));
  at::Tensor data = MakeRows(512, 9);
  data[37][1][3] = std::numeric_limits<float>::quiet_NaN();
  ExpectInvalid(o, data, "rows.bin row 37");
  // Outside the normalisation sample: found when the shuffling reader loads its window.
  o.normalization_rows = 16;
  data = MakeRows(4000, 9);
  data[2500][0][0] = std::numeric_limits<float>::infinity();
  o.steps = 200;
  o.val_fraction = 0;
  ExpectInvalid(o, data, "rows.bin row 2500");
  std::filesystem::remove_all(o.out_dir);
}

}  // namespace
}  // namespace crossdiff::crosscoder
