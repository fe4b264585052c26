#!/usr/bin/python3
"""Eager PyTorch reference for the harvest benchmark: the same Llama forward as Hugging Face's eager
implementation, written out in plain torch ops, run on base and fine-tune over the same batches and
stopped after block --layer; rows (one per token, both models stacked) are written in shards as the
C++ harvest does. Prints the harvest rate in tokens/s.

  reference_llama.py --base DIR --finetune DIR --data tokens.safetensors --layer 4 \
      --max-tokens N --batch 8 --threads T --out DIR [--check-store STORE]
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

import safetensors_np


class Llama:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = json.load(f)
        raw = safetensors_np.read(os.path.join(model_dir, "model.safetensors"))
        self.w = {k: torch.from_numpy(np.array(v)) for k, v in raw.items()}
        c = self.cfg
        self.d = c["hidden_size"]
        self.h = c["num_attention_heads"]
        self.kv = c["num_key_value_heads"]
        self.hd = c.get("head_dim", self.d // self.h)
        self.eps = c["rms_norm_eps"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, self.hd, 2, dtype=torch.int64)
                                                   .float() / self.hd))

    def rms(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def residual_after_block(self, ids, mask, layer):
        """Residual stream after block `layer` (0-based), [B, T, d]; later blocks never run."""
        B, T = ids.shape
        x = self.w["model.embed_tokens.weight"][ids]
        pos = torch.arange(T, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        neg = torch.finfo(torch.float32).min
        causal = torch.full((T, T), neg).triu(1)
        additive = causal[None, None] + (1.0 - mask[:, None, None, :].float()) * neg
        additive = additive.clamp(min=neg)
        for i in range(layer + 1):
            p = f"model.layers.{i}."
            w = self.w
            hs = self.rms(x, w[p + "input_layernorm.weight"])
            q = (hs @ w[p + "self_attn.q_proj.weight"].t()).view(B, T, self.h, self.hd).transpose(1, 2)
            k = (hs @ w[p + "self_attn.k_proj.weight"].t()).view(B, T, self.kv, self.hd).transpose(1, 2)
            v = (hs @ w[p + "self_attn.v_proj.weight"].t()).view(B, T, self.kv, self.hd).transpose(1, 2)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            if self.kv != self.h:
                k = k.repeat_interleave(self.h // self.kv, dim=1)
                v = v.repeat_interleave(self.h // self.kv, dim=1)
            att = (q @ k.transpose(2, 3)) / math.sqrt(self.hd) + additive
            att = torch.softmax(att, dim=-1, dtype=torch.float32)
            o = (att @ v).transpose(1, 2).reshape(B, T, self.d)
            x = x + o @ w[p + "self_attn.o_proj.weight"].t()
            hs = self.rms(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(hs @ w[p + "mlp.gate_proj.weight"].t())
            x = x + (gate * (hs @ w[p + "mlp.up_proj.weight"].t())) @ w[p + "mlp.down_proj.weight"].t()
        return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--finetune", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows-per-shard", type=int, default=65536)
    ap.add_argument("--out", required=True)
    ap.add_argument("--check-store", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base, tuned = Llama(a.base), Llama(a.finetune)
    ids_all = torch.from_numpy(np.array(safetensors_np.read(a.data)["input_ids"]))
    S, T = ids_all.shape
    if a.max_tokens > 0:
        S = min(S, -(-a.max_tokens // T))
    os.makedirs(a.out, exist_ok=True)

    pending, pending_rows, shard, rows = [], 0, 0, 0

    def flush(final):
        nonlocal pending, pending_rows, shard
        while pending_rows >= a.rows_per_shard or (final and pending_rows > 0):
            allrows = np.concatenate(pending)
            n = min(a.rows_per_shard, pending_rows)
            np.save(os.path.join(a.out, f"shard-{shard:06d}.npy"), allrows[:n])
            pending = [allrows[n:]]
            pending_rows -= n
            shard += 1

    first_rows = None
    start = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, S, a.batch):
            ids = ids_all[b0:b0 + a.batch]
            mask = torch.ones_like(ids)
            xb = base.residual_after_block(ids, mask, a.layer)
            xf = tuned.residual_after_block(ids, mask, a.layer)
            keep = mask.reshape(-1).nonzero().squeeze(1)
            both = torch.stack((xb.reshape(-1, base.d)[keep], xf.reshape(-1, base.d)[keep]), 1)
            arr = both.numpy().copy()
            if first_rows is None:
                first_rows = arr
            pending.append(arr)
            pending_rows += arr.shape[0]
            rows += arr.shape[0]
            flush(False)
    flush(True)
    seconds = time.perf_counter() - start
    print(f"reference: {rows} rows in {seconds:.2f}s: {rows / seconds:.0f} tokens/s "
          f"(threads {a.threads}, batch {a.batch}, layer {a.layer})")
    if a.check_store:
        with open(os.path.join(a.check_store, "manifest.json")) as f:
            first_shard = json.load(f)["shards"][0]["file"]
        acts = safetensors_np.read(os.path.join(a.check_store, first_shard), ["activations"])
        got = acts["activations"]
        n = min(len(got), len(first_rows))
        diff = np.abs(got[:n] - first_rows[:n]).max()
        print(f"check: max |C++ store - reference| over the first {n} rows = {diff:.3g}")


if __name__ == "__main__":
    main()
