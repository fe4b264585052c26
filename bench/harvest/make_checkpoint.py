#!/usr/bin/python3
"""Generates the harvest benchmark's inputs: a random Llama-shaped base checkpoint, a fine-tune with
perturbed weights (both HF directories: config.json + model.safetensors) and a pre-tokenized dataset
(input_ids [sequences, seq_len] I64). Deterministic for a given seed."""
import argparse
import json
import os

import numpy as np

import safetensors_np


def llama_weights(rng, cfg):
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, d, std=1.0),
         "model.norm.weight": np.ones(d, np.float32),
         "lm_head.weight": normal(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + normal(d, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + normal(d, std=0.1)
        w[p + "self_attn.q_proj.weight"] = normal(d, d)
        w[p + "self_attn.k_proj.weight"] = normal(kv, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, d)
        w[p + "mlp.gate_proj.weight"] = normal(f, d)
        w[p + "mlp.up_proj.weight"] = normal(f, d)
        w[p + "mlp.down_proj.weight"] = normal(d, f)
    return w


def write_model(path, cfg, weights):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    safetensors_np.write(os.path.join(path, "model.safetensors"), weights)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": a.hidden, "intermediate_size": a.intermediate,
           "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
           "num_key_value_heads": a.heads, "vocab_size": a.vocab,
           "max_position_embeddings": max(2048, a.seq_len), "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    rng = np.random.default_rng(a.seed)
    base = llama_weights(rng, cfg)
    write_model(os.path.join(a.out, "base"), cfg, base)
    tuned = {k: (t + rng.standard_normal(t.shape, dtype=np.float32) * 0.01 * (t.std() + 1e-3))
             .astype(np.float32) for k, t in base.items()}
    write_model(os.path.join(a.out, "finetune"), cfg, tuned)
    ids = rng.integers(0, a.vocab, size=(a.sequences, a.seq_len), dtype=np.int64)
    safetensors_np.write(os.path.join(a.out, "tokens.safetensors"), {"input_ids": ids})
    print(f"wrote {a.out}/base, {a.out}/finetune (hidden {a.hidden}, {a.layers} layers, "
          f"{a.heads} heads, vocab {a.vocab}, intermediate {a.intermediate}) and "
          f"{a.sequences} x {a.seq_len} tokens")


if __name__ == "__main__":
    main()
