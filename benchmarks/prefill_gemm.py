"""Prefill GEMMs inside the compiled step against torch.mm alone on the same shapes, on a GPU.

Random-weight Qwen3-0.6B (throughput.random_model), the default backend, graphs on. For each T
in --tokens, T / 1,024 prompts of 1,024 tokens run one prefill step (max_tokens=1,
max_num_batched_tokens=T) under torch.profiler, and the device time of its GEMM kernels
(cuBLAS / CUTLASS names, as benchmarks/profile_step.py classes them) is summed. Then torch.mm
alone on the step's shapes, unpadded: per layer x [T, E] times the fused qkv and gate_up
weights, the attention output [T, H*D] times o_proj, the activation [T, I] times down_proj
(each weight transposed, as the model multiplies), and the LM head on the last token of each
prompt; CUDA events, each shape timed over many runs. Issue target: the step's GEMMs within
1.15x of torch.mm.

    python benchmarks/prefill_gemm.py [--tokens 2048,4096,8192]
"""
import argparse
import sys
import tempfile

import torch

sys.path.insert(0, "benchmarks")
from attn_kernel import time_us  # noqa: E402
from throughput import random_model  # noqa: E402

from functional_llm import LLM, SamplingParams  # noqa: E402

GEMM = ("gemm", "cutlass", "nvjet", "sm90", "sm80", "cublas", "matmul", "splitk")
PROMPT = 1024


def step_gemm_us(llm, prompts) -> tuple:
    """(GEMM device us, all kernels' device us, GEMM launches) of one profiled prefill step."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)     # same shapes once first
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    rows = [(e.key.lower(), e.count, e.self_device_time_total) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    gemm = [(us, n) for name, n, us in rows if any(k in name for k in GEMM)]
    return sum(us for us, _ in gemm), sum(us for _, _, us in rows), sum(n for _, n in gemm)


def mm_us(params: dict, cfg, T: int, seqs: int) -> float:
    """torch.mm alone over the step's GEMM shapes (see the module docstring), in us."""
    layer = "model.layers.0."
    ws = [params[layer + n] for n in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                      "mlp.gate_up_proj.weight", "mlp.down_proj.weight")]
    total = 0.0
    for w in ws:
        x = torch.randn(T, w.shape[1], device="cuda", dtype=w.dtype)
        total += cfg.num_layers * time_us(lambda: torch.mm(x, w.t()), iters=50)
    head = params["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    x = torch.randn(seqs, head.shape[1], device="cuda", dtype=head.dtype)
    return total + time_us(lambda: torch.mm(x, head.t()), iters=50)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,4096,8192")
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    folder = random_model(tempfile.mkdtemp())
    llm = LLM(folder, attention_backend=args.backend, max_model_len=2 * PROMPT,
              max_num_batched_tokens=max(sizes), max_num_seqs=max(sizes) // PROMPT,
              enable_prefix_caching=False)     # the same prompts twice: no cache hits
    runner = llm.engine.runner
    name = torch.cuda.get_device_name(0)
    for T in sizes:
        seqs = T // PROMPT
        prompts = [[(7919 * (i + 1) * (j + 3)) % 30000 + 100 for j in range(PROMPT)] for i in range(seqs)]
        gemm, total, launches = step_gemm_us(llm, prompts)
        alone = mm_us(runner.model.params, runner.model.cfg, T, seqs)
        print(f"prefill_gemm device={name!r} tokens={T} seqs={seqs} step_gemm_us={gemm:.1f} "
              f"gemm_launches={launches} step_all_kernels_us={total:.1f} mm_alone_us={alone:.1f} "
              f"ratio={gemm / alone:.3f}", flush=True)
    llm.close()


if __name__ == "__main__":
    main()
