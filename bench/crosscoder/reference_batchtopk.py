#!/usr/bin/python3
"""Eager PyTorch BatchTopK crosscoder: the baseline of bench/crosscoder/run.sh.

Written from the published equations (Minder et al. 2025; DESIGN.md section 4), the way a research
codebase writes it: nn.Parameters, autograd, torch.optim.Adam, clip_grad_norm_, a LambdaLR warm-up.

  pre    = sum_m x_m W_enc^m + b_enc                 (einsum)
  s      = relu(pre) * w,  w_i = sum_m ||W_dec^m[i]||
  f      = relu(pre) on the top k*B scores of the batch (dense tensor, zeros elsewhere)
  xhat_m = f W_dec^m + b_dec^m                        (dense einsum)
  loss   = mean over (b, m) of ||x_m - xhat_m||_2 + auxk / 32  (AuxK on latents dead for 10M tokens)

Reads the same activation store (manifest.json + F32 safetensors shards, memory-mapped with numpy),
normalises each model so that E||x - mu|| = sqrt(d) from a sample, draws shuffled batches, and prints
`tokens_per_second` over the training steps after a warm-up of 10 steps.
"""
import argparse
import json
import math
import os
import struct
import time

import numpy as np
import torch


def open_store(path):
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("dtype") != "float32":
        raise SystemExit("reference: only float32 stores are supported")
    shards = []
    for shard in manifest["shards"]:
        fname = os.path.join(path, shard["file"])
        with open(fname, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        info = header["activations"]
        begin, end = info["data_offsets"]
        arr = np.memmap(fname, dtype=np.float32, mode="r", offset=8 + n + begin, shape=tuple(info["shape"]))
        shards.append(arr)
    return manifest, np.concatenate(shards, axis=0) if len(shards) > 1 else shards[0]


class BatchTopKCrossCoder(torch.nn.Module):
    def __init__(self, m, d, f, k, init_norm=0.1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(f, 1, d, generator=g)
        direction = direction / direction.norm(dim=-1, keepdim=True) * init_norm
        dec = direction.expand(f, m, d).permute(1, 0, 2).contiguous()  # [M, F, d]
        self.W_dec = torch.nn.Parameter(dec.clone())
        self.W_enc = torch.nn.Parameter(dec.permute(0, 2, 1).contiguous())  # [M, d, F]
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.b_dec = torch.nn.Parameter(torch.zeros(m, d))
        self.k = k

    def forward(self, x, dead_mask, auxk_k, auxk_alpha):
        b = x.shape[0]
        pre = torch.einsum("bmd,mdf->bf", x, self.W_enc) + self.b_enc
        act = torch.relu(pre)
        w = self.W_dec.norm(dim=2).sum(0)  # [F]
        scores = (act * w).flatten()
        top = scores.topk(self.k * b, sorted=False)
        mask = torch.zeros_like(scores).scatter_(0, top.indices, (top.values > 0).float()).view_as(act)
        f = act * mask
        xhat = torch.einsum("bf,mfd->bmd", f, self.W_dec) + self.b_dec
        err = x - xhat
        loss = err.norm(dim=-1).mean()
        aux = torch.zeros(())
        if dead_mask.any():
            resid = err.detach().reshape(b, -1)
            cand = act.masked_fill(~dead_mask.unsqueeze(0), -1.0)
            kk = min(auxk_k, int(dead_mask.sum()))
            idx = cand.topk(kk, dim=1).indices
            fa = torch.zeros_like(act).scatter(1, idx, act.gather(1, idx))
            ahat = torch.einsum("bf,mfd->bmd", fa, self.W_dec).reshape(b, -1)
            aux = (resid - ahat).pow(2).sum() / (resid - resid.mean(0, keepdim=True)).pow(2).sum()
            loss = loss + auxk_alpha * aux
        return loss, f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--dict", type=int, default=512)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dead-tokens", type=int, default=10_000_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    manifest, rows = open_store(args.store)
    n, m, d = rows.shape
    sample = torch.from_numpy(np.array(rows[: min(n, 8192)]))
    mean = sample.mean(0)
    scale = math.sqrt(d) / (sample - mean).norm(dim=-1).mean(0)  # [M]

    model = BatchTopKCrossCoder(m, d, args.dict, args.k, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = min(1000, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    since_fired = torch.zeros(args.dict, dtype=torch.long)
    auxk_k = m * d // 2
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n)
    timed, timed_tokens, timed_cpu = 0.0, 0, 0.0
    loss = torch.zeros(())
    for step in range(args.steps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        pos = (step * args.batch) % (n - args.batch + 1)
        idx = np.sort(order[pos : pos + args.batch])
        x = (torch.from_numpy(np.asarray(rows[idx])) - mean) * scale.view(1, m, 1)
        dead = since_fired >= args.dead_tokens
        loss, f = model(x, dead, auxk_k, 1.0 / 32)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            fired = (f > 0).any(0)
            since_fired += args.batch
            since_fired[fired] = 0
        dt = time.perf_counter() - t0
        if step >= 10:
            timed += dt
            timed_cpu += time.process_time() - c0
            timed_tokens += args.batch
    print(f"reference_tokens_per_second {timed_tokens / timed:.1f}")
    print(f"reference_tokens_per_cpu_second {timed_tokens / timed_cpu:.1f}")
    print(f"reference_final_loss {loss.item():.5f}")


if __name__ == "__main__":
    main()
