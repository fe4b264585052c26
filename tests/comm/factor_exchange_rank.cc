// One rank of factor_exchange_test: fills this rank's factor rows and codes with values that name
// (rank, token, column), exchanges them with internal::FactorExchange over the launch flags'
// communicator and checks what arrived from every rank. Prints EXCHANGE_OK or MISMATCH <what>.
//
//   factor_exchange_rank [--aux] [--skew] + launch flags
//
// --skew gives rank 1 far more main entries than the capacity (the overflow all-gather).
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/comm/launch.h"
#include "core/common/cli_args.h"
#include "core/crosscoder/factor_exchange.h"

namespace {

using crossdiff::crosscoder::kernels::SparseCodes;

constexpr int64_t kRows = 3, kMd = 8, kCapacity = 4, kAux = 2;

float Value(int r, int64_t b, int64_t j, int which) {
  return static_cast<float>(1000 * which + 100 * r + 10 * b + j) + 0.25f;
}

// Rank r's main codes: token b holds (b + r) entries, or 3 + 4*r with --skew; latent = b*7+e+r.
SparseCodes MainCodes(int r, bool skew) {
  SparseCodes c;
  c.row_ptr.assign(1, 0);
  for (int64_t b = 0; b < kRows; ++b) {
    const int64_t n = skew && r == 1 ? 3 + 4 * r : b + r;
    for (int64_t e = 0; e < n; ++e) {
      c.latent.push_back(static_cast<int32_t>(b * 7 + e + r));
      c.value.push_back(Value(r, b, e, 5));
    }
    c.row_ptr.push_back(static_cast<int64_t>(c.latent.size()));
  }
  return c;
}

SparseCodes AuxCodes(int r) {
  SparseCodes c;
  c.row_ptr.assign(1, 0);
  for (int64_t b = 0; b < kRows; ++b) {
    for (int64_t e = 0; e < (b + r) % (kAux + 1); ++e) {
      c.latent.push_back(static_cast<int32_t>(40 + b + e));
      c.value.push_back(Value(r, b, e, 6));
    }
    c.row_ptr.push_back(static_cast<int64_t>(c.latent.size()));
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("factor_exchange_rank", "one rank of the factor exchange test");
  bool& aux = cl.AddBool("aux", "send AuxK rows and codes too");
  bool& skew = cl.AddBool("skew", "rank 1 overflows the main capacity");
  crossdiff::comm::LaunchFlags launch = crossdiff::comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto comm = crossdiff::comm::ConnectFromFlags(launch);
  if (!comm.ok()) {
    std::printf("MISMATCH connect: %s\n", comm.status().ToString().c_str());
    return 1;
  }
  const int rank = (*comm)->rank(), world = (*comm)->world_size();
  crossdiff::crosscoder::internal::FactorExchange ex(kRows, kMd, kCapacity, kAux);
  for (int64_t b = 0; b < kRows; ++b) {
    for (int64_t j = 0; j < kMd; ++j) {
      ex.gmain()[b][j] = Value(rank, b, j, 2);
      ex.gaux()[b][j] = Value(rank, b, j, 3);
    }
  }
  SparseCodes main = MainCodes(rank, skew), auxc = AuxCodes(rank);
  absl::Status s = ex.Exchange(**comm, main, aux, aux ? &auxc : nullptr);
  if (!s.ok()) {
    std::printf("MISMATCH exchange: %s\n", s.ToString().c_str());
    return 1;
  }
  std::string bad;
  // Every rank's tokens, in rank order, at the rows the gathered codes name.
  std::vector<float> bias(kMd, 0.f);
  int64_t token_row = 0;  // the gathered row of token (r, b), found by its gmain values
  const auto& rp = ex.codes().row_ptr;
  for (int r = 0; r < world; ++r) {
    const SparseCodes want = MainCodes(r, skew), want_aux = AuxCodes(r);
    for (int64_t b = 0; b < kRows; ++b) {
      // Rows between ranks' tokens are padding: skip to the row holding token (r, b).
      while (token_row + 1 < static_cast<int64_t>(rp.size()) &&
             ex.gmain_rows()[token_row * kMd] != Value(r, b, 0, 2)) {
        ++token_row;
      }
      if (token_row + 1 >= static_cast<int64_t>(rp.size())) {
        bad += absl::StrCat("token (", r, ",", b, ") not found; ");
        break;
      }
      for (int64_t j = 0; j < kMd; ++j) {
        if (ex.gmain_rows()[token_row * kMd + j] != Value(r, b, j, 2)) bad += "gmain; ";
        if (aux && ex.gaux_rows()[token_row * kMd + j] != Value(r, b, j, 3)) bad += "gaux; ";
        bias[j] += Value(r, b, j, 2);
      }
      // The token's row of the global batch (where every rank reads x).
      if (ex.XRows()(token_row) != r * kRows + b) {
        bad += absl::StrCat("token (", r, ",", b, ") maps to x row ", ex.XRows()(token_row), "; ");
      }
      const int64_t n = want.row_ptr[b + 1] - want.row_ptr[b];
      if (rp[token_row + 1] - rp[token_row] != n) {
        bad += absl::StrCat("token (", r, ",", b, ") has ", rp[token_row + 1] - rp[token_row],
                            " entries, want ", n, "; ");
      } else {
        for (int64_t e = 0; e < n; ++e) {
          if (ex.codes().latent[rp[token_row] + e] != want.latent[want.row_ptr[b] + e] ||
              ex.codes().value[rp[token_row] + e] != want.value[want.row_ptr[b] + e]) {
            bad += absl::StrCat("entry ", e, " of token (", r, ",", b, "); ");
          }
        }
      }
      if (aux) {
        const auto& ap = ex.aux_codes().row_ptr;
        const int64_t na = want_aux.row_ptr[b + 1] - want_aux.row_ptr[b];
        if (ap[token_row + 1] - ap[token_row] != na) {
          bad += absl::StrCat("aux entries of token (", r, ",", b, "); ");
        } else {
          for (int64_t e = 0; e < na; ++e) {
            if (ex.aux_codes().latent[ap[token_row] + e] !=
                    want_aux.latent[want_aux.row_ptr[b] + e] ||
                ex.aux_codes().value[ap[token_row] + e] != want_aux.value[want_aux.row_ptr[b] + e]) {
              bad += absl::StrCat("aux entry ", e, " of token (", r, ",", b, "); ");
            }
          }
        }
      }
    }
  }
  int64_t total = 0, want_total = 0;
  for (size_t i = 0; i + 1 < rp.size(); ++i) total += rp[i + 1] - rp[i];
  for (int r = 0; r < world; ++r) want_total += MainCodes(r, skew).nnz();
  if (total != want_total) bad += absl::StrCat("main entries ", total, " want ", want_total, "; ");
  std::vector<float> sum(kMd);
  ex.SumGmain(sum.data());
  for (int64_t j = 0; j < kMd; ++j) {
    if (sum[j] != bias[j]) bad += absl::StrCat("SumGmain[", j, "]; ");
  }
  if (bad.empty()) {
    std::printf("EXCHANGE_OK rank=%d world=%d\n", rank, world);
  } else {
    std::printf("MISMATCH %s\n", bad.c_str());
  }
  return bad.empty() ? 0 : 1;
}
