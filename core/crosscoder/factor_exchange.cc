#include "core/crosscoder/factor_exchange.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::crosscoder::internal {
namespace {

int64_t RoundUp(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Writes per-token counts (rows words), then up to `capacity` latents and value bits; returns the
// entries written.
int64_t PackCodes(const kernels::SparseCodes& c, int64_t rows, int64_t capacity, int32_t* out) {
  for (int64_t b = 0; b < rows; ++b) {
    out[b] = static_cast<int32_t>(c.row_ptr[b + 1] - c.row_ptr[b]);
  }
  const int64_t n = std::min(c.nnz(), capacity);
  if (n > 0) {
    std::memcpy(out + rows, c.latent.data(), n * sizeof(int32_t));
    std::memcpy(out + rows + capacity, c.value.data(), n * sizeof(float));
  }
  return n;
}

// Appends a rank's codes as rows [first_row, first_row + rows) of the global CSR, whose earlier
// rows end at first_row (rows in between, padding, are empty). The entries past `capacity`
// (`extra` of them) come from over_latent / over_value.
void UnpackCodes(const int32_t* in, int64_t rows, int64_t capacity, int64_t nnz,
                 const int32_t* over_latent, const int32_t* over_value, int64_t extra,
                 int64_t first_row, kernels::SparseCodes* c) {
  while (static_cast<int64_t>(c->row_ptr.size()) <= first_row) c->row_ptr.push_back(c->nnz());
  for (int64_t b = 0; b < rows; ++b) c->row_ptr.push_back(c->row_ptr.back() + in[b]);
  const int64_t base = static_cast<int64_t>(c->latent.size());
  c->latent.resize(base + nnz);
  c->value.resize(base + nnz);
  const int64_t n = nnz - extra;
  if (n > 0) {
    std::memcpy(c->latent.data() + base, in + rows, n * sizeof(int32_t));
    std::memcpy(c->value.data() + base, in + rows + capacity, n * sizeof(float));
  }
  if (extra > 0) {
    std::memcpy(c->latent.data() + base + n, over_latent, extra * sizeof(int32_t));
    std::memcpy(c->value.data() + base + n, over_value, extra * sizeof(float));
  }
}

}  // namespace

FactorExchange::FactorExchange(int64_t rows, int64_t Md, int64_t main_capacity, int64_t k_aux)
    : rows_(rows),
      Md_(Md),
      main_capacity_(std::max<int64_t>(main_capacity, 1)),
      k_aux_(std::max<int64_t>(k_aux, 0)) {
  send_ = at::zeros({BlockWords(true)}, at::TensorOptions().dtype(at::kFloat));
}

int64_t FactorExchange::TailWords() const { return RoundUp(4 + rows_ + 2 * main_capacity_, Md_); }

int64_t FactorExchange::AuxTailWords() const { return RoundUp(rows_ + 2 * rows_ * k_aux_, Md_); }

absl::Status FactorExchange::Exchange(comm::Communicator& comm, const kernels::SparseCodes& codes,
                                      bool aux, const kernels::SparseCodes* aux_codes) {
  RETURN_IF_ERROR(Start(comm, codes, aux, aux_codes));
  return Finish(comm, codes);
}

absl::Status FactorExchange::Start(comm::Communicator& comm, const kernels::SparseCodes& codes,
                                   bool aux, const kernels::SparseCodes* aux_codes) {
  if (aux && (aux_codes == nullptr || aux_codes->nnz() > rows_ * k_aux_)) {
    return absl::InvalidArgumentError("FactorExchange: AuxK codes missing or over k_aux per token");
  }
  world_ = comm.world_size();
  aux_ = aux;
  float* send = send_.data_ptr<float>();
  auto* tail = reinterpret_cast<int32_t*>(send + rows_ * Md_);
  sent_ = PackCodes(codes, rows_, main_capacity_, tail + 4);
  tail[0] = static_cast<int32_t>(codes.nnz());
  tail[1] = static_cast<int32_t>(aux ? aux_codes->nnz() : 0);
  tail[2] = aux ? 1 : 0;
  tail[3] = 0;
  if (aux) {
    PackCodes(*aux_codes, rows_, rows_ * k_aux_,
              reinterpret_cast<int32_t*>(send + GauxOffset() + rows_ * Md_));
  }
  const int64_t block = BlockWords(aux);
  if (!recv_.defined() || recv_.numel() < world_ * block) {
    recv_ = at::empty({world_ * BlockWords(true)}, send_.options());
  }
  at::Tensor out = recv_.narrow(0, 0, world_ * block);
  ASSIGN_OR_RETURN(gathering_, comm.StartAllGather(send_.narrow(0, 0, block), out));
  return absl::OkStatus();
}

absl::Status FactorExchange::Finish(comm::Communicator& comm, const kernels::SparseCodes& codes) {
  if (gathering_ == nullptr) return absl::FailedPreconditionError("FactorExchange: not started");
  absl::Status gathered = gathering_->Wait();
  gathering_.reset();
  RETURN_IF_ERROR(gathered);
  const bool aux = aux_;
  const int64_t block = BlockWords(aux);

  // The headers decide, identically on every rank, whether main entries overflowed.
  const float* all = recv_.data_ptr<float>();
  std::vector<int64_t> nnz(world_), aux_nnz(world_);
  int64_t max_extra = 0;
  for (int r = 0; r < world_; ++r) {
    const auto* t = reinterpret_cast<const int32_t*>(all + r * block + rows_ * Md_);
    if ((t[2] != 0) != aux) {
      return absl::InternalError(absl::StrCat("ranks disagree on AuxK this step: rank ", r,
                                              aux ? " has no dead latents" : " has dead latents"));
    }
    nnz[r] = t[0];
    aux_nnz[r] = t[1];
    max_extra = std::max(max_extra, nnz[r] - main_capacity_);
  }
  at::Tensor overflow;
  if (max_extra > 0) {
    at::Tensor mine = at::zeros({2 * max_extra}, at::TensorOptions().dtype(at::kInt));
    const int64_t extra = codes.nnz() - sent_;
    if (extra > 0) {
      std::memcpy(mine.data_ptr<int32_t>(), codes.latent.data() + sent_, extra * sizeof(int32_t));
      std::memcpy(mine.data_ptr<int32_t>() + max_extra, codes.value.data() + sent_,
                  extra * sizeof(float));
    }
    overflow = at::empty({world_ * 2 * max_extra}, mine.options());
    RETURN_IF_ERROR(comm.AllGather(mine, overflow));
  }

  const int64_t block_rows = block / Md_;
  for (kernels::SparseCodes* c : {&codes_, &aux_codes_}) {
    c->row_ptr.assign(1, 0);
    c->latent.clear();
    c->value.clear();
  }
  for (int r = 0; r < world_; ++r) {
    const auto* t = reinterpret_cast<const int32_t*>(all + r * block + rows_ * Md_);
    const int64_t extra = std::max<int64_t>(0, nnz[r] - main_capacity_);
    // A rank's overflow block holds latents at [0, max_extra) and value bits after them.
    const int32_t* over = extra > 0 ? overflow.data_ptr<int32_t>() + r * 2 * max_extra : nullptr;
    UnpackCodes(t + 4, rows_, main_capacity_, nnz[r], over,
                over != nullptr ? over + max_extra : nullptr, extra, r * block_rows, &codes_);
    if (aux) {
      const auto* aux_tail =
          reinterpret_cast<const int32_t*>(all + r * block + GauxOffset() + rows_ * Md_);
      UnpackCodes(aux_tail, rows_, rows_ * k_aux_, aux_nnz[r], nullptr, nullptr, 0, r * block_rows,
                  &aux_codes_);
    }
  }
  for (kernels::SparseCodes* c : {&codes_, &aux_codes_}) {
    while (static_cast<int64_t>(c->row_ptr.size()) <= world_ * block_rows) {
      c->row_ptr.push_back(c->nnz());
    }
  }
  return absl::OkStatus();
}

void FactorExchange::SumGmain(float* out) const {
  const int64_t block = BlockWords(aux_);
  std::fill(out, out + Md_, 0.f);
  for (int r = 0; r < world_; ++r) {
    const float* g = recv_.data_ptr<float>() + r * block;
    for (int64_t b = 0; b < rows_; ++b) {
      const float* row = g + b * Md_;
      for (int64_t j = 0; j < Md_; ++j) out[j] += row[j];
    }
  }
}

}  // namespace crossdiff::crosscoder::internal
