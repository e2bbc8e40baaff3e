"""Batch-1 decode speed on a GPU: one request, a 128-token prompt, 512 generated tokens, on the
random-weight Qwen3-0.6B of throughput.py, against its floor (every decode step reads all the
weights and the request's KV once: bytes / measured copy bandwidth).

    python benchmarks/latency.py [--backend flash] [--enforce-eager] [--sync]
Prints one JSON line: decode tok/s, time to first token, floor tok/s and % of floor.
"""
import argparse
import json
import random
import tempfile
import time

import torch

from throughput import QWEN3_06B, copy_bandwidth, random_model

PROMPT, NEW = 128, 512


def floor_seconds(bandwidth: float) -> float:
    c = QWEN3_06B
    E, F, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    layer = 2 * E * c["num_attention_heads"] * D + 2 * E * c["num_key_value_heads"] * D + 3 * E * F
    weights = 2 * (c["num_hidden_layers"] * layer + c["vocab_size"] * E)
    per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * D * 2
    kv = sum(PROMPT + i for i in range(NEW - 1)) * per_token
    return ((NEW - 1) * weights + kv) / bandwidth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync", action="store_true", help="async_scheduling off")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from functional_llm import LLM, SamplingParams

    bandwidth = copy_bandwidth()
    folder = random_model(tempfile.mkdtemp(prefix="qwen3-0.6b-random-"))
    llm = LLM(folder, attention_backend=args.backend, max_model_len=4096, max_num_seqs=8,
              enforce_eager=args.enforce_eager, async_scheduling=not args.sync)
    random.seed(1)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=NEW)
    llm.generate([[random.randint(0, 10000) for _ in range(PROMPT)]], params, use_tqdm=False)  # warm-up
    decode, ttft = [], []
    for _ in range(args.runs):
        prompt = [random.randint(0, 10000) for _ in range(PROMPT)]   # no prefix-cache hits
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.add_request(prompt, params)
        first = None
        while llm.has_unfinished_requests():
            for out in llm.step():
                if first is None and out.token_ids:
                    first = time.perf_counter()
                    n_first = len(out.token_ids)
        torch.cuda.synchronize()
        end = time.perf_counter()
        assert len(out.token_ids) == NEW
        ttft.append(first - t0)
        decode.append((NEW - n_first) / (end - first))
    tok_s = sorted(decode)[len(decode) // 2]
    floor_tok_s = (NEW - 1) / floor_seconds(bandwidth)
    print(json.dumps(dict(engine="functional_llm", backend=llm.engine.runner.model.backend.name,
                          gpu=torch.cuda.get_device_name(0), decode_tok_s=round(tok_s, 1),
                          ttft_ms=round(1e3 * sorted(ttft)[len(ttft) // 2], 2),
                          floor_tok_s=round(floor_tok_s), pct_of_floor=round(100 * tok_s / floor_tok_s, 1),
                          copy_bw_TBs=round(bandwidth / 1e12, 3), async_scheduling=llm.engine.pipeline,
                          cuda_graphs=llm.engine.runner.graphs is not None)), flush=True)


if __name__ == "__main__":
    main()
