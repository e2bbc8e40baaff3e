"""Where a run spends its time, on the GPU:
    python benchmarks/profile_step.py [backend [kv_cache_dtype [headline]]]

1. Host phases (cProfile) and device time per kernel class (torch.profiler; kernels inside
   graph replays included) for 256 requests of 64 tokens each (the headline's prompts); with
   `headline`, the headline workload itself (each request's own max_tokens), and then only this.
2. Kernels per layer of a batch-1 decode step: one request decoding 16 and then 80 tokens;
   the extra kernels / 64 steps / layers."""
import cProfile
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, "benchmarks")
from throughput import random_model, workload  # noqa: E402

from functional_llm import LLM, SamplingParams  # noqa: E402

# kernel name fragments -> class (first match wins; Inductor's fused kernels are triton_*)
CLASSES = [("attention (KV write, decode, combine, prefill)", ("_rope_write_kv", "_decode", "_combine", "_prefill", "flash")),
           ("sampler (kernels/gumbel.py)", ("_gumbel_max",)),
           ("GEMM", ("gemm", "cutlass", "nvjet", "sm90", "sm80", "cublas", "matmul", "splitk")),
           ("fused norms/rope/act/sampler (Inductor)", ("triton_",)),
           ("collectives", ("nccl",)),
           ("copies/fills", ("memcpy", "memset", "copy", "fill"))]


def kernels(prof) -> list:
    """(name, calls, device us) of every kernel the profile saw."""
    return [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
            if e.self_device_time_total > 0]


def by_class(rows) -> dict:
    out = {}
    for name, count, us in rows:
        cls = next((c for c, keys in CLASSES if any(k in name.lower() for k in keys)), "other")
        calls, total = out.get(cls, (0, 0.0))
        out[cls] = (calls + count, total + us)
    return out


def profiled(llm, prompts, params):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    return kernels(prof)


backend = sys.argv[1] if len(sys.argv) > 1 else None
kv_cache_dtype = sys.argv[2] if len(sys.argv) > 2 else "auto"
folder = random_model(tempfile.mkdtemp())
llm = LLM(folder, attention_backend=backend, max_model_len=4096, kv_cache_dtype=kv_cache_dtype)
layers = llm.engine.runner.model.cfg.num_layers
prompts, outs = workload(256)
headline = sys.argv[3:4] == ["headline"]
params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n if headline else 64) for n in outs]
llm.generate([[20000 + t for t in p] for p in prompts], params, use_tqdm=False)  # warm-up
prof = cProfile.Profile()
prof.enable()
rows = profiled(llm, prompts, params)
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(10)
total = sum(us for _, _, us in rows)
print(f"device time {total / 1e3:.1f} ms in {sum(c for _, c, _ in rows)} kernels, by class:")
for cls, (calls, us) in sorted(by_class(rows).items(), key=lambda kv: -kv[1][1]):
    print(f"  {cls:48s} {us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {calls} calls")
print("top kernels:")
for name, count, us in sorted(rows, key=lambda r: -r[2])[:24 if headline else 16]:
    print(f"  {us / 1e3:9.1f} ms {count:7d}  {us / count:8.1f} us  {name[:100]}")
if headline:
    sys.exit()

one = [[7 + i for i in range(32)]]
short, long_ = (profiled(llm, one, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n)])
                for n in (16, 80))
count = {cls: calls for cls, (calls, _) in by_class(long_).items()}
for cls, (calls, _) in by_class(short).items():
    count[cls] -= calls
steps = 64
print(f"batch-1 decode: {sum(count.values()) / steps / layers:.2f} kernels per layer "
      f"({sum(count.values()) / steps:.0f} per step, {layers} layers); per step by class: "
      + ", ".join(f"{c}: {n / steps:.1f}" for c, n in count.items()))
us = {cls: us for cls, (_, us) in by_class(long_).items()}
for cls, (_, s) in by_class(short).items():
    us[cls] -= s
print("batch-1 decode step, device us by class: "
      + ", ".join(f"{c}: {u / steps:.0f}" for c, u in us.items()))
