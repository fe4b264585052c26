#include "core/crosscoder/sparse_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/crosscoder/vector_clones.h"

namespace crossdiff::crosscoder::kernels {
namespace {

inline uint32_t ScoreKey(float pre, float w) {
  float s = pre > 0.f ? pre * w : 0.f;
  uint32_t k;
  std::memcpy(&k, &s, sizeof k);
  return k;  // non-negative floats order like their bit patterns
}

// Per-thread histograms merged in a fixed order (integer counts: exact whatever the scheduling).
struct Histograms {
  int64_t buckets;
  std::vector<int64_t> data;
  Histograms(int64_t b) : buckets(b), data(static_cast<size_t>(b * at::get_num_threads()), 0) {}
  int64_t* of_thread() { return data.data() + at::get_thread_num() * buckets; }
  std::vector<int64_t> Sum() const {
    std::vector<int64_t> s(buckets, 0);
    for (size_t t = 0; t < data.size(); t += buckets)
      for (int64_t j = 0; j < buckets; ++j) s[j] += data[t + j];
    return s;
  }
};

// Highest bucket j such that the count of entries in buckets >= j reaches `need`; returns the
// count strictly above j in *above.
int64_t FindBucket(const std::vector<int64_t>& hist, int64_t need, int64_t* above) {
  int64_t acc = 0;
  for (int64_t j = static_cast<int64_t>(hist.size()) - 1; j >= 0; --j) {
    if (acc + hist[j] >= need) {
      *above = acc;
      return j;
    }
    acc += hist[j];
  }
  *above = acc;
  return 0;
}

CROSSDIFF_VECTOR_CLONES
void HistogramTop(const float* pre, int64_t F, const float* w, int64_t b0, int64_t b1, int64_t* h) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = pre + b * F;
    for (int64_t i = 0; i < F; ++i) {
      uint32_t k = ScoreKey(row[i], w[i]);
      if (k != 0) ++h[k >> 21];
    }
  }
}

void CollectBucket(const float* pre, int64_t F, const float* w, int64_t b0, int64_t b1,
                   uint32_t top, int64_t* h, std::vector<uint32_t>* keys) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = pre + b * F;
    for (int64_t i = 0; i < F; ++i) {
      uint32_t k = ScoreKey(row[i], w[i]);
      if (k != 0 && (k >> 21) == top) {
        ++h[(k >> 10) & 0x7FF];
        keys->push_back(k);
      }
    }
  }
}

CROSSDIFF_VECTOR_CLONES
void CountKept(const float* pre, int64_t F, const float* w, uint32_t tkey, int64_t b0, int64_t b1,
               int64_t* counts) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = pre + b * F;
    int64_t c = 0;
    for (int64_t i = 0; i < F; ++i) {
      uint32_t k = ScoreKey(row[i], w[i]);
      c += (k != 0 && k >= tkey) ? 1 : 0;
    }
    counts[b] = c;
  }
}

// Row helpers, inlined into the kernels below (each of which gets the vector clones).

#if defined(__GNUC__)
#define CROSSDIFF_INLINE inline __attribute__((always_inline))
#else
#define CROSSDIFF_INLINE inline
#endif

CROSSDIFF_INLINE float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

CROSSDIFF_INLINE float SquaredSum(const float* __restrict x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
  return s;
}

CROSSDIFF_INLINE double SquaredSumDouble(const float* __restrict x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(x[j]) * x[j];
  return s;
}

// y += a * x
CROSSDIFF_INLINE void Axpy(float a, const float* __restrict x, int64_t n, float* __restrict y) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// y (+)= sum_e value[e] * dec[latent[e]] over row b's entries; y = bias + ... unless `add`.
CROSSDIFF_INLINE void DecodeRow(const SparseCodes& c, int64_t b, const float* dec, int64_t Md,
                                const float* bias, bool add, float* __restrict y) {
  if (!add) {
    if (bias != nullptr) {
      std::memcpy(y, bias, sizeof(float) * Md);
    } else {
      std::memset(y, 0, sizeof(float) * Md);
    }
  }
  for (int64_t e = c.row_ptr[b]; e < c.row_ptr[b + 1]; ++e) {
    Axpy(c.value[e], dec + static_cast<int64_t>(c.latent[e]) * Md, Md, y);
  }
}

CROSSDIFF_VECTOR_CLONES float SegmentSquaredNorm(const float* __restrict x, int64_t n) {
  return SquaredSum(x, n);
}

// InPlaceBackward's kernels.

struct InPlaceForwardArgs {
  const SparseCodes* main;
  const SparseCodes* aux;
  const float* dec;
  const float* b_dec;
  const float* x;
  int64_t B, M, d, group_rows;
  bool l2;
  double bm;
  float* e2;
  float* scale;
  float* gp_main;
  float* gp_aux;
  double* aux_sums;  // per group: sum of err [M*d], then ||fit||^2
  float* stash;      // [B, M*d]: where err is kept for Backward, or null
};

// Groups [g0, g1) of rows: err = xhat - x and fit = err + AuxK's reconstruction, one row at a time
// in the scratch rows `err` and `fit` ([M*d] each).
CROSSDIFF_VECTOR_CLONES
void InPlaceForwardRows(const InPlaceForwardArgs& a, int64_t g0, int64_t g1, float* __restrict err,
                        float* __restrict fit) {
  const int64_t M = a.M, d = a.d, Md = M * d;
  const SparseCodes& main = *a.main;
  float* const scratch = err;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = g * a.group_rows; b < std::min(a.B, (g + 1) * a.group_rows); ++b) {
      err = a.stash != nullptr ? a.stash + b * Md : scratch;
      DecodeRow(main, b, a.dec, Md, a.b_dec, false, err);
      const float* __restrict xb = a.x + b * Md;
#pragma omp simd
      for (int64_t j = 0; j < Md; ++j) err[j] -= xb[j];
      for (int64_t m = 0; m < M; ++m) {
        a.e2[b * M + m] = SquaredSum(err + m * d, d);
        a.scale[b * M + m] = LossRowScale(a.l2, a.e2[b * M + m], a.bm);
      }
      for (int64_t e = main.row_ptr[b]; e < main.row_ptr[b + 1]; ++e) {
        const float* di = a.dec + static_cast<int64_t>(main.latent[e]) * Md;
        float gp = 0.f;
        for (int64_t m = 0; m < M; ++m) gp += a.scale[b * M + m] * Dot(err + m * d, di + m * d, d);
        a.gp_main[e] = gp;
      }
      if (a.aux == nullptr) continue;
      // AuxK fits the residual x - xhat = -err: its gradient is 2 alpha (fit + err) / denom.
      double* __restrict sums = a.aux_sums + g * (Md + 1);
#pragma omp simd
      for (int64_t j = 0; j < Md; ++j) sums[j] += err[j];
      std::memcpy(fit, err, sizeof(float) * Md);
      DecodeRow(*a.aux, b, a.dec, Md, nullptr, true, fit);
      sums[Md] += SquaredSumDouble(fit, Md);
      for (int64_t e = a.aux->row_ptr[b]; e < a.aux->row_ptr[b + 1]; ++e) {
        a.gp_aux[e] = Dot(fit, a.dec + static_cast<int64_t>(a.aux->latent[e]) * Md, Md);
      }
    }
  }
}

// g_enc[i] = sum_e gp_e * x[token_e], g_benc[i] = sum_e gp_e; row_sq[i] = their squared norm.
CROSSDIFF_VECTOR_CLONES
void InPlaceEncoderRows(const LatentEntries& le, const float* gp_main, const float* gp_aux,
                        float aux_scale, const float* x, int64_t Md, float* g_enc, float* g_benc,
                        double* row_sq, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* __restrict ge = g_enc + i * Md;
    std::memset(ge, 0, sizeof(float) * Md);
    float gb = 0.f;
    for (int64_t e = le.ptr[i]; e < le.ptr[i + 1]; ++e) {
      const float gp = le.source[e] ? gp_aux[le.index[e]] * aux_scale : gp_main[le.index[e]];
      Axpy(gp, x + static_cast<int64_t>(le.token[e]) * Md, Md, ge);
      gb += gp;
    }
    g_benc[i] = gb;
    if (row_sq != nullptr) row_sq[i] = static_cast<double>(gb) * gb + SquaredSumDouble(ge, Md);
  }
}

// x[b] := (b_dec + sum_e value_e * dec[latent_e]) - x[b], through the scratch row `row`.
CROSSDIFF_VECTOR_CLONES
void InPlaceResidualRows(const SparseCodes& c, const float* dec, const float* b_dec, int64_t Md,
                         float* x, float* __restrict row, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    DecodeRow(c, b, dec, Md, b_dec, false, row);
    float* __restrict xb = x + b * Md;
#pragma omp simd
    for (int64_t j = 0; j < Md; ++j) xb[j] = row[j] - xb[j];
  }
}

CROSSDIFF_VECTOR_CLONES
void InPlaceAddDecodedRows(const SparseCodes& c, const float* dec, int64_t Md, float* x, int64_t b0,
                           int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) DecodeRow(c, b, dec, Md, nullptr, true, x + b * Md);
}

// g_bdec[j] = sum_b scale[b, j / d] * x[b, j] for columns [j0, j1), in row order (acc: j1 - j0).
CROSSDIFF_VECTOR_CLONES
void InPlaceDecoderBias(const float* x, const float* scale, int64_t B, int64_t M, int64_t d,
                        double* __restrict acc, float* g_bdec, int64_t j0, int64_t j1) {
  const int64_t Md = M * d;
  std::fill(acc, acc + (j1 - j0), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = j0; j < j1;) {  // the columns of each model's segment in [j0, j1)
      const int64_t m = j / d, end = std::min(j1, (m + 1) * d);
      const float s = scale[b * M + m];
      const float* __restrict xb = x + b * Md;
#pragma omp simd
      for (int64_t c = j; c < end; ++c) acc[c - j0] += s * xb[c];
      j = end;
    }
  }
  for (int64_t j = j0; j < j1; ++j) g_bdec[j] = static_cast<float>(acc[j - j0]);
}

// Decoder rows from the main entries, x holding the residual: g_dec[i] = sum_e value_e *
// scale[token_e, m] * x[token_e, m]; row_sq[i] += ||g_dec[i]||^2 unless AuxK adds to the row.
CROSSDIFF_VECTOR_CLONES
void InPlaceDecoderRows(const LatentEntries& le, const float* scale, const float* x, int64_t M,
                        int64_t d, float* g_dec, double* row_sq, int64_t i0, int64_t i1) {
  const int64_t Md = M * d;
  for (int64_t i = i0; i < i1; ++i) {
    float* __restrict gd = g_dec + i * Md;
    std::memset(gd, 0, sizeof(float) * Md);
    int64_t e = le.ptr[i];
    for (; e < le.ptr[i + 1] && le.source[e] == 0; ++e) {
      const int64_t b = le.token[e];
      for (int64_t m = 0; m < M; ++m) {
        Axpy(le.value[e] * scale[b * M + m], x + b * Md + m * d, d, gd + m * d);
      }
    }
    if (row_sq != nullptr && e == le.ptr[i + 1]) row_sq[i] += SquaredSumDouble(gd, Md);
  }
}

// AuxK's share of the decoder rows, x holding fit + err: g_dec[i] += sum_e value_e * aux_scale *
// x[token_e] over the aux entries; then row_sq[i] += ||g_dec[i]||^2 for the rows it touched.
CROSSDIFF_VECTOR_CLONES
void InPlaceAuxDecoderRows(const LatentEntries& le, float aux_scale, const float* x, int64_t Md,
                           float* g_dec, double* row_sq, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    if (le.ptr[i + 1] == le.ptr[i] || le.source[le.ptr[i + 1] - 1] == 0) continue;
    float* __restrict gd = g_dec + i * Md;
    for (int64_t e = le.ptr[i]; e < le.ptr[i + 1]; ++e) {
      if (le.source[e] != 0) {
        Axpy(le.value[e] * aux_scale, x + static_cast<int64_t>(le.token[e]) * Md, Md, gd);
      }
    }
    if (row_sq != nullptr) row_sq[i] += SquaredSumDouble(gd, Md);
  }
}

}  // namespace

namespace {

CROSSDIFF_VECTOR_CLONES
void AdamRange(float* __restrict p, const float* __restrict g, float* __restrict m,
               float* __restrict v, int64_t n, float step_size, float b1, float b2, float eps,
               float bc2_sqrt, float gs) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j] * gs;
    const float mj = b1 * m[j] + (1.f - b1) * gj;
    const float vj = b2 * v[j] + (1.f - b2) * gj * gj;
    m[j] = mj;
    v[j] = vj;
    p[j] -= step_size * mj / (std::sqrt(vj) / bc2_sqrt + eps);
  }
}

}  // namespace

namespace {

// AuxK's per-token top-k among the dead latents, gathered chunk by chunk into fixed slots and
// packed into CSR at the end.
class AuxTopK {
 public:
  AuxTopK(const std::vector<int32_t>& dead, int64_t k_aux, int64_t B)
      : dead_(dead),
        k_(std::min<int64_t>(k_aux, static_cast<int64_t>(dead.size()))),
        count_(B, 0),
        latent_(static_cast<size_t>(B * std::max<int64_t>(k_, 1))),
        value_(latent_.size()) {}

  void Rows(const float* rows, int64_t F, int64_t b0, int64_t b1) {
    at::parallel_for(b0, b1, 16, [&](int64_t c0, int64_t c1) {
      std::vector<std::pair<float, int32_t>> cand;
      for (int64_t b = c0; b < c1; ++b) {
        const float* row = rows + (b - b0) * F;
        cand.clear();
        for (int32_t i : dead_)
          if (row[i] > 0.f) cand.emplace_back(row[i], i);
        const int64_t n = std::min<int64_t>(k_, static_cast<int64_t>(cand.size()));
        auto greater = [](const auto& x, const auto& y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        };
        if (n < static_cast<int64_t>(cand.size()))
          std::nth_element(cand.begin(), cand.begin() + n, cand.end(), greater);
        std::sort(cand.begin(), cand.begin() + n,
                  [](const auto& x, const auto& y) { return x.second < y.second; });
        for (int64_t j = 0; j < n; ++j) {
          latent_[b * k_ + j] = cand[j].second;
          value_[b * k_ + j] = cand[j].first;
        }
        count_[b] = n;
      }
    });
  }

  void Finish(SparseCodes* out) const {
    const int64_t B = static_cast<int64_t>(count_.size());
    out->row_ptr.assign(B + 1, 0);
    for (int64_t b = 0; b < B; ++b) out->row_ptr[b + 1] = out->row_ptr[b] + count_[b];
    out->latent.resize(out->row_ptr[B]);
    out->value.resize(out->row_ptr[B]);
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(latent_.begin() + b * k_, count_[b], out->latent.begin() + out->row_ptr[b]);
      std::copy_n(value_.begin() + b * k_, count_[b], out->value.begin() + out->row_ptr[b]);
    }
  }

 private:
  const std::vector<int32_t>& dead_;
  int64_t k_;
  std::vector<int64_t> count_;
  std::vector<int32_t> latent_;
  std::vector<float> value_;
};

// SelectKthScore, with `also(rows, b0, b1)` called on each chunk during the first visit.
template <class Also>
absl::StatusOr<Selection> SelectKth(const PreActivations& pre, const float* w, int64_t kth,
                                    const AllReduceI64& allreduce, Also&& also) {
  const int64_t F = pre.cols();
  Selection sel;
  // Round 1: top 11 bits of the key.
  Histograms h1(2048);
  pre.ForEachChunk([&](const float* rows, int64_t b0, int64_t b1) {
    at::parallel_for(0, b1 - b0, 16, [&](int64_t r0, int64_t r1) {
      HistogramTop(rows, F, w, r0, r1, h1.of_thread());
    });
    also(rows, b0, b1);
  });
  std::vector<int64_t> hist = h1.Sum();
  RETURN_IF_ERROR(allreduce(hist));
  int64_t positive = 0;
  for (int64_t c : hist) positive += c;
  sel.positive = positive;
  if (positive <= kth || kth <= 0) {
    sel.keep_all_positive = true;
    sel.threshold = 0.f;
    return sel;
  }
  int64_t above = 0;
  const uint32_t top = static_cast<uint32_t>(FindBucket(hist, kth, &above));
  int64_t need = kth - above;
  // Round 2: the next 11 bits among the entries of the chosen top bucket (collected for round 3).
  const int threads = at::get_num_threads();
  Histograms h2(2048);
  std::vector<std::vector<uint32_t>> keys(threads);
  pre.ForEachChunk([&](const float* rows, int64_t b0, int64_t b1) {
    at::parallel_for(0, b1 - b0, 16, [&](int64_t r0, int64_t r1) {
      CollectBucket(rows, F, w, r0, r1, top, h2.of_thread(), &keys[at::get_thread_num()]);
    });
  });
  hist = h2.Sum();
  RETURN_IF_ERROR(allreduce(hist));
  const uint32_t mid = static_cast<uint32_t>(FindBucket(hist, need, &above));
  need -= above;
  // Round 3: the low 10 bits.
  hist.assign(2048, 0);
  for (const auto& ks : keys)
    for (uint32_t k : ks)
      if (((k >> 10) & 0x7FF) == mid) ++hist[k & 0x3FF];
  RETURN_IF_ERROR(allreduce(hist));
  const uint32_t low = static_cast<uint32_t>(FindBucket(hist, need, &above));
  const uint32_t tkey = (top << 21) | (mid << 10) | low;
  std::memcpy(&sel.threshold, &tkey, sizeof tkey);
  return sel;
}

}  // namespace

absl::StatusOr<Selection> SelectKthScore(const PreActivations& pre, const float* w, int64_t kth,
                                         const AllReduceI64& allreduce) {
  return SelectKth(pre, w, kth, allreduce, [](const float*, int64_t, int64_t) {});
}

void GatherSelected(const PreActivations& pre, const float* w, const Selection& sel,
                    SparseCodes* out) {
  uint32_t tkey = 1;  // keep_all_positive: every key > 0
  if (!sel.keep_all_positive) std::memcpy(&tkey, &sel.threshold, sizeof tkey);
  const int64_t B = pre.rows(), F = pre.cols();
  out->row_ptr.assign(B + 1, 0);
  out->latent.clear();
  out->value.clear();
  pre.ForEachChunk([&](const float* rows, int64_t b0, int64_t b1) {
    int64_t* counts = out->row_ptr.data() + b0 + 1;  // counts of rows b0.. then running ends
    at::parallel_for(0, b1 - b0, 16,
                     [&](int64_t r0, int64_t r1) { CountKept(rows, F, w, tkey, r0, r1, counts); });
    for (int64_t b = b0; b < b1; ++b) out->row_ptr[b + 1] += out->row_ptr[b];
    out->latent.resize(out->row_ptr[b1]);
    out->value.resize(out->row_ptr[b1]);
    at::parallel_for(0, b1 - b0, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = rows + r * F;
        int64_t e = out->row_ptr[b0 + r];
        for (int64_t i = 0; i < F; ++i) {
          uint32_t k = ScoreKey(row[i], w[i]);
          if (k != 0 && k >= tkey) {
            out->latent[e] = static_cast<int32_t>(i);
            out->value[e] = row[i];
            ++e;
          }
        }
      }
    });
  });
}

namespace {

// A candidate of SelectAndGather, 8 bytes: its row within the task's 32 rows (top 5 bits) and its
// latent (low 27 bits), and its pre-activation (the score key is recomputed from it and w).
struct Candidate {
  uint32_t packed;
  float value;
};
constexpr int64_t kRowsPerTask = 32;
constexpr uint32_t kLatentBits = 27, kLatentMask = (1u << kLatentBits) - 1;
inline int32_t CandidateLatent(const Candidate& c) {
  return static_cast<int32_t>(c.packed & kLatentMask);
}
inline int64_t CandidateRow(int64_t task, const Candidate& c) {
  return task * kRowsPerTask + (c.packed >> kLatentBits);
}
inline uint32_t CandidateKey(const Candidate& c, const float* w) {
  return ScoreKey(c.value, w[CandidateLatent(c)]);
}

CROSSDIFF_VECTOR_CLONES
void CollectCandidates(const float* pre, int64_t F, const float* w, uint32_t lowkey, int64_t b0,
                       int64_t b1, int64_t row_base, std::vector<Candidate>* out) {
  // Rows [b0, b1) of `pre`, rows row_base + b0 .. of the batch and of the same task: a candidate
  // records its row less the task's first.
  const int64_t task_offset = (row_base + b0) % kRowsPerTask - b0;
  // Hits are a few percent of a row: a vectorised compare over blocks of 32 scores, and the scalar
  // work only for blocks holding a hit.
  constexpr int64_t kBlock = 32;
  float lowf;
  std::memcpy(&lowf, &lowkey, sizeof lowf);
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = pre + b * F;
    int64_t i0 = 0;
    for (; i0 + kBlock <= F; i0 += kBlock) {
      // A hit has pre > 0, so its score pre * w (the same product ScoreKey forms) is >= lowf: this
      // float test never misses one. The block's passes as a bit mask, then only the set bits
      // (hits are a few percent: no branch per score).
      uint32_t hits = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        hits |= static_cast<uint32_t>(row[i0 + j] * w[i0 + j] >= lowf) << j;
      }
      while (hits != 0) {
        const int64_t i = i0 + __builtin_ctz(hits);
        hits &= hits - 1;
        const uint32_t k = ScoreKey(row[i], w[i]);
        if (k >= lowkey && k != 0)
          out->push_back(
              {static_cast<uint32_t>(b + task_offset) << kLatentBits | static_cast<uint32_t>(i),
               row[i]});
      }
    }
    for (int64_t i = i0; i < F; ++i) {
      const uint32_t k = ScoreKey(row[i], w[i]);
      if (k >= lowkey && k != 0)
        out->push_back(
            {static_cast<uint32_t>(b + task_offset) << kLatentBits | static_cast<uint32_t>(i),
             row[i]});
    }
  }
}

}  // namespace

namespace {

using CandidateLists = std::vector<std::vector<Candidate>>;

struct KthKey {
  std::optional<uint32_t> key;  // nullopt: fall back to the exact selection
  int64_t candidates = -1;      // over all ranks (-1: some rank had no guess)
  bool overflow = false;        // the key exchange: some rank had more candidates than it sends
};

// The exact kth largest key among every rank's candidates by radix selection: one all-reduce
// carries [ranks guessing, candidates, the first histogram (top 11 bits)], two more resolve the
// lower bits. nullopt (on every rank alike) when some rank had no guess or the candidates fall
// short of kth.
absl::StatusOr<KthKey> KthKeyByRadix(const CandidateLists& cand, int64_t tasks, const float* w,
                                     int64_t kth, bool guessing, int64_t count,
                                     const AllReduceI64& allreduce) {
  std::vector<int64_t> agg(2 + 2048, 0);
  agg[0] = guessing ? 0 : 1;  // ranks without a guess
  agg[1] = count;
  for (int64_t t = 0; t < tasks; ++t)
    for (const auto& e : cand[t]) ++agg[2 + (CandidateKey(e, w) >> 21)];
  RETURN_IF_ERROR(allreduce(agg));
  KthKey result;
  if (agg[0] > 0) return result;
  result.candidates = agg[1];
  if (agg[1] < kth) return result;
  std::vector<int64_t> hist(agg.begin() + 2, agg.end());
  int64_t above = 0;
  const uint32_t top = static_cast<uint32_t>(FindBucket(hist, kth, &above));
  int64_t need = kth - above;
  hist.assign(2048, 0);
  for (int64_t t = 0; t < tasks; ++t) {
    for (const auto& e : cand[t]) {
      const uint32_t key = CandidateKey(e, w);
      if ((key >> 21) == top) ++hist[(key >> 10) & 0x7FF];
    }
  }
  RETURN_IF_ERROR(allreduce(hist));
  const uint32_t mid = static_cast<uint32_t>(FindBucket(hist, need, &above));
  need -= above;
  hist.assign(2048, 0);
  const uint32_t prefix = (top << 11) | mid;
  for (int64_t t = 0; t < tasks; ++t) {
    for (const auto& e : cand[t]) {
      const uint32_t key = CandidateKey(e, w);
      if ((key >> 10) == prefix) ++hist[key & 0x3FF];
    }
  }
  RETURN_IF_ERROR(allreduce(hist));
  const uint32_t low = static_cast<uint32_t>(FindBucket(hist, need, &above));
  result.key = (top << 21) | (mid << 10) | low;
  return result;
}

// The same key from one all-gather of every rank's candidate keys (blocks of 2 + capacity words:
// [candidates, no guess, keys...]), each rank then selecting among all of them itself. nullopt
// (on every rank alike) when some rank had no guess or more candidates than the capacity, or the
// candidates fall short of kth.
absl::StatusOr<KthKey> KthKeyFromGatheredKeys(const CandidateLists& cand, int64_t tasks,
                                              const float* w, int64_t kth, bool guessing,
                                              int64_t count, const KeyExchange& keys) {
  const int64_t cap = keys.capacity;
  static thread_local std::vector<uint32_t> block, all;
  block.assign(2 + cap, 0);
  block[0] = static_cast<uint32_t>(std::min<int64_t>(count, 0xFFFFFFFF));
  block[1] = guessing ? 0 : 1;
  int64_t n = 0;
  for (int64_t t = 0; t < tasks && n < cap; ++t)
    for (const auto& e : cand[t]) {
      if (n == cap) break;
      block[2 + n++] = CandidateKey(e, w);
    }
  RETURN_IF_ERROR(keys.all_gather(block, &all));
  const int64_t blocks = static_cast<int64_t>(all.size()) / (2 + cap);
  KthKey result;
  int64_t total = 0;
  bool overflow = false;
  for (int64_t r = 0; r < blocks; ++r) {
    const uint32_t* hdr = all.data() + r * (2 + cap);
    if (hdr[1] != 0) return result;
    overflow = overflow || hdr[0] > cap;
    total += hdr[0];
  }
  result.candidates = total;
  result.overflow = overflow;
  if (overflow || total < kth) return result;
  // Compact every rank's keys to the front of `all`, then the kth largest.
  int64_t m = 0;
  for (int64_t r = 0; r < blocks; ++r) {
    const uint32_t* src = all.data() + r * (2 + cap);
    const int64_t c = src[0];
    std::memmove(all.data() + m, src + 2, c * sizeof(uint32_t));
    m += c;
  }
  std::nth_element(all.begin(), all.begin() + (kth - 1), all.begin() + m, std::greater<>());
  result.key = all[kth - 1];
  return result;
}

}  // namespace

absl::StatusOr<Selection> SelectAndGather(const PreActivations& pre, const float* w, int64_t kth,
                                          float guess, const AllReduceI64& allreduce,
                                          SparseCodes* out, const AuxRequest* aux,
                                          const KeyExchange* keys) {
  // Every rank must take the same branch: the decision uses all-reduced or gathered counts only,
  // and a rank without a guess makes every rank fall back.
  const int64_t B = pre.rows(), F = pre.cols();
  uint32_t lowkey = 0;
  if (guess > 0) std::memcpy(&lowkey, &guess, sizeof lowkey);
  if (F > int64_t{kLatentMask} + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("dict size ", F, " exceeds the selection's limit of 2^", kLatentBits));
  }
  const int64_t tasks = (B + kRowsPerTask - 1) / kRowsPerTask;
  // Reused across calls (the trainer calls from one thread): no allocation in the steady state.
  static thread_local CandidateLists cand;
  if (static_cast<int64_t>(cand.size()) < tasks) cand.resize(tasks);
  for (auto& c : cand) c.clear();
  std::optional<AuxTopK> aux_top;
  if (aux != nullptr) aux_top.emplace(*aux->dead, aux->k, B);
  auto aux_rows = [&](const float* rows, int64_t b0, int64_t b1) {
    if (aux_top) aux_top->Rows(rows, F, b0, b1);
  };
  int64_t count = 0;
  if (guess > 0) {
    // Task t holds rows [t * 32, (t + 1) * 32); a task cut by a chunk boundary is collected in two
    // visits, in row order.
    pre.ForEachChunk([&](const float* rows, int64_t b0, int64_t b1) {
      const int64_t t_begin = b0 / kRowsPerTask, t_end = (b1 + kRowsPerTask - 1) / kRowsPerTask;
      at::parallel_for(t_begin, t_end, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = std::max(b0, t * kRowsPerTask);
          const int64_t r1 = std::min(b1, (t + 1) * kRowsPerTask);
          CollectCandidates(rows, F, w, lowkey, r0 - b0, r1 - b0, b0, &cand[t]);
        }
      });
      aux_rows(rows, b0, b1);
    });
    for (const auto& c : cand) count += static_cast<int64_t>(c.size());
  }
  KthKey found;
  if (keys != nullptr) {
    ASSIGN_OR_RETURN(found, KthKeyFromGatheredKeys(cand, tasks, w, kth, guess > 0, count, *keys));
    // Some rank's candidates did not fit its block (every rank sees that in the headers): the
    // threshold is still among the candidates when there are kth of them, so the radix selection
    // over them (three all-reduces of 2048 counts) finds it without another visit of the scores.
    if (found.overflow && found.candidates >= kth) {
      ASSIGN_OR_RETURN(found, KthKeyByRadix(cand, tasks, w, kth, guess > 0, count, allreduce));
    }
  } else {
    ASSIGN_OR_RETURN(found, KthKeyByRadix(cand, tasks, w, kth, guess > 0, count, allreduce));
  }
  if (!found.key) {
    Selection sel;
    if (guess > 0) {
      ASSIGN_OR_RETURN(sel, SelectKthScore(pre, w, kth, allreduce));
    } else {
      ASSIGN_OR_RETURN(sel, SelectKth(pre, w, kth, allreduce, aux_rows));
    }
    sel.candidates = found.candidates;
    sel.exact_fallback = true;
    GatherSelected(pre, w, sel, out);
    if (aux_top) aux_top->Finish(aux->out);
    return sel;
  }
  if (aux_top) aux_top->Finish(aux->out);
  Selection sel;
  sel.positive = -1;  // not counted on this path
  sel.candidates = found.candidates;
  const uint32_t tkey = *found.key;
  std::memcpy(&sel.threshold, &tkey, sizeof tkey);
  // CSR by token straight from the candidates (they are in row-major order).
  out->row_ptr.assign(B + 1, 0);
  for (int64_t t = 0; t < tasks; ++t)
    for (const auto& e : cand[t])
      if (CandidateKey(e, w) >= tkey) ++out->row_ptr[CandidateRow(t, e) + 1];
  for (int64_t b = 0; b < B; ++b) out->row_ptr[b + 1] += out->row_ptr[b];
  out->latent.resize(out->row_ptr[B]);
  out->value.resize(out->row_ptr[B]);
  int64_t e_out = 0;
  for (int64_t t = 0; t < tasks; ++t) {
    for (const auto& e : cand[t]) {
      if (CandidateKey(e, w) >= tkey) {
        out->latent[e_out] = CandidateLatent(e);
        out->value[e_out] = e.value;
        ++e_out;
      }
    }
  }
  return sel;
}

void GatherAuxTopK(const PreActivations& pre, const std::vector<int32_t>& dead, int64_t k_aux,
                   SparseCodes* out) {
  AuxTopK top(dead, k_aux, pre.rows());
  pre.ForEachChunk(
      [&](const float* rows, int64_t b0, int64_t b1) { top.Rows(rows, pre.cols(), b0, b1); });
  top.Finish(out);
}

namespace {

// Rows b0..b1 of the decode, visiting their entries latent by latent: the decoder is read once,
// in order, and each of its rows serves all of the block's entries of that latent while cached.
// A row's entries are added in increasing latent order, as DecodeRow adds a sorted row's.
CROSSDIFF_VECTOR_CLONES
void DecodeBlockByLatent(const SparseCodes& c, const float* dec, int64_t Md, const float* bias,
                         float* out, int64_t b0, int64_t b1) {
  const int64_t e0 = c.row_ptr[b0], e1 = c.row_ptr[b1];
  int32_t top = -1;
  for (int64_t e = e0; e < e1; ++e) top = std::max(top, c.latent[e]);
  std::vector<int64_t> ptr(static_cast<size_t>(top) + 2, 0);
  for (int64_t e = e0; e < e1; ++e) ++ptr[c.latent[e] + 1];
  for (size_t i = 1; i < ptr.size(); ++i) ptr[i] += ptr[i - 1];
  std::vector<int32_t> row(e1 - e0);
  std::vector<float> value(e1 - e0);
  for (int64_t b = b0; b < b1; ++b) {
    float* y = out + b * Md;
    if (bias != nullptr) {
      std::memcpy(y, bias, sizeof(float) * Md);
    } else {
      std::memset(y, 0, sizeof(float) * Md);
    }
    for (int64_t e = c.row_ptr[b]; e < c.row_ptr[b + 1]; ++e) {
      const int64_t pos = ptr[c.latent[e]]++;
      row[pos] = static_cast<int32_t>(b);
      value[pos] = c.value[e];
    }
  }
  // ptr[i] now ends latent i's entries (and starts latent i + 1's).
  int64_t start = 0;
  for (int32_t i = 0; i <= top; ++i) {
    const float* di = dec + static_cast<int64_t>(i) * Md;
    for (int64_t pos = start; pos < ptr[i]; ++pos) {
      Axpy(value[pos], di, Md, out + static_cast<int64_t>(row[pos]) * Md);
    }
    start = ptr[i];
  }
}

}  // namespace

void SparseDecode(const SparseCodes& codes, const float* dec, int64_t Md, const float* bias,
                  float* out) {
  const int64_t B = static_cast<int64_t>(codes.row_ptr.size()) - 1;
  if (B == 0) return;
  // One block of rows per thread: each block reads the decoder once.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, B, (B + threads - 1) / threads, [&](int64_t b0, int64_t b1) {
    DecodeBlockByLatent(codes, dec, Md, bias, out, b0, b1);
  });
}

void BuildLatentEntries(const SparseCodes& main, const SparseCodes* aux, int64_t F,
                        LatentEntries* out) {
  out->ptr.assign(F + 1, 0);
  const int64_t n_main = main.nnz(), n_aux = aux != nullptr ? aux->nnz() : 0;
  for (int64_t e = 0; e < n_main; ++e) ++out->ptr[main.latent[e] + 1];
  for (int64_t e = 0; e < n_aux; ++e) ++out->ptr[aux->latent[e] + 1];
  for (int64_t i = 0; i < F; ++i) out->ptr[i + 1] += out->ptr[i];
  const int64_t n = n_main + n_aux;
  out->token.resize(n);
  out->value.resize(n);
  out->source.resize(n);
  out->index.resize(n);
  std::vector<int64_t> next(out->ptr.begin(), out->ptr.end() - 1);
  auto add = [&](const SparseCodes& c, uint8_t src) {
    const int64_t B = static_cast<int64_t>(c.row_ptr.size()) - 1;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = c.row_ptr[b]; e < c.row_ptr[b + 1]; ++e) {
        const int64_t pos = next[c.latent[e]]++;
        out->token[pos] = static_cast<int32_t>(b);
        out->value[pos] = c.value[e];
        out->source[pos] = src;
        out->index[pos] = static_cast<int32_t>(e);
      }
    }
  };
  add(main, 0);
  if (aux != nullptr) add(*aux, 1);
}

namespace {
// Rows per group of InPlaceBackward's AuxK sums (a fixed partition: the sums do not depend on
// the number of threads).
constexpr int64_t kAuxGroupRows = 64;
}  // namespace

void InPlaceBackward::Forward(const Problem& p, const float* x, float* stash,
                              int64_t stash_floats) {
  p_ = p;
  const int64_t B = static_cast<int64_t>(p.main->row_ptr.size()) - 1, M = p.M, Md = M * p.d;
  B_ = B;
  const bool aux = p.aux != nullptr;
  e2_.resize(B * M);
  scale_.resize(B * M);
  gp_main_.resize(p.main->nnz());
  gp_aux_.resize(aux ? p.aux->nnz() : 0);
  const int64_t groups = (B + kAuxGroupRows - 1) / kAuxGroupRows;
  if (aux) aux_sums_.assign(groups * (Md + 1), 0.0);
  const double bm = static_cast<double>(B * M);
  stashed_ = stash != nullptr && B * Md <= stash_floats ? stash : nullptr;
  const InPlaceForwardArgs args{p.main,
                                p.aux,
                                p.dec,
                                p.b_dec,
                                x,
                                B,
                                M,
                                p.d,
                                kAuxGroupRows,
                                p.l2_loss,
                                bm,
                                e2_.data(),
                                scale_.data(),
                                gp_main_.data(),
                                gp_aux_.data(),
                                aux_sums_.data(),
                                stashed_};
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> rows(2 * Md);
    InPlaceForwardRows(args, g0, g1, rows.data(), rows.data() + Md);
  });
  loss_ = 0;
  double e2_sum = 0;
  for (int64_t i = 0; i < B * M; ++i) {
    loss_ += LossTerm(p.l2_loss, e2_[i]);
    e2_sum += e2_[i];
  }
  loss_ /= bm;
  aux_loss_ = aux_scale_ = 0;
  if (aux) {
    // denom = sum ||e - mean(e)||^2 over the batch.
    std::vector<double> col(Md, 0.0);
    double fit_sq = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const double* sums = aux_sums_.data() + g * (Md + 1);
      for (int64_t j = 0; j < Md; ++j) col[j] += sums[j];
      fit_sq += sums[Md];
    }
    double s1 = 0;
    for (double c : col) s1 += c * c;
    const double denom = std::max(e2_sum - s1 / static_cast<double>(B), 1e-12);
    aux_loss_ = fit_sq / denom;
    aux_scale_ = 2.0 * p.aux_alpha / denom;
  }
}

void InPlaceBackward::Backward(float* x, float* g_enc, float* g_dec, float* g_benc, float* g_bdec,
                               double* row_sq) {
  const int64_t B = B_, M = p_.M, d = p_.d, Md = M * d, F = p_.F;
  const float aux_scale = static_cast<float>(aux_scale_);
  BuildLatentEntries(*p_.main, p_.aux, F, &entries_);
  // The encoder rows, while x is still the input.
  at::parallel_for(0, F, 16, [&](int64_t i0, int64_t i1) {
    InPlaceEncoderRows(entries_, gp_main_.data(), gp_aux_.data(), aux_scale, x, Md, g_enc, g_benc,
                       row_sq, i0, i1);
  });
  // x := xhat - x: Forward's residual when it was stashed, else decoded again (by the operations
  // of Forward: the same residual).
  if (stashed_ != nullptr) {
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      std::memcpy(x + b0 * Md, stashed_ + b0 * Md, sizeof(float) * (b1 - b0) * Md);
    });
  } else {
    at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
      std::vector<float> row(Md);
      InPlaceResidualRows(*p_.main, p_.dec, p_.b_dec, Md, x, row.data(), b0, b1);
    });
  }
  at::parallel_for(0, Md, 256, [&](int64_t j0, int64_t j1) {
    std::vector<double> acc(j1 - j0);
    InPlaceDecoderBias(x, scale_.data(), B, M, d, acc.data(), g_bdec, j0, j1);
  });
  at::parallel_for(0, F, 16, [&](int64_t i0, int64_t i1) {
    InPlaceDecoderRows(entries_, scale_.data(), x, M, d, g_dec, row_sq, i0, i1);
  });
  if (p_.aux == nullptr) return;
  // x := fit + err, then the AuxK share of the rows of the latents it selected.
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    InPlaceAddDecodedRows(*p_.aux, p_.dec, Md, x, b0, b1);
  });
  at::parallel_for(0, F, 16, [&](int64_t i0, int64_t i1) {
    InPlaceAuxDecoderRows(entries_, aux_scale, x, Md, g_dec, row_sq, i0, i1);
  });
}

namespace {

// The decoder rows i0..i1, g_dec[i] = sum_e value_e * g_src(e)[token_e], and each entry's
// g_pre_e = <g_src(e)[token_e], dec[i]>, from one visit of each entry's g_src row.
CROSSDIFF_VECTOR_CLONES
void DecoderRowsAndPreGradients(const LatentEntries& le, const float* g_main, const float* g_aux,
                                const float* dec, int64_t Md, float* g_dec, float* g_pre,
                                double* row_sq, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* __restrict gd = g_dec + i * Md;
    const float* __restrict di = dec + i * Md;
    std::memset(gd, 0, sizeof(float) * Md);
    for (int64_t e = le.ptr[i]; e < le.ptr[i + 1]; ++e) {
      const float* __restrict gs = (le.source[e] ? g_aux : g_main) + le.token[e] * Md;
      const float a = le.value[e];
      float gp = 0.f;
#pragma omp simd reduction(+ : gp)
      for (int64_t j = 0; j < Md; ++j) {
        gd[j] += a * gs[j];
        gp += gs[j] * di[j];
      }
      g_pre[e] = gp;
    }
    if (row_sq != nullptr) row_sq[i] = SquaredSumDouble(gd, Md);
  }
}

// The encoder rows i0..i1, g_enc[i] = sum_e g_pre_e * x[token_e], and g_benc[i] = sum_e g_pre_e.
CROSSDIFF_VECTOR_CLONES
void EncoderRows(const LatentEntries& le, const float* x, RowMap x_rows, int64_t Md,
                 const float* g_pre, float* g_enc, float* g_benc, double* row_sq, int64_t i0,
                 int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float* __restrict ge = g_enc + i * Md;
    std::memset(ge, 0, sizeof(float) * Md);
    float gb = 0.f;
    for (int64_t e = le.ptr[i]; e < le.ptr[i + 1]; ++e) {
      Axpy(g_pre[e], x + x_rows(le.token[e]) * Md, Md, ge);
      gb += g_pre[e];
    }
    g_benc[i] = gb;
    if (row_sq != nullptr) row_sq[i] += static_cast<double>(gb) * gb + SquaredSumDouble(ge, Md);
  }
}

}  // namespace

void SparseBackward(const LatentEntries& entries, const float* x, const float* g_main,
                    const float* g_aux, const float* dec, int64_t F, int64_t Md, float* g_enc,
                    float* g_dec, float* g_benc, double* row_sq, RowMap x_rows) {
  // Two sweeps over the latents rather than one: in one sweep each entry's encoder update waits
  // for its g_pre, a dot product over the whole row, and the loop works on five rows at once
  // (g_src, x, dec and the two gradient rows); apart, on three and on two. Same results, bit for
  // bit; 1.1-1.3x faster alone and 1.6-1.9x with two ranks running it at once (B = 2048, d = 512 x
  // 2, dict 8192: bench/crosscoder/sparse_backward_bench, against its reference_kernels.cc).
  std::vector<float> g_pre(entries.token.size());
  at::parallel_for(0, F, 16, [&](int64_t i0, int64_t i1) {
    DecoderRowsAndPreGradients(entries, g_main, g_aux, dec, Md, g_dec, g_pre.data(), row_sq, i0,
                               i1);
  });
  at::parallel_for(0, F, 16, [&](int64_t i0, int64_t i1) {
    EncoderRows(entries, x, x_rows, Md, g_pre.data(), g_enc, g_benc, row_sq, i0, i1);
  });
}

namespace {

// Vectorised (the lanes' partial sums are added at the end: a fixed order for a given n).
CROSSDIFF_VECTOR_CLONES double SquaredNormRange(const float* __restrict x, int64_t n) {
  return SquaredSumDouble(x, n);
}

}  // namespace

void SegmentSquaredNorms(const float* x, int64_t segments, int64_t len, float* out) {
  at::parallel_for(0, segments, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) out[s] = SegmentSquaredNorm(x + s * len, len);
  });
}

double SquaredNorm(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t a = q * kBlock, z = std::min(n, a + kBlock);
      partial[q] = SquaredNormRange(x + a, z - a);
    }
  });
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

void AdamUpdate(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
                double beta2, double eps, double grad_scale, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  at::parallel_for(0, n, 1 << 15, [&](int64_t a, int64_t z) {
    AdamRange(p + a, g + a, m + a, v + a, z - a, step_size, static_cast<float>(beta1),
              static_cast<float>(beta2), static_cast<float>(eps), bc2_sqrt,
              static_cast<float>(grad_scale));
  });
}

uint64_t HashBytes(const void* data, int64_t nbytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < nbytes; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace crossdiff::crosscoder::kernels
