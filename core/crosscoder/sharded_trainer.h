// Latent-sharded crosscoder training (issue 4, DESIGN.md section 5): with W ranks, rank r owns the
// contiguous latents [r F/W, (r+1) F/W): their encoder rows, decoder rows, encoder biases, Adam
// state and dead-latent counters. Every rank sees the whole global batch; the decoder bias (M*d
// values) is replicated and updated identically everywhere.
//
// One step:
//   pre_r = x W_enc_r^T + b_enc_r                        local [B, F/W]
//   BatchTopK: each rank proposes its k*B largest scores relu(pre) * w (w = sum_m ||W_dec^m||), the
//     candidates are all-gathered and the k*B-th largest of them is the global threshold (the
//     sharded top-k of Gao et al. 2024); AuxK does the same per token over the dead latents.
//   xhat = all-reduce(f_r W_dec_r) + b_dec               partial reconstructions summed
//   backward and Adam touch only the rank's own latents; the gradient-norm clip uses the
//   all-reduced squared norm.
// The loss, the data order (the same shuffled stream), the initialisation (the same random
// directions, sliced), the normalisation and every schedule are those of RunTraining, so a sharded
// run ends where an unsharded one does up to float summation order.
//
// Files: only rank 0 writes. The final DIR/crosscoder.safetensors + config.json +
// train_metrics.json, and checkpoints under DIR/checkpoint, use exactly RunTraining's formats (the
// shards are gathered), so checkpoints move freely between sharded runs of any world size and
// unsharded runs, in both directions (TrainOptions::resume).
//
// Memory: parameters and Adam state are ~1/W per rank during training; the full model exists
// transiently on every rank while the shards are gathered for a checkpoint or the final output.
// Requires dict_size divisible by the world size. Not thread-safe.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/common/progress.h"
#include "core/crosscoder/batch_source.h"
#include "core/crosscoder/trainer.h"

namespace crossdiff::crosscoder {

// The latents rank `rank` of `world` owns: [begin, begin + count).
struct LatentShard {
  int64_t begin = 0;
  int64_t count = 0;
};
LatentShard LatentShardOf(int64_t dict_size, int rank, int world);

// Like RunTrainingOnRows, with the latents sharded over `comm` (nullptr or world size 1: one shard
// holding everything). Errors: those of RunTrainingOnRows, plus INVALID_ARGUMENT when dict_size is
// not divisible by the world size.
absl::StatusOr<TrainResult> RunShardedTrainingOnRows(const TrainOptions& options,
                                                     const RowProvider& rows,
                                                     comm::Communicator* comm,
                                                     ProgressMeter::Callback progress);

// The same on options.store_dir.
absl::StatusOr<TrainResult> RunShardedTraining(const TrainOptions& options,
                                               comm::Communicator* comm,
                                               ProgressMeter::Callback progress);

}  // namespace crossdiff::crosscoder
