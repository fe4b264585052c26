// The BatchTopK selection kernels over chunked pre-activations: every chunking, guess and AuxK
// request gives the codes of a brute-force batch-level top-k, and the chunks are computed as often
// as documented (once when the guess holds, again on the exact fallback).
#include "core/crosscoder/sparse_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "core/crosscoder/training_common.h"

namespace crossdiff::crosscoder::kernels {
namespace {

constexpr int64_t kB = 100, kF = 70;

struct Batch {
  std::vector<float> pre, w;
};

Batch MakeBatch(uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor pre = at::randn({kB, kF}, gen);
  at::Tensor w = at::rand({kF}, gen) + 0.5;
  Batch b;
  b.pre.assign(pre.data_ptr<float>(), pre.data_ptr<float>() + kB * kF);
  b.w.assign(w.data_ptr<float>(), w.data_ptr<float>() + kF);
  return b;
}

// (row, latent) of the kth largest scores relu(pre) * w, and the AuxK top-k_aux per row.
std::vector<std::pair<int64_t, int32_t>> Reference(const Batch& b, int64_t kth) {
  std::vector<std::tuple<float, int64_t, int32_t>> all;
  for (int64_t r = 0; r < kB; ++r)
    for (int32_t i = 0; i < kF; ++i) {
      const float p = b.pre[r * kF + i];
      if (p > 0) all.emplace_back(p * b.w[i], r, i);
    }
  std::sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return x > y; });
  std::vector<std::pair<int64_t, int32_t>> out;
  for (int64_t j = 0; j < std::min<int64_t>(kth, all.size()); ++j)
    out.emplace_back(std::get<1>(all[j]), std::get<2>(all[j]));
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::pair<int64_t, int32_t>> Entries(const SparseCodes& c) {
  std::vector<std::pair<int64_t, int32_t>> out;
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(c.row_ptr.size()); ++r)
    for (int64_t e = c.row_ptr[r]; e < c.row_ptr[r + 1]; ++e) out.emplace_back(r, c.latent[e]);
  return out;
}

PreActivations Chunked(const Batch& b, int64_t chunk, std::vector<float>* buffer) {
  buffer->assign(chunk * kF, 0.f);
  return PreActivations::Chunked(
      kB, kF, chunk, buffer->data(), [&b](int64_t b0, int64_t b1, float* rows) {
        std::copy(b.pre.begin() + b0 * kF, b.pre.begin() + b1 * kF, rows);
      });
}

const AllReduceI64 kSingleProcess = [](std::vector<int64_t>&) { return absl::OkStatus(); };

TEST(SelectAndGatherTest, EveryChunkingAndGuessGivesTheBatchTopK) {
  const Batch b = MakeBatch(7);
  const int64_t kth = 4 * kB;
  const auto want = Reference(b, kth);
  ASSERT_EQ(static_cast<int64_t>(want.size()), kth);
  // The exact threshold, to make a guess that holds (below it) and one that does not (above it).
  SparseCodes codes;
  auto whole = PreActivations::Whole(b.pre.data(), kB, kF);
  auto exact = SelectAndGather(whole, b.w.data(), kth, 0.f, kSingleProcess, &codes);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(Entries(codes), want);
  const float threshold = exact->threshold;

  for (int64_t chunk : {kB, int64_t{32}, int64_t{40}, int64_t{7}}) {
    for (float guess : {0.f, 0.7f * threshold, 1.5f * threshold}) {
      SCOPED_TRACE(testing::Message() << "chunk " << chunk << " guess " << guess);
      std::vector<float> buffer;
      auto pre = Chunked(b, chunk, &buffer);
      SparseCodes got;
      auto sel = SelectAndGather(pre, b.w.data(), kth, guess, kSingleProcess, &got);
      ASSERT_TRUE(sel.ok()) << sel.status();
      EXPECT_EQ(sel->threshold, threshold);
      EXPECT_EQ(Entries(got), want);
      for (int64_t r = 0; r < kB; ++r)
        for (int64_t e = got.row_ptr[r]; e < got.row_ptr[r + 1]; ++e)
          EXPECT_EQ(got.value[e], b.pre[r * kF + got.latent[e]]);
      // Visits: one when the guess holds; a failed or absent guess runs the exact selection (two
      // visits, the first shared with the candidates' when there is no guess) and the gather.
      const int64_t chunks = (kB + chunk - 1) / chunk;
      int64_t visits = guess == 0.7f * threshold ? 1 : (guess == 0.f ? 3 : 4);
      if (chunks == 1) visits = 1;
      EXPECT_EQ(pre.fills(), visits * chunks);
    }
  }
}

// One process's key exchange (the all-gather copies the block): with room for every candidate the
// threshold comes from the keys; with less room it comes from the radix selection among the
// candidates; either way without another visit of the scores, and with the exact top-k.
TEST(SelectAndGatherTest, KeyExchangeOverflowSelectsAmongTheCandidates) {
  const Batch b = MakeBatch(9);
  const int64_t kth = 4 * kB;
  const auto want = Reference(b, kth);
  SparseCodes codes;
  auto exact = SelectAndGather(PreActivations::Whole(b.pre.data(), kB, kF), b.w.data(), kth, 0.f,
                               kSingleProcess, &codes);
  ASSERT_TRUE(exact.ok()) << exact.status();
  const float guess = 0.7f * exact->threshold;
  for (int64_t capacity : {int64_t{100000}, kth / 2}) {
    SCOPED_TRACE(testing::Message() << "capacity " << capacity);
    int gathers = 0, reduces = 0;
    KeyExchange keys;
    keys.capacity = capacity;
    keys.all_gather = [&](const std::vector<uint32_t>& mine, std::vector<uint32_t>* all) {
      ++gathers;
      *all = mine;
      return absl::OkStatus();
    };
    const AllReduceI64 counting = [&](std::vector<int64_t>&) {
      ++reduces;
      return absl::OkStatus();
    };
    std::vector<float> buffer;
    auto pre = Chunked(b, 40, &buffer);
    SparseCodes got;
    auto sel = SelectAndGather(pre, b.w.data(), kth, guess, counting, &got, nullptr, &keys);
    ASSERT_TRUE(sel.ok()) << sel.status();
    EXPECT_FALSE(sel->exact_fallback);
    EXPECT_EQ(sel->threshold, exact->threshold);
    EXPECT_EQ(Entries(got), want);
    EXPECT_EQ(pre.fills(), pre.chunks()) << "one visit of the scores";
    EXPECT_EQ(gathers, 1);
    const bool overflow = sel->candidates > capacity;
    EXPECT_EQ(reduces, overflow ? 3 : 0);
    EXPECT_EQ(overflow, capacity == kth / 2) << sel->candidates << " candidates";
  }
}

TEST(SelectAndGatherTest, AuxKIsGatheredDuringTheFirstVisit) {
  const Batch b = MakeBatch(11);
  std::vector<int32_t> dead = {3, 10, 11, 40, 41, 42, 69};
  const int64_t k_aux = 3;
  SparseCodes want_aux;
  GatherAuxTopK(PreActivations::Whole(b.pre.data(), kB, kF), dead, k_aux, &want_aux);
  // Brute force: per row the k_aux largest positive pre-activations among the dead latents.
  for (int64_t r = 0; r < kB; ++r) {
    std::vector<std::pair<float, int32_t>> pos;
    for (int32_t i : dead)
      if (b.pre[r * kF + i] > 0) pos.emplace_back(b.pre[r * kF + i], i);
    std::sort(pos.rbegin(), pos.rend());
    pos.resize(std::min<size_t>(pos.size(), k_aux));
    std::vector<int32_t> expect;
    for (auto& p : pos) expect.push_back(p.second);
    std::sort(expect.begin(), expect.end());
    std::vector<int32_t> got(want_aux.latent.begin() + want_aux.row_ptr[r],
                             want_aux.latent.begin() + want_aux.row_ptr[r + 1]);
    EXPECT_EQ(got, expect) << "row " << r;
  }
  for (int64_t chunk : {kB, int64_t{32}, int64_t{9}}) {
    for (float guess : {0.f, 0.05f}) {
      SCOPED_TRACE(testing::Message() << "chunk " << chunk << " guess " << guess);
      std::vector<float> buffer;
      auto pre = Chunked(b, chunk, &buffer);
      SparseCodes codes, aux;
      AuxRequest request{&dead, k_aux, &aux};
      ASSERT_TRUE(
          SelectAndGather(pre, b.w.data(), 3 * kB, guess, kSingleProcess, &codes, &request).ok());
      EXPECT_EQ(aux.row_ptr, want_aux.row_ptr);
      EXPECT_EQ(aux.latent, want_aux.latent);
      EXPECT_EQ(aux.value, want_aux.value);
    }
  }
}

TEST(SelectAndGatherTest, FewerPositiveScoresThanKKeepsThemAll) {
  Batch b = MakeBatch(3);
  for (float& p : b.pre) p = p > 1.5f ? p : -1.f;  // a few percent positive
  const int64_t positive = std::count_if(b.pre.begin(), b.pre.end(), [](float p) { return p > 0; });
  std::vector<float> buffer;
  auto pre = Chunked(b, 32, &buffer);
  SparseCodes codes;
  auto sel = SelectAndGather(pre, b.w.data(), positive + 10, 0.f, kSingleProcess, &codes);
  ASSERT_TRUE(sel.ok());
  EXPECT_TRUE(sel->keep_all_positive);
  EXPECT_EQ(codes.nnz(), positive);
}

TEST(SparseBackwardTest, RowSquaredNormsAreThoseOfTheGradientRows) {
  const Batch b = MakeBatch(5);
  SparseCodes codes;
  ASSERT_TRUE(SelectAndGather(PreActivations::Whole(b.pre.data(), kB, kF), b.w.data(), 3 * kB, 0.f,
                              kSingleProcess, &codes)
                  .ok());
  LatentEntries entries;
  BuildLatentEntries(codes, nullptr, kF, &entries);
  const int64_t Md = 12;
  at::Generator gen = at::detail::createCPUGenerator(9);
  at::Tensor x = at::randn({kB, Md}, gen), g = at::randn({kB, Md}, gen),
             dec = at::randn({kF, Md}, gen);
  at::Tensor g_enc = at::empty({kF, Md}), g_dec = at::empty({kF, Md}), g_benc = at::empty({kF});
  std::vector<double> row_sq(kF, -1);
  SparseBackward(entries, x.data_ptr<float>(), g.data_ptr<float>(), nullptr, dec.data_ptr<float>(),
                 kF, Md, g_enc.data_ptr<float>(), g_dec.data_ptr<float>(), g_benc.data_ptr<float>(),
                 row_sq.data());
  at::Tensor want = (g_enc.to(at::kDouble).pow(2).sum(1) + g_dec.to(at::kDouble).pow(2).sum(1) +
                     g_benc.to(at::kDouble).pow(2));
  for (int64_t i = 0; i < kF; ++i) EXPECT_NEAR(row_sq[i], want[i].item<double>(), 1e-9) << i;
  EXPECT_GT(want.sum().item<double>(), 0);
}

// Codes with about `per_row` entries per row (some rows none) among `latents` (all of [0, F) when
// empty), as CSR and as the dense [B, F] matrix.
SparseCodes RandomCodes(int64_t B, int64_t F, int per_row, const std::vector<int32_t>& latents,
                        uint64_t seed, at::Tensor* dense) {
  std::mt19937_64 rng(seed);
  SparseCodes c;
  c.row_ptr.assign(1, 0);
  *dense = at::zeros({B, F});
  for (int64_t b = 0; b < B; ++b) {
    const int n = static_cast<int>(rng() % (2 * per_row + 1));  // 0 .. 2 * per_row
    std::vector<int32_t> row;
    for (int j = 0; j < n; ++j) {
      row.push_back(latents.empty() ? static_cast<int32_t>(rng() % F)
                                    : latents[rng() % latents.size()]);
    }
    std::sort(row.begin(), row.end());
    row.erase(std::unique(row.begin(), row.end()), row.end());
    for (int32_t i : row) {
      const float v = 0.1f + static_cast<float>(rng() % 1000) / 500.f;
      c.latent.push_back(i);
      c.value.push_back(v);
      (*dense)[b][i] = v;
    }
    c.row_ptr.push_back(static_cast<int64_t>(c.latent.size()));
  }
  return c;
}

TEST(InPlaceBackwardTest, MatchesTheBatchBackward) {
  const int64_t B = 150, F = 40, M = 2, d = 7, Md = M * d;  // 150 rows: three AuxK row groups
  at::Generator gen = at::detail::createCPUGenerator(21);
  const at::Tensor x0 = at::randn({B, Md}, gen), dec = at::randn({F, Md}, gen),
                   b_dec = at::randn({Md}, gen);
  const std::vector<int32_t> dead = {3, 17, 18, 31, 39};
  for (int variant = 0; variant < 8; ++variant) {
    const bool l2 = variant & 1, with_aux = variant & 2, stash = variant & 4;
    {
      SCOPED_TRACE(testing::Message() << "l2 " << l2 << " aux " << with_aux << " stash " << stash);
      at::Tensor dense, dense_aux;
      const SparseCodes codes = RandomCodes(B, F, 4, {}, 7, &dense);
      const SparseCodes aux = RandomCodes(B, F, 2, dead, 8, &dense_aux);
      const double alpha = 1.0 / 32;
      // The batch formulation: reconstruction, dL/dxhat and AuxK's gradient as tensors.
      at::Tensor err = at::mm(dense, dec) + b_dec - x0;
      at::Tensor e2 = err.view({B, M, d}).pow(2).sum(2);
      TrainOptions o;
      o.batch_top_k_loss = l2 ? "l2" : "mse";
      double loss = 0;
      at::Tensor scale = internal::BatchTopKLoss(o, e2, B, M, &loss);
      at::Tensor gmain = (err.view({B, M, d}) * scale.unsqueeze(2)).reshape({B, Md}).contiguous();
      at::Tensor fit = at::mm(dense_aux, dec) + err;
      const double denom = (err - err.mean(0, true)).to(at::kDouble).pow(2).sum().item<double>();
      at::Tensor gaux = (fit * (2 * alpha / denom)).contiguous();
      LatentEntries entries;
      BuildLatentEntries(codes, with_aux ? &aux : nullptr, F, &entries);
      at::Tensor want_enc = at::empty({F, Md}), want_dec = at::empty({F, Md}),
                 want_benc = at::empty({F});
      std::vector<double> want_sq(F);
      SparseBackward(entries, x0.data_ptr<float>(), gmain.data_ptr<float>(), gaux.data_ptr<float>(),
                     dec.data_ptr<float>(), F, Md, want_enc.data_ptr<float>(),
                     want_dec.data_ptr<float>(), want_benc.data_ptr<float>(), want_sq.data());
      at::Tensor want_bdec = gmain.sum(0);

      InPlaceBackward ip;
      InPlaceBackward::Problem p;
      p.main = &codes;
      p.aux = with_aux ? &aux : nullptr;
      p.dec = dec.data_ptr<float>();
      p.b_dec = b_dec.data_ptr<float>();
      p.F = F;
      p.M = M;
      p.d = d;
      p.l2_loss = l2;
      p.aux_alpha = alpha;
      at::Tensor x = x0.clone();
      // With a stash (room for the residual) Backward copies it instead of decoding again; a
      // stash too small is not used.
      std::vector<float> room(stash ? B * Md : B * Md - 1, 7.f);
      ip.Forward(p, x.data_ptr<float>(), room.data(), static_cast<int64_t>(room.size()));
      if (stash) {
        EXPECT_TRUE(at::allclose(at::from_blob(room.data(), {B, Md}), err, 1e-5, 1e-5));
      } else {
        EXPECT_EQ(room[0], 7.f) << "a stash too small stays untouched";
      }
      EXPECT_NEAR(ip.loss(), loss, 1e-6 * loss);
      if (with_aux) {
        const double want = fit.to(at::kDouble).pow(2).sum().item<double>() / denom;
        EXPECT_NEAR(ip.aux_loss(), want, 1e-5 * want);
      } else {
        EXPECT_EQ(ip.aux_loss(), 0);
      }
      ASSERT_EQ(ip.e2().size(), static_cast<size_t>(B * M));
      EXPECT_TRUE(
          at::allclose(at::from_blob(const_cast<float*>(ip.e2().data()), {B, M}), e2, 1e-5, 1e-6));
      EXPECT_TRUE(at::equal(x, x0)) << "Forward only reads x";
      at::Tensor g_enc = at::full({F, Md}, 7.f), g_dec = at::full({F, Md}, 7.f),
                 g_benc = at::full({F}, 7.f), g_bdec = at::full({Md}, 7.f);
      std::vector<double> sq(F, -1);
      ip.Backward(x.data_ptr<float>(), g_enc.data_ptr<float>(), g_dec.data_ptr<float>(),
                  g_benc.data_ptr<float>(), g_bdec.data_ptr<float>(), sq.data());
      const double tol = 1e-5 * want_dec.abs().max().item<double>();
      EXPECT_LT((g_enc - want_enc).abs().max().item<double>(),
                1e-5 * want_enc.abs().max().item<double>());
      EXPECT_LT((g_dec - want_dec).abs().max().item<double>(), tol);
      EXPECT_LT((g_benc - want_benc).abs().max().item<double>(),
                1e-5 * want_benc.abs().max().item<double>());
      EXPECT_LT((g_bdec - want_bdec).abs().max().item<double>(),
                1e-5 * want_bdec.abs().max().item<double>());
      for (int64_t i = 0; i < F; ++i)
        EXPECT_NEAR(sq[i], want_sq[i], 1e-4 * want_sq[i] + 1e-12) << i;
    }
  }
}

// The backward against the dense formulation, with AuxK entries, a row width that is no multiple
// of a vector's and tokens laid out apart from x's rows.
TEST(SparseBackwardTest, MatchesTheDenseGradients) {
  const int64_t B = 90, F = 33, Md = 135;
  at::Generator gen = at::detail::createCPUGenerator(5);
  at::Tensor dense, dense_aux;
  std::vector<int32_t> main_latents(F);
  std::iota(main_latents.begin(), main_latents.end(), 0);
  main_latents.erase(main_latents.begin() + 20);  // latent 20 gets no entry
  const SparseCodes codes = RandomCodes(B, F, 5, main_latents, 11, &dense);
  const SparseCodes aux = RandomCodes(B, F, 2, {1, 8, 30}, 12, &dense_aux);
  // x holds the batch as two blocks of 45 rows with 5 rows of padding between them.
  const RowMap x_rows{45, 50};
  at::Tensor x_padded = at::randn({100, Md}, gen);
  at::Tensor x = at::cat({x_padded.narrow(0, 0, 45), x_padded.narrow(0, 50, 45)});
  at::Tensor gmain = at::randn({B, Md}, gen), gaux = at::randn({B, Md}, gen),
             dec = at::randn({F, Md}, gen);
  LatentEntries entries;
  BuildLatentEntries(codes, &aux, F, &entries);
  at::Tensor g_enc = at::full({F, Md}, 7.f), g_dec = at::full({F, Md}, 7.f),
             g_benc = at::full({F}, 7.f);
  std::vector<double> row_sq(F, -1);
  SparseBackward(entries, x_padded.data_ptr<float>(), gmain.data_ptr<float>(),
                 gaux.data_ptr<float>(), dec.data_ptr<float>(), F, Md, g_enc.data_ptr<float>(),
                 g_dec.data_ptr<float>(), g_benc.data_ptr<float>(), row_sq.data(), x_rows);
  // g_pre = mask * <g_src, dec_i> per (token, latent), for the main and the aux entries.
  at::Tensor gp_main = (dense != 0).to(at::kFloat) * at::mm(gmain, dec.t());
  at::Tensor gp_aux = (dense_aux != 0).to(at::kFloat) * at::mm(gaux, dec.t());
  at::Tensor want_dec = at::mm(dense.t(), gmain) + at::mm(dense_aux.t(), gaux);
  at::Tensor want_enc = at::mm((gp_main + gp_aux).t(), x);
  at::Tensor want_benc = (gp_main + gp_aux).sum(0);
  auto rel = [](const at::Tensor& got, const at::Tensor& want) {
    return (got - want).abs().max().item<double>() / want.abs().max().item<double>();
  };
  EXPECT_LT(rel(g_dec, want_dec), 1e-5);
  EXPECT_LT(rel(g_enc, want_enc), 1e-5);
  EXPECT_LT(rel(g_benc, want_benc), 1e-5);
  at::Tensor want_sq = g_enc.to(at::kDouble).pow(2).sum(1) + g_dec.to(at::kDouble).pow(2).sum(1) +
                       g_benc.to(at::kDouble).pow(2);
  for (int64_t i = 0; i < F; ++i) {
    EXPECT_NEAR(row_sq[i], want_sq[i].item<double>(), 1e-9 * want_sq[i].item<double>()) << i;
  }
  // A latent without entries gets zero rows (over the 7s they started as).
  EXPECT_EQ(entries.ptr[21], entries.ptr[20]);
  EXPECT_EQ(g_enc[20].abs().max().item<float>(), 0.f);
  EXPECT_EQ(g_dec[20].abs().max().item<float>(), 0.f);
  EXPECT_EQ(g_benc[20].item<float>(), 0.f);
}

// The decode against the dense product, with and without a bias and with rows that have no
// entries; the same bits whatever the number of threads (a row's terms always go in latent order).
TEST(SparseDecodeTest, MatchesTheDenseProductWhateverTheThreads) {
  const int64_t B = 70, F = 50, Md = 37;
  at::Generator gen = at::detail::createCPUGenerator(3);
  at::Tensor dense;
  const SparseCodes codes = RandomCodes(B, F, 3, {}, 17, &dense);  // 0 to 6 entries a row
  int64_t empty_rows = 0;
  for (int64_t b = 0; b < B; ++b) empty_rows += codes.row_ptr[b] == codes.row_ptr[b + 1];
  ASSERT_GT(empty_rows, 0);
  const at::Tensor dec = at::randn({F, Md}, gen), bias = at::randn({Md}, gen);
  const int threads = at::get_num_threads();
  for (const bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    at::Tensor want = at::mm(dense, dec);
    if (with_bias) want += bias;
    std::vector<at::Tensor> got;
    for (int t : {1, 3}) {
      at::set_num_threads(t);
      at::Tensor out = at::full({B, Md}, 7.f);
      SparseDecode(codes, dec.data_ptr<float>(), Md, with_bias ? bias.data_ptr<float>() : nullptr,
                   out.data_ptr<float>());
      got.push_back(out);
    }
    at::set_num_threads(threads);
    EXPECT_LT((got[0] - want).abs().max().item<double>(), 1e-5);
    EXPECT_TRUE(at::equal(got[0], got[1]));
  }
  SparseCodes empty;
  empty.row_ptr.assign(1, 0);
  SparseDecode(empty, dec.data_ptr<float>(), Md, nullptr, nullptr);  // no rows: nothing to write
}

TEST(SelectionGuessTest, KeepsTheCandidatesNearTheSelectedEntries) {
  internal::SelectionGuess g;
  EXPECT_EQ(g.guess(), 0.f);  // no threshold yet: the exact selection
  Selection sel;
  sel.threshold = 2.f;
  sel.candidates = -1;  // that first selection had no guess
  g.Update(sel, 100);
  const double gap0 = g.gap();
  EXPECT_FLOAT_EQ(g.guess(), static_cast<float>(2.0 * (1 - gap0)));
  sel.candidates = 500;  // far too many: tighten
  g.Update(sel, 100);
  EXPECT_LT(g.gap(), gap0);
  const double tight = g.gap();
  sel.candidates = 150;  // within [1.15, 2] x kth: keep
  g.Update(sel, 100);
  EXPECT_EQ(g.gap(), tight);
  sel.candidates = 90;  // fell short (the exact fallback ran): loosen quickly
  g.Update(sel, 100);
  EXPECT_EQ(g.gap(), 2 * tight);
  sel.keep_all_positive = true;  // every positive score kept: no threshold to guess from
  g.Update(sel, 100);
  EXPECT_EQ(g.guess(), 0.f);
}

TEST(SegmentSquaredNormsTest, MatchesASum) {
  std::vector<float> x(6 * 5);
  std::iota(x.begin(), x.end(), -7.f);
  std::vector<float> out(6);
  SegmentSquaredNorms(x.data(), 6, 5, out.data());
  for (int s = 0; s < 6; ++s) {
    float want = 0;
    for (int j = 0; j < 5; ++j) want += x[s * 5 + j] * x[s * 5 + j];
    EXPECT_FLOAT_EQ(out[s], want);
  }
}

}  // namespace
}  // namespace crossdiff::crosscoder::kernels
