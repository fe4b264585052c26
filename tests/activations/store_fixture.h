// Builds small activation stores for the activations tests.
#pragma once

#include <ATen/ATen.h>

#include <fstream>
#include <string>

#include "core/activations/store.h"

namespace crossdiff::activations::testing_util {

// Resident memory of this process in bytes (VmRSS).
inline int64_t ResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// `rows` rows of random activations [rows, n_models, d]; sequence_ids = seed * 1e6 + row (so a row
// can be identified after shuffling), token_ids = row % 1000, positions = row % 17, ids as I64.
inline ActivationBatch MakeRows(int64_t rows, int64_t n_models, int64_t d, int64_t seed) {
  at::manual_seed(static_cast<uint64_t>(seed) + 12345);
  ActivationBatch b;
  b.activations = at::randn({rows, n_models, d});
  at::Tensor index = at::arange(rows, at::kLong);
  b.sequence_ids = index + seed * 1000000;
  b.token_ids = index.remainder(1000);
  b.positions = index.remainder(17);
  return b;
}

inline ActivationBatch Slice(const ActivationBatch& b, int64_t lo, int64_t hi) {
  return ActivationBatch{b.activations.slice(0, lo, hi), b.token_ids.slice(0, lo, hi),
                         b.sequence_ids.slice(0, lo, hi), b.positions.slice(0, lo, hi)};
}

// Writes a complete store of MakeRows(rows, n_models, d, /*seed=*/0), appended in pieces of 1000.
inline absl::StatusOr<Manifest> WriteStore(const std::string& dir, int64_t rows, int64_t n_models,
                                           int64_t d, const std::string& dtype,
                                           int64_t rows_per_shard) {
  StoreWriter::Options opts;
  for (int64_t m = 0; m < n_models; ++m) opts.models.push_back("model" + std::to_string(m));
  opts.layer = 1;
  opts.d_model = d;
  opts.dtype = dtype;
  opts.rows_per_shard = rows_per_shard;
  auto writer = StoreWriter::Create(dir, opts);
  if (!writer.ok()) return writer.status();
  ActivationBatch all = MakeRows(rows, n_models, d, 0);
  for (int64_t lo = 0; lo < rows; lo += 1000) {
    absl::Status s = (*writer)->Append(Slice(all, lo, std::min(rows, lo + 1000)));
    if (!s.ok()) return s;
  }
  return (*writer)->Finish();
}

}  // namespace crossdiff::activations::testing_util
