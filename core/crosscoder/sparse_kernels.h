// CPU kernels of the BatchTopK training step: exact batch-level selection, sparse decode, the
// per-latent backward pass and Adam on flat buffers. Internal to crossdiff_crosscoder.
//
// All kernels work on contiguous row-major F32 buffers, parallelise with at::parallel_for over
// fixed work units (so results do not depend on the number of threads' scheduling) and allocate
// only inside the reusable structures passed to them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::crosscoder::kernels {

// Sums an I64 tensor-like buffer across ranks in place (identity for a single process).
using AllReduceI64 = std::function<absl::Status(std::vector<int64_t>&)>;

struct Selection {
  float threshold = 0;             // the kth largest score over all ranks (the smallest kept score)
  bool keep_all_positive = false;  // fewer than kth positive scores: every positive score is kept
  int64_t positive = 0;            // positive scores over all ranks
  // SelectAndGather: the candidates (scores reaching the guess) over all ranks, -1 without a guess;
  // and whether the exact selection over every score ran (no guess, or too few candidates).
  int64_t candidates = -1;
  bool exact_fallback = false;
};

// The [B, F] pre-activations of a batch, held whole or computed chunk by chunk into a buffer of
// chunk_rows rows, so that the memory they take does not grow with the batch. The kernels below
// visit the chunks in row order; a chunked batch computes a chunk again at each visit unless it is
// its only chunk (then it is computed once, at the first visit).
class PreActivations {
 public:
  // Writes the pre-activations of rows [b0, b1) to `rows` ([b1 - b0, F], row-major).
  using Fill = std::function<void(int64_t b0, int64_t b1, float* rows)>;
  static PreActivations Whole(const float* pre, int64_t B, int64_t F) {
    PreActivations p;
    p.data_ = const_cast<float*>(pre);
    p.B_ = B;
    p.F_ = F;
    p.chunk_ = std::max<int64_t>(B, 1);
    return p;
  }
  static PreActivations Chunked(int64_t B, int64_t F, int64_t chunk_rows, float* buffer,
                                Fill fill) {
    PreActivations p;
    p.data_ = buffer;
    p.B_ = B;
    p.F_ = F;
    p.chunk_ = std::max<int64_t>(1, std::min(chunk_rows, B));
    p.fill_ = std::move(fill);
    return p;
  }
  int64_t rows() const { return B_; }
  int64_t cols() const { return F_; }
  int64_t chunk_rows() const { return chunk_; }
  int64_t chunks() const { return (B_ + chunk_ - 1) / chunk_; }
  int64_t fills() const { return fills_; }  // chunks computed so far
  // fn(const float* chunk_rows_data, int64_t b0, int64_t b1) for each chunk, in row order.
  template <class Fn>
  void ForEachChunk(Fn&& fn) const {
    for (int64_t b0 = 0; b0 < B_; b0 += chunk_) {
      const int64_t b1 = std::min(B_, b0 + chunk_);
      if (!fill_) {
        fn(static_cast<const float*>(data_ + b0 * F_), b0, b1);
        continue;
      }
      if (held_ != b0) {
        fill_(b0, b1, data_);
        held_ = b0;
        ++fills_;
      }
      fn(static_cast<const float*>(data_), b0, b1);
    }
  }

 private:
  PreActivations() = default;
  float* data_ = nullptr;
  int64_t B_ = 0, F_ = 0, chunk_ = 1;
  Fill fill_;
  mutable int64_t held_ = -1, fills_ = 0;
};

// Finds, exactly, the kth largest score s[b,i] = max(pre[b,i], 0) * w[i] over the batches of all
// ranks (radix selection on the float bit patterns with all-reduced histograms: three rounds of
// 2048 buckets, so the communication is ~48 KiB whatever the batch). Two visits of the chunks.
absl::StatusOr<Selection> SelectKthScore(const PreActivations& pre, const float* w, int64_t kth,
                                         const AllReduceI64& allreduce);

struct SparseCodes;

// AuxK's request: per token the k largest positive pre-activations among the `dead` latents.
struct AuxRequest {
  const std::vector<int32_t>* dead = nullptr;
  int64_t k = 0;
  SparseCodes* out = nullptr;
};

// Several ranks: every rank's candidate keys in one all-gather of fixed-size blocks (the block
// `mine` has the same size on every rank; `all` receives the ranks' blocks in rank order).
struct KeyExchange {
  int64_t capacity = 0;  // keys a rank sends; more candidates than this make every rank fall back
  std::function<absl::Status(const std::vector<uint32_t>& mine, std::vector<uint32_t>* all)>
      all_gather;
};

// SelectKthScore + GatherSelected in (usually) one visit of the chunks: entries whose score reaches
// `guess` (e.g. a fraction of the previous step's threshold) are collected once, and when there are
// at least kth of them over all ranks the exact kth largest score is found among those candidates
// alone: by radix selection over all-reduced histograms (three collectives), or with `keys` from
// one all-gather of every rank's candidate keys (when a rank's candidates overflow the key
// capacity, by the radix selection among them instead). Otherwise (no guess, or the guess was too
// high) falls back to the full selection (three more visits when the batch has several chunks).
// Same result on every path. The collectives are issued identically on every rank. `aux` (optional)
// is gathered during the first visit.
absl::StatusOr<Selection> SelectAndGather(const PreActivations& pre, const float* w, int64_t kth,
                                          float guess, const AllReduceI64& allreduce,
                                          SparseCodes* out, const AuxRequest* aux = nullptr,
                                          const KeyExchange* keys = nullptr);

// Sparse codes, CSR by token: entries of token b are [row_ptr[b], row_ptr[b+1]).
struct SparseCodes {
  std::vector<int64_t> row_ptr;
  std::vector<int32_t> latent;
  std::vector<float> value;
  int64_t nnz() const { return row_ptr.empty() ? 0 : row_ptr.back(); }
};

// Keeps relu(pre[b,i]) where s[b,i] >= selection.threshold (or s > 0 with keep_all_positive).
void GatherSelected(const PreActivations& pre, const float* w, const Selection& sel,
                    SparseCodes* out);

// AuxK: per token the k_aux largest positive pre-activations among the `dead` latents.
void GatherAuxTopK(const PreActivations& pre, const std::vector<int32_t>& dead, int64_t k_aux,
                   SparseCodes* out);

// out[b] = bias + sum_e value[e] * dec[latent[e]] (bias may be null: zero), the terms of a row
// added in increasing latent order. The decoder is read in order, once per thread, rather than
// row by row (a random read of the decoder per entry).
void SparseDecode(const SparseCodes& codes, const float* dec, int64_t Md, const float* bias,
                  float* out);

// Entries regrouped by latent (CSR by latent), each tagged with its source (0 main, 1 aux) and its
// position in that source's codes. Within a latent the main entries come first, each source's in
// token order.
struct LatentEntries {
  std::vector<int64_t> ptr;
  std::vector<int32_t> token;
  std::vector<float> value;
  std::vector<uint8_t> source;
  std::vector<int32_t> index;
};
void BuildLatentEntries(const SparseCodes& main, const SparseCodes* aux, int64_t F,
                        LatentEntries* out);

// The backward pass through the sparse encoder/decoder, latent by latent in two sweeps (the
// decoder rows and every entry's g_pre, then the encoder rows):
//   g_dec[i]  = sum_e value_e * g_src(e)[token_e]
//   g_pre_e   = <g_src(e)[token_e], dec[i]>
//   g_enc[i]  = sum_e g_pre_e * x[token_e],   g_benc[i] = sum_e g_pre_e
// where g_src is g_main (dL/dxhat) or g_aux (dL/d aux reconstruction). Every row of g_enc, g_dec
// and every g_benc entry is written (zero for latents without entries).
// Where token t's row of x is when x is laid out apart from the gradient rows: row
// (t / block_rows) * rows + t % block_rows; block_rows == 0: row t.
struct RowMap {
  int64_t block_rows = 0;
  int64_t rows = 0;
  int64_t operator()(int64_t t) const {
    return block_rows == 0 ? t : (t / block_rows) * rows + t % block_rows;
  }
};

// x_rows maps tokens to rows of x (default: the same rows as g_main's).
// row_sq (optional, [F]): ||g_enc[i]||^2 + ||g_dec[i]||^2 + g_benc[i]^2, in double, computed while
// the rows are in cache (the gradient norm without another pass over the gradients).
void SparseBackward(const LatentEntries& entries, const float* x, const float* g_main,
                    const float* g_aux, const float* dec, int64_t F, int64_t Md, float* g_enc,
                    float* g_dec, float* g_benc, double* row_sq = nullptr, RowMap x_rows = {});

// The BatchTopK reconstruction loss per (row, model) with e2 = ||xhat_m - x_m||^2 and bm = B * M:
// "mse" adds e2 / bm, "l2" adds sqrt(e2) / bm. LossRowScale is the factor that turns that row's
// residual xhat_m - x_m into dL/dxhat_m.
inline double LossTerm(bool l2, float e2) { return l2 ? std::sqrt(static_cast<double>(e2)) : e2; }
inline float LossRowScale(bool l2, float e2, double bm) {
  if (!l2) return static_cast<float>(2.0 / bm);
  return e2 > 0.f ? static_cast<float>(1.0 / (std::sqrt(static_cast<double>(e2)) * bm)) : 0.f;
}

// The single-process BatchTopK loss and backward with no batch-sized buffer besides the batch x
// itself (SparseDecode + SparseBackward need two more: the reconstruction and, with AuxK, its
// residual fit). Same results as those, up to float rounding (sums run in another order).
//   Forward (token order): decodes each row into a row of scratch, keeps its per-model squared
//     errors, the loss and every entry's dL/dpre; with AuxK, the aux loss and its dL/dpre.
//   Backward: the encoder gradients (the last use of x, latent order), then x := xhat - x, the
//     decoder-bias gradient and the decoder gradients from it; with AuxK, x += the aux
//     reconstruction and the dead latents' decoder rows get its share.
// xhat - x is decoded again in Backward unless Forward is given a stash: memory that is free until
// Backward's encoder gradients are done (the trainer lends the decoder-gradient rows, which the
// encoder gradients do not touch, when they can hold [B, M*d]).
class InPlaceBackward {
 public:
  struct Problem {
    const SparseCodes* main = nullptr;
    const SparseCodes* aux = nullptr;  // AuxK codes; null: no AuxK
    const float* dec = nullptr;        // [F, M*d]
    const float* b_dec = nullptr;      // [M*d]
    int64_t F = 0, M = 0, d = 0;
    bool l2_loss = false;
    double aux_alpha = 0;
  };
  void Forward(const Problem& p, const float* x, float* stash = nullptr, int64_t stash_floats = 0);
  const std::vector<float>& e2() const { return e2_; }  // [B, M]
  double loss() const { return loss_; }
  double aux_loss() const { return aux_loss_; }  // before aux_alpha
  // Gradient rows as in SparseBackward (row_sq may be null); g_bdec [M*d]. Overwrites x.
  void Backward(float* x, float* g_enc, float* g_dec, float* g_benc, float* g_bdec, double* row_sq);

 private:
  Problem p_;
  int64_t B_ = 0;
  std::vector<float> e2_, scale_;        // [B, M]: squared errors, dL/dxhat factors
  std::vector<float> gp_main_, gp_aux_;  // dL/dpre per entry (gp_aux_ before aux_scale_)
  std::vector<double> aux_sums_;         // per group of rows: sum of residuals [M*d], ||fit||^2
  LatentEntries entries_;
  float* stashed_ = nullptr;  // Forward's residual [B, M*d], when it had room
  double loss_ = 0, aux_loss_ = 0, aux_scale_ = 0;
};

// sum x^2 in double.
double SquaredNorm(const float* x, int64_t n);

// out[s] = sum_j x[s * len + j]^2 for each of `segments` consecutive segments (no temporaries).
void SegmentSquaredNorms(const float* x, int64_t segments, int64_t len, float* out);

// torch.optim.Adam's update (no weight decay) with the gradient multiplied by grad_scale; `step`
// counts from 1.
void AdamUpdate(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                double beta2, double eps, double grad_scale, int64_t step);

// A 64-bit FNV-1a hash of the bytes (weights checksum across ranks).
uint64_t HashBytes(const void* data, int64_t nbytes);

}  // namespace crossdiff::crosscoder::kernels
