"""What an 8-bit KV cache costs in accuracy on the GPU, at real shapes: random-weight
Qwen3-0.6B (benchmarks/throughput.py's model), bf16 weights, triton backend.

--seqs prompts of --prompt tokens (random ids) are prefilled in chunks of 256 tokens, so later
chunks read the cached prefix back through the pool, then --steps decode steps are fed the same
tokens in every run (the bf16 run's greedy picks), so the decode kernel reads the pool at every
step. Three runs: bf16 weights with a bf16 pool, the same with the fp8 pool, and fp32 weights
with an fp32 pool (the yardstick). Per run, over the logits of every decode step: relative L2
error against the fp32 run, and top-1 agreement. The line that matters is fp8 against bf16: the
error the cache adds on top of bf16's own. Prints one JSON line.

    python benchmarks/kv_fp8_gpu_accuracy.py [--seqs 16] [--prompt 1000] [--steps 32]
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import random_model  # noqa: E402

from functional_llm.kernels import get_backend  # noqa: E402
from functional_llm.kernels.base import AttnBatch, new_pool  # noqa: E402
from functional_llm.model import compute_logits, forward, fuse_params, load_config, load_params  # noqa: E402

S, CHUNK = 16, 256


def run(folder, dtype, fp8, prompts, steps, feed=None):
    """Logits [steps, B, V] of the decode steps (and the greedy tokens, when feed is None)."""
    cfg = load_config(folder)
    params = fuse_params(load_params(folder, cfg, dtype, "cuda"), cfg)
    backend = get_backend("triton")
    B, P = len(prompts), len(prompts[0])
    pages = -(-(P + steps) // S)
    kv = new_pool(cfg.num_layers, B * pages + 1, S, cfg.num_kv_heads, cfg.head_dim, dtype, fp8, "cuda")
    tables = torch.arange(B * pages, dtype=torch.int32, device="cuda").view(B, pages)

    def step(new, start):        # new: [B, q] token ids at positions start .. start+q-1
        q = new.shape[1]
        pos = torch.arange(start, start + q, device="cuda").expand(B, q)
        slots = (tables.gather(1, (pos // S).int()).long() * S + pos % S).reshape(-1)
        batch = AttnBatch(slot_mapping=slots, cu_q=torch.arange(0, B * q + 1, q, dtype=torch.int32, device="cuda"),
                          seq_lens=torch.full((B,), start + q, dtype=torch.int32, device="cuda"),
                          block_tables=tables, max_q=q, max_seq_len=start + q)
        hidden = forward(params, cfg, new.reshape(-1), pos.reshape(-1), backend.prepare(batch), kv, backend)
        return compute_logits(params, cfg, hidden.view(B, q, -1)[:, -1])

    ids = torch.tensor(prompts, device="cuda")
    with torch.no_grad():
        for start in range(0, P, CHUNK):
            logits = step(ids[:, start:start + CHUNK], start)
        out, tokens = [], []
        for t in range(steps):
            tok = logits.argmax(-1) if feed is None else feed[t]
            tokens.append(tok)
            logits = step(tok[:, None], P + t)
            out.append(logits.float())
    return torch.stack(out), tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = random_model(tempfile.mkdtemp(prefix="qwen3-0.6b-random-"))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 10000, (args.seqs, args.prompt), generator=g).tolist()
    bf16, feed = run(folder, torch.bfloat16, False, prompts, args.steps)
    fp8, _ = run(folder, torch.bfloat16, True, prompts, args.steps, feed)
    fp32, _ = run(folder, torch.float32, False, prompts, args.steps, feed)

    def err(a, b):
        return round(((a - b).norm() / b.norm()).item(), 5)

    def top1(a, b):
        return round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)
    print(json.dumps(dict(
        model="Qwen3-0.6B shapes, random bf16 weights, triton backend", device=torch.cuda.get_device_name(0),
        seqs=args.seqs, prompt_tokens=args.prompt, decode_steps=args.steps,
        rel_err_vs_fp32=dict(bf16_pool=err(bf16, fp32), fp8_pool=err(fp8, fp32)),
        rel_err_fp8_vs_bf16_pool=err(fp8, bf16),
        top1_agree_vs_fp32=dict(bf16_pool=top1(bf16, fp32), fp8_pool=top1(fp8, fp32)),
        top1_agree_fp8_vs_bf16_pool=top1(fp8, bf16))))


if __name__ == "__main__":
    main()
