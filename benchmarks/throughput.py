"""The headline offline-throughput workload (BENCHMARK.md) on a GPU.

Qwen3-0.6B architecture with random bf16 weights, written as an HF folder (config.json +
model.safetensors) and loaded through the normal loader. 256 requests, prompt lengths
100..1024, output lengths 100..1024 (random.seed(0)), temperature 0.6, ignore_eos.

    python benchmarks/throughput.py [--backend triton] [--num-seqs 256] [--block-size 16]
                                    [--enforce-eager] [--hf] [--sync] [--gaps]
Prints one JSON line: output tokens, seconds, tok/s, copy bandwidth, floor and % of floor.
"""
import argparse
import gc
import json
import random
import tempfile
import time

import torch

QWEN3_06B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1000000, rms_norm_eps=1e-6, max_position_embeddings=40960,
                 attention_bias=False, hidden_act="silu", eos_token_id=151645, bos_token_id=151643,
                 torch_dtype="bfloat16")


def workload(num_seqs):
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
               for _ in range(num_seqs)]
    return prompts, [random.randint(100, 1024) for _ in range(num_seqs)]


def random_model(folder, config=QWEN3_06B, device="cuda") -> str:
    """Random bf16 weights for every parameter the spec lists, saved as an HF folder (serve.py
    passes a toy config and the CPU for its CPU runs)."""
    from functional_llm.model.config import load_config
    from functional_llm.model.loader import write_params
    from functional_llm.model.spec import param_specs
    with open(f"{folder}/config.json", "w") as f:
        json.dump(config, f)
    write_params(folder, {})         # a valid, empty weights file so the config can be read
    cfg = load_config(folder)
    g = torch.Generator(device=device).manual_seed(0)
    params = {}
    for name, spec in param_specs(cfg).items():
        if spec.dtype_role == "norm":
            t = torch.ones(spec.shape, device=device)
        else:
            t = torch.randn(spec.shape, device=device, generator=g) * 0.02
        params[name] = t.to(torch.bfloat16).cpu()
    write_params(folder, params)
    return folder


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / sorted(times)[len(times) // 2]


def floor_seconds(prompts, outs, bandwidth, kv_bytes=2, weight_bytes=2) -> float:
    """Bytes that decode must move at least (KV reads + weight reads + KV writes) / bandwidth."""
    c = QWEN3_06B
    per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * kv_bytes
    kv_read = sum(len(p) * o + o * (o - 1) // 2 for p, o in zip(prompts, outs)) * per_token
    E, F, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    layer = 2 * E * c["num_attention_heads"] * D + 2 * E * c["num_key_value_heads"] * D + 3 * E * F
    n_params = c["num_hidden_layers"] * layer + c["vocab_size"] * E
    kv_write = (sum(map(len, prompts)) + sum(outs)) * per_token
    return (kv_read + max(outs) * n_params * weight_bytes + kv_write) / bandwidth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None, help="default: the best available")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=None, help="default: the backend's choice")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="auto (bf16) or fp8 (e4m3 + a float32 scale per token and kv head); "
                         "fp8 also reports %% of the fp8 floor")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="LLM(batch_invariant=True); run it and the default in one device call "
                         "to get the mode's cost")
    ap.add_argument("--hf", action="store_true", help="also time HF generate on 16 requests")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--sync", action="store_true", help="async_scheduling off (the synchronous loop)")
    ap.add_argument("--startup-only", action="store_true", help="report the start-up time and exit")
    ap.add_argument("--gaps", action="store_true",
                    help="time the device's idle gaps between steps (CUDA events around each launch)")
    args = ap.parse_args()
    from functional_llm import LLM, SamplingParams

    bandwidth = copy_bandwidth()
    prompts, outs = workload(args.num_seqs)
    floor = floor_seconds(prompts, outs, bandwidth)
    folder = random_model(tempfile.mkdtemp(prefix="qwen3-0.6b-random-"))
    t0 = time.perf_counter()
    llm = LLM(folder, attention_backend=args.backend, block_size=args.block_size, max_model_len=4096,
              enforce_eager=args.enforce_eager, async_scheduling=not args.sync,
              tensor_parallel_size=args.tp, kv_cache_dtype=args.kv_cache_dtype,
              batch_invariant=args.batch_invariant)
    startup = dict(startup_s=round(time.perf_counter() - t0, 1),
                   capture_s=round(getattr(llm.engine.runner.graphs, "capture_seconds", 0.0), 1),
                   compile_s=round(getattr(llm.engine.runner.graphs, "compile_seconds", 0.0), 1),
                   graphs=len(getattr(llm.engine.runner.graphs, "graphs", ())))
    if args.startup_only:   # (a second process sharing TORCHINDUCTOR_CACHE_DIR: the warm figure)
        print(json.dumps(startup), flush=True)
        print(torch._dynamo.utils.compile_times(), flush=True)   # seconds per compiler phase
        return
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in outs]
    # warm-up (graphs are all captured at start-up; this warms allocators and caches)
    warm = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1 + i % 64) for i in range(len(outs))]
    llm.generate([[20000 + t for t in p[:64]] for p in prompts], warm, use_tqdm=False)  # no shared prefix
    # every bucket and sampler mode was compiled and captured at start-up: nothing may
    # compile inside the timed run
    torch._dynamo.config.error_on_recompile = True
    events = watch_launches(llm.engine.runner) if args.gaps else None
    collections = watch_collector() if args.gaps else None
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if collections is not None:
        gc.callbacks.pop()
    n_out = sum(len(r.token_ids) for r in results)
    report = dict(engine="functional_llm", backend=llm.engine.runner.model.backend.name,
                  block_size=llm.engine.sched.block_size, cuda_graphs=llm.engine.runner.graphs is not None,
                  gpu=torch.cuda.get_device_name(0), output_tokens=n_out, seconds=round(dt, 3),
                  tok_s=round(n_out / dt), copy_bw_TBs=round(bandwidth / 1e12, 3),
                  floor_s=round(floor, 3), pct_of_floor=round(100 * floor / dt, 1),
                  steps=llm.counters["steps"], preemptions=llm.counters["preemptions"],
                  async_scheduling=llm.engine.pipeline, tensor_parallel_size=args.tp,
                  batch_invariant=args.batch_invariant, **startup)
    if llm.engine.runner.kv.dtype == torch.uint8:     # fp8: 1 byte per value + 4 per row of D
        fp8_floor = floor_seconds(prompts, outs, bandwidth, kv_bytes=1 + 4 / QWEN3_06B["head_dim"])
        report.update(kv_cache_dtype="fp8", fp8_floor_s=round(fp8_floor, 3),
                      pct_of_fp8_floor=round(100 * fp8_floor / dt, 1))
    if events:
        report.update(gap_summary(events, dt))
        report["gc_ms"] = {g: round(sum(ms for gen, ms in collections if gen == g), 1) for g in (0, 1, 2)}
        report["gc_max_ms"] = round(max((ms for _, ms in collections), default=0.0), 1)
    if args.hf:
        report["hf_tok_s"] = round(hf_generate(folder, prompts[:16], outs[:16]))
    print(json.dumps(report), flush=True)


def watch_launches(runner) -> list:
    """Record a CUDA event on the stream before and after every step the runner launches."""
    events, launch = [], runner.launch

    def timed(host, *a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = launch(host, *a, **k)
        end.record()
        events.append((start, end, host.is_decode))
        return out

    runner.launch = timed
    return events


def watch_collector() -> list:
    """(generation, ms) of every cyclic-GC collection from now on (host pauses)."""
    out, start = [], {}

    def callback(phase, info):
        if phase == "start":
            start["t"] = time.perf_counter()
        else:
            out.append((info["generation"], 1e3 * (time.perf_counter() - start["t"])))

    gc.callbacks.append(callback)
    return out


def gap_summary(events, seconds) -> dict:
    """The device's idle time between steps: from one step's end to the next one's start
    (the start event completes when the host has queued it, or when the previous work ends)."""
    gaps = [e.elapsed_time(s) for (_, e, _), (s, _, _) in zip(events, events[1:])]
    busy = [s.elapsed_time(e) for s, e, _ in events]
    decode = [b for b, (_, _, d) in zip(busy, events) if d]
    return dict(gap_ms_total=round(sum(gaps)), gap_ms_median=round(sorted(gaps)[len(gaps) // 2], 3),
                gap_ms_max=round(max(gaps), 1), gap_pct=round(100 * sum(gaps) / 1e3 / seconds, 1),
                step_ms_median=round(sorted(busy)[len(busy) // 2], 3),
                decode_busy_ms=round(sum(decode)), other_busy_ms=round(sum(busy) - sum(decode)),
                decode_steps=len(decode), gaps_over_5ms=sum(g > 5 for g in gaps),
                largest_gaps=[(i, round(gaps[i], 1), events[i][2], events[i + 1][2]) for i in
                              sorted(range(len(gaps)), key=gaps.__getitem__)[-3:]])


def hf_generate(folder, prompts, outs) -> float:
    """Hugging Face padded generate on the same requests (same sampling temperature)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    width, new = max(map(len, prompts)), max(outs)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = (torch.arange(width, device="cuda")[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                      device="cuda")[:, None]).long()
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                   do_sample=True, temperature=0.6, pad_token_id=0)
    torch.cuda.synchronize()
    return sum(outs) / (time.perf_counter() - t)   # useful tokens only: padding work is waste


if __name__ == "__main__":
    main()
