// The BatchTopK step's memory-bound kernels on their own, at the data-parallel benchmark's shape
// (d = 512 x 2 models, dict 8192, k = 32): the exchanged backward every data-parallel rank runs
// over the whole global batch (kernels::SparseBackward), a rank's decode of its half of the batch
// (kernels::SparseDecode), the one-process backward (kernels::InPlaceBackward, forward +
// backward), the one-process step done the data-parallel way instead (decode, then
// SparseBackward: what InPlaceBackward saves its memory against) and Adam over the flat
// parameters. The `_reference_` lines time the earlier forms of SparseBackward (one sweep) and
// SparseDecode (row by row), kept in reference_kernels.cc, on the same data. Random codes: k
// distinct latents per token, drawn with a skewed popularity (latent i about 1 / (i + 64)).
//
//   sparse_backward_bench [--batch 2048] [--dict-size 8192] [--d 512] [--k 32] [--reps 20]
//
// Prints `name ms` lines, the fastest of reps (single thread), and whether each kernel agrees with
// its reference. Run two copies side by side to see what two ranks running the same phase at the
// same moment cost each other.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "bench/crosscoder/reference_kernels.h"
#include "core/common/cli_args.h"
#include "core/common/compute_threads.h"
#include "core/crosscoder/sparse_kernels.h"

namespace {

using namespace crossdiff::crosscoder;

double FastestMs(int64_t reps, const std::function<void()>& fn) {
  fn();  // warm-up: page faults, first-touch
  std::vector<double> ms;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  // The fastest repetition: this machine's noise only ever adds time.
  return *std::min_element(ms.begin(), ms.end());
}

kernels::SparseCodes RandomCodes(int64_t B, int64_t F, int64_t k, std::mt19937& rng) {
  std::vector<double> weight(F);
  for (int64_t i = 0; i < F; ++i) weight[i] = 1.0 / static_cast<double>(i + 64);
  std::discrete_distribution<int32_t> pick(weight.begin(), weight.end());
  std::uniform_real_distribution<float> value(0.1f, 2.0f);
  kernels::SparseCodes c;
  c.row_ptr.push_back(0);
  std::vector<int32_t> row;
  for (int64_t b = 0; b < B; ++b) {
    row.clear();
    while (static_cast<int64_t>(row.size()) < k) {
      const int32_t i = pick(rng);
      if (std::find(row.begin(), row.end(), i) == row.end()) row.push_back(i);
    }
    std::sort(row.begin(), row.end());
    for (int32_t i : row) {
      c.latent.push_back(i);
      c.value.push_back(value(rng));
    }
    c.row_ptr.push_back(static_cast<int64_t>(c.latent.size()));
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("sparse_backward_bench", "BatchTopK backward and Adam kernel times");
  int64_t& B = cl.AddInt("batch", 2048, "tokens (the global batch)");
  int64_t& F = cl.AddInt("dict-size", 8192, "latents");
  int64_t& d = cl.AddInt("d", 512, "d_model per model (2 models)");
  int64_t& k = cl.AddInt("k", 32, "latents per token");
  int64_t& reps = cl.AddInt("reps", 20, "timed repetitions of each kernel");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  crossdiff::SetComputeThreads(1);  // ATen and OpenBLAS pools alike
  const int64_t M = 2, Md = M * d;
  std::mt19937 rng(7);
  kernels::SparseCodes codes = RandomCodes(B, F, k, rng);
  at::manual_seed(7);
  at::Tensor x = at::randn({B, Md});
  at::Tensor g = at::randn({B, Md}).mul_(1e-3);
  at::Tensor dec = at::randn({F, Md}).mul_(0.03);
  at::Tensor b_dec = at::zeros({Md});
  at::Tensor grads = at::zeros({2 * F * Md + F + Md});
  std::vector<double> row_sq(F);
  float* gp = grads.data_ptr<float>();
  std::printf("batch %lld, dict %lld, d %lld x 2 models, k %lld: %lld entries\n",
              static_cast<long long>(B), static_cast<long long>(F), static_cast<long long>(d),
              static_cast<long long>(k), static_cast<long long>(codes.nnz()));

  kernels::LatentEntries entries;
  const double group_ms =
      FastestMs(reps, [&] { kernels::BuildLatentEntries(codes, nullptr, F, &entries); });
  // x laid out as a 2-rank global batch: token t of the gathered codes is row t of x here, as in
  // FactorExchange::XRows() with whole blocks.
  const double exchanged_ms = FastestMs(reps, [&] {
    kernels::SparseBackward(entries, x.data_ptr<float>(), g.data_ptr<float>(), nullptr,
                            dec.data_ptr<float>(), F, Md, gp, gp + F * Md, gp + 2 * F * Md,
                            row_sq.data(), {});
  });
  at::Tensor ref = at::empty({2 * F * Md + F});
  float* rp = ref.data_ptr<float>();
  std::vector<double> ref_sq(F);
  const double one_sweep_ms = FastestMs(reps, [&] {
    reference::OneSweepBackward(entries, x.data_ptr<float>(), g.data_ptr<float>(), nullptr,
                                dec.data_ptr<float>(), F, Md, rp, rp + F * Md, rp + 2 * F * Md,
                                ref_sq.data(), {});
  });
  const double backward_err = (ref - grads.narrow(0, 0, ref.numel())).abs().max().item<double>() /
                              ref.abs().max().item<double>();

  // A rank's decode: the first half of the batch's tokens.
  kernels::SparseCodes half;
  half.row_ptr.assign(codes.row_ptr.begin(), codes.row_ptr.begin() + B / 2 + 1);
  half.latent.assign(codes.latent.begin(), codes.latent.begin() + half.row_ptr.back());
  half.value.assign(codes.value.begin(), codes.value.begin() + half.row_ptr.back());
  at::Tensor xhat = at::empty({B, Md}), xhat_ref = at::empty({B / 2, Md});
  const float* bd = b_dec.data_ptr<float>();
  const double decode_ms = FastestMs(reps, [&] {
    kernels::SparseDecode(half, dec.data_ptr<float>(), Md, bd, xhat.data_ptr<float>());
  });
  const double row_decode_ms = FastestMs(reps, [&] {
    reference::RowByRowDecode(half, dec.data_ptr<float>(), Md, bd, xhat_ref.data_ptr<float>());
  });
  const bool decode_equal = at::equal(xhat.narrow(0, 0, B / 2), xhat_ref);

  kernels::InPlaceBackward in_place;
  kernels::InPlaceBackward::Problem p;
  p.main = &codes;
  p.dec = dec.data_ptr<float>();
  p.b_dec = b_dec.data_ptr<float>();
  p.F = F;
  p.M = M;
  p.d = d;
  at::Tensor xw = x.clone();
  const double in_place_ms = FastestMs(reps, [&] {
    xw.copy_(x);
    in_place.Forward(p, xw.data_ptr<float>(), gp + F * Md, F * Md);
    in_place.Backward(xw.data_ptr<float>(), gp, gp + F * Md, gp + 2 * F * Md, gp + 2 * F * Md + F,
                      row_sq.data());
  });
  // The one-process step the data-parallel way: the residual decoded into a buffer of its own.
  const double decode_then_backward_ms = FastestMs(reps, [&] {
    kernels::SparseDecode(codes, dec.data_ptr<float>(), Md, bd, xhat.data_ptr<float>());
    xhat.sub_(x);
    kernels::BuildLatentEntries(codes, nullptr, F, &entries);
    kernels::SparseBackward(entries, x.data_ptr<float>(), xhat.data_ptr<float>(), nullptr,
                            dec.data_ptr<float>(), F, Md, gp, gp + F * Md, gp + 2 * F * Md,
                            row_sq.data(), {});
  });
  const double copy_ms = FastestMs(reps, [&] { xw.copy_(x); });
  at::Tensor params = at::randn({grads.numel()}).mul_(0.01);
  at::Tensor m = at::zeros_like(params), v = at::zeros_like(params);
  int64_t step = 0;
  const double adam_ms = FastestMs(reps, [&] {
    kernels::AdamUpdate(params.data_ptr<float>(), gp, m.data_ptr<float>(), v.data_ptr<float>(),
                        params.numel(), 1e-4, 0.9, 0.999, 1e-8, 1.0, ++step);
  });
  std::printf("group_by_latent_ms %.2f\n", group_ms);
  std::printf("exchanged_backward_ms %.2f\n", exchanged_ms);
  std::printf("exchanged_backward_reference_one_sweep_ms %.2f (max relative difference %.1e)\n",
              one_sweep_ms, backward_err);
  std::printf("rank_decode_ms %.2f\n", decode_ms);
  std::printf("rank_decode_reference_row_by_row_ms %.2f (%s)\n", row_decode_ms,
              decode_equal ? "bitwise equal" : "DIFFERENT");
  std::printf("in_place_forward_backward_ms %.2f\n", in_place_ms - copy_ms);
  std::printf("decode_then_backward_ms %.2f\n", decode_then_backward_ms);
  std::printf("adam_ms %.2f\n", adam_ms);
  return 0;
}
