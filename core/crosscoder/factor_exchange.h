// Internal: data-parallel BatchTopK training without a gradient all-reduce.
//
// A BatchTopK step's gradients are sums over tokens of products of per-token factors: the
// normalised input x_b, dL/dxhat_b, the AuxK gradient and the token's sparse codes (DESIGN.md 4;
// kernels::SparseBackward). The dense gradients are 2*F*M*d floats (67 MB at d=512, F=8192). Every
// rank reads the whole global batch (x of every token, from the store: no bytes on the wire), so
// each rank gathers only every rank's dL/dxhat, AuxK gradient and codes, in one all-gather, and
// computes the gradients of the whole global batch itself: 2.4 MB against 67 MB per step and rank
// at B=1024, W=2, and one collective instead of one per bucket.
//
// Layout of a rank's block (F32 words; the block is a whole number of Md-wide rows):
//   [gmain: rows*Md | tail | gaux: rows*Md | aux tail]     (the last two with AuxK)
//   tail:     header (4: main entries, aux entries, AuxK flag, 0), main counts (rows), then
//             main latents and value bits (capacity main_capacity entries), zero-padded;
//   aux tail: aux counts (rows), aux latents and value bits (rows * k_aux entries), zero-padded.
// Because every block is whole rows, rank r's token b is row r*block_rows() + b of the gathered
// buffer for gmain and of (buffer + gaux offset) for gaux: the gathered codes use those row numbers
// as tokens, and the kernels read the gathered buffer as is (x through XRows(), which maps a token
// to its row of the global batch, r*rows + b).
// Main entries beyond the capacity (a rank holding far more than its share of the batch's top
// scores) go through a second all-gather, sized from the headers every rank has by then.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "core/comm/communicator.h"
#include "core/crosscoder/sparse_kernels.h"

namespace crossdiff::crosscoder::internal {

class FactorExchange {
 public:
  FactorExchange() = default;
  // rows: this rank's tokens a step (every rank the same); main_capacity: main entries a rank
  // sends in the single all-gather (e.g. 2 * rows * k); k_aux: AuxK entries per token at most.
  FactorExchange(int64_t rows, int64_t Md, int64_t main_capacity, int64_t k_aux);

  // This rank's factor rows, to be filled before Exchange ([rows, Md] views of the send buffer).
  at::Tensor gmain() const { return send_.narrow(0, 0, rows_ * Md_).view({rows_, Md_}); }
  at::Tensor gaux() const { return send_.narrow(0, GauxOffset(), rows_ * Md_).view({rows_, Md_}); }

  // Gathers every rank's block. aux must be the same on every rank (checked), aux_codes given
  // when it is set. Issues one all-gather, or two when a rank overflowed its main capacity.
  // Exchange = Start + Finish; between the two the caller may compute, but must not touch the
  // send rows (gmain(), gaux()) nor `codes`, and must issue no collective.
  absl::Status Exchange(comm::Communicator& comm, const kernels::SparseCodes& codes, bool aux,
                        const kernels::SparseCodes* aux_codes);
  // Packs the codes and starts the all-gather of the blocks.
  absl::Status Start(comm::Communicator& comm, const kernels::SparseCodes& codes, bool aux,
                     const kernels::SparseCodes* aux_codes);
  // Waits for it, gathers any overflowing entries and unpacks the gathered codes.
  absl::Status Finish(comm::Communicator& comm, const kernels::SparseCodes& codes);

  // After Exchange: the global batch, tokens numbered as rows of the gathered buffer.
  const float* gmain_rows() const { return recv_.data_ptr<float>(); }
  const float* gaux_rows() const { return recv_.data_ptr<float>() + GauxOffset(); }
  const kernels::SparseCodes& codes() const { return codes_; }
  const kernels::SparseCodes& aux_codes() const { return aux_codes_; }
  // Token t of the gathered codes is row XRows()(t) of the global batch [world * rows, Md].
  kernels::RowMap XRows() const { return {BlockWords(aux_) / Md_, rows_}; }
  // out [Md] = the sum of every rank's gmain rows (the decoder bias gradient).
  void SumGmain(float* out) const;

 private:
  int64_t TailWords() const;
  int64_t AuxTailWords() const;
  int64_t GauxOffset() const { return rows_ * Md_ + TailWords(); }
  int64_t BlockWords(bool aux) const {
    return GauxOffset() + (aux ? rows_ * Md_ + AuxTailWords() : 0);
  }

  int64_t rows_ = 0, Md_ = 0, main_capacity_ = 0, k_aux_ = 0;
  int world_ = 0;
  int64_t sent_ = 0;  // this rank's main entries in its block (the rest overflow)
  std::unique_ptr<comm::PendingCollective> gathering_;
  bool aux_ = false;
  at::Tensor send_, recv_;
  kernels::SparseCodes codes_, aux_codes_;
};

}  // namespace crossdiff::crosscoder::internal
