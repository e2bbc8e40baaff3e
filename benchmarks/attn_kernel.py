"""Paged decode attention, one layer, on a GPU: the triton backend against the copy bandwidth.

Qwen3-0.6B attention shapes (16 q heads, 8 kv heads, head_dim 128, bf16); 256 sequences of 850
keys each decode one token (--ragged: 100 .. 1,600 keys each, mean 850); pages of --block-size
tokens (default: the triton backend's for the pool) handed out in random order, as a
long-running pool would. Times with CUDA events over many iterations, both eagerly and replayed
from a CUDA graph (no launch gaps):
  attend  = the decode kernel (+ the split combine, when the heuristic splits)
  forward = KV write + attend (what the model calls per layer)
KV read per call = seqs x context x kv_heads x head_dim x 2 (K and V) x 2 bytes; bandwidth =
that / time, next to a 2 GiB device-to-device copy measured in the same run (read + write
bytes / time). The reference backend's forward is timed too. --sweep adds one line per decode
tile config (keys per tile, warps, pipeline stages, splits) for tuning. --kv-cache-dtype fp8:
the pool quantized (kernels/base.py); bytes read = 1 per element + a 4-byte scale per (token,
kv head) row, and `bf16eq` is the bf16 pool's bytes over the same time (the speed-up as
bandwidth). rel_err_vs_fp32: |out - exact| / |exact| (L2), exact = fp32 attention over the
unquantized cache.

    python benchmarks/attn_kernel.py [--block-size 16|128] [--num-seqs 256] [--context 850] [--ragged]
                                     [--sweep] [--no-reference] [--kv-cache-dtype auto|fp8]
    python benchmarks/attn_kernel.py --prefill [--prefill-tokens 8192] [--num-seqs 8]
Prints a few `key=value` lines; the last is the summary.
"""
import argparse
import math

import torch

from functional_llm.kernels.base import AttnBatch, cache_views, new_pool, quantize
from functional_llm.kernels.reference import ReferenceBackend
from functional_llm.kernels.triton_attn import TritonBackend, attend, choose_num_splits

H, K, D = 16, 8, 128


def time_us(fn, iters: int, warmup: int = 10, graph: bool = False) -> float:
    """Mean microseconds per call of fn, by CUDA events; graph: capture one call, replay it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(3):
            g.replay()
        fn = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a), iters=20, warmup=3)
    return 2 * nbytes / (us * 1e-6)


def make_batch(num_seqs: int, context: int, S: int, ragged: bool = False):
    """Inputs of one decode step: every sequence holds `context` keys after it (the new
    token's K/V included; ragged: a uniform draw from 100 .. 2 x context - 100 each, mean
    `context`, as the headline's sequences differ), on randomly ordered pages."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = (torch.randint(100, 2 * context - 99, (num_seqs,), device="cuda", generator=g)
            if ragged else torch.full((num_seqs,), context, device="cuda"))
    longest = int(lens.max())
    pages = math.ceil(longest / S)
    N = num_seqs * pages + 1
    kv = torch.randn(2, N, S, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(N, device="cuda", generator=g)[:num_seqs * pages].view(num_seqs, pages)
    tables = tables.to(torch.int32)
    last = lens - 1
    slots = tables.gather(1, (last // S)[:, None])[:, 0].long() * S + last % S
    cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
    batch = AttnBatch(slot_mapping=slots, cu_q=cu_q, seq_lens=lens.to(torch.int32),
                      block_tables=tables, max_q=1, max_seq_len=longest)
    q = torch.randn(num_seqs, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(num_seqs, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(num_seqs, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, kv[None], batch        # pool [1, 2, N, S, K, D]: one layer


def to_fp8(pool: torch.Tensor) -> torch.Tensor:
    """The bf16 pool [1, 2, N, S, K, D] quantized into the fp8 pool's layout."""
    _, _, N, S, _, _ = pool.shape
    fp8 = new_pool(1, N, S, K, D, pool.dtype, True, pool.device)
    for i in (0, 1):
        values, scales = cache_views(fp8, 0, i, K, D)
        values[:], scales[:] = quantize(pool[0, i])
    return fp8


def prefill(args, copy_bw):
    """--prefill: causal attention over fresh prompts of --prefill-tokens tokens in all, split
    into --num-seqs sequences, written to the paged pool (the KV write included): the triton
    backend's forward against flash-attn 4's varlen kernel over the same q/k/v held
    contiguously (no pages), both replayed from CUDA graphs. FLOP/s counts the causal half."""
    from flash_attn.cute import flash_attn_varlen_func
    T, B, S = args.prefill_tokens, args.num_seqs, args.block_size
    n = T // B
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = math.ceil(n / S)
    pool = torch.zeros(1, 2, B * pages + 1, S, K, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(B * pages, device="cuda", generator=g).view(B, pages).to(torch.int32)
    pos = torch.arange(n, device="cuda")
    slots = (tables[:, pos // S].long() * S + pos % S).reshape(-1)
    cu = torch.arange(0, T + 1, n, dtype=torch.int32, device="cuda")
    batch = AttnBatch(slot_mapping=slots, cu_q=cu, seq_lens=torch.full((B,), n, dtype=torch.int32,
                      device="cuda"), block_tables=tables, max_q=n, max_seq_len=n)
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, K, K))
    backend, scale = TritonBackend(), D ** -0.5
    ours = lambda: backend.forward(q, k, v, pool, 0, batch, scale)  # noqa: E731
    flash = lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,  # noqa: E731
                                           max_seqlen_q=n, max_seqlen_k=n, softmax_scale=scale,
                                           causal=True)
    out, ref = ours(), flash()
    ref = ref[0] if isinstance(ref, tuple) else ref
    flops = B * 2 * 2 * H * D * n * n / 2
    times = {"triton": time_us(ours, args.iters, graph=True), "flash4": time_us(flash, args.iters, graph=True)}
    print(f"prefill tokens={T} seqs={B} block_size={S} " + " ".join(
          f"{name}={us:.1f}us {flops / (us * 1e-6) / 1e12:.1f}TFLOP/s" for name, us in times.items())
          + f" triton/flash4={times['triton'] / times['flash4']:.2f}x"
          f" max_abs_diff={(out.float() - ref.float()).abs().max().item():.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-size", type=int, default=None,
                    help="default: the triton backend's for the pool (16 bf16, 128 fp8)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=850)
    ap.add_argument("--splits", type=int, default=0, help="decode splits (0: the heuristic's)")
    ap.add_argument("--ragged", action="store_true", help="contexts drawn from 100 .. 2 x context - 100")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--prefill", action="store_true", help="prefill attention vs flash-attn 4 varlen")
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = ap.parse_args()
    if args.block_size is None:
        args.block_size = TritonBackend.block_sizes[args.kv_cache_dtype == "fp8"]
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw = copy_bandwidth()
    torch.cuda.empty_cache()          # give the copy's 4 GiB back before the pool is made
    if args.prefill:
        return prefill(args, copy_bw)
    q, k, v, pool, batch = make_batch(args.num_seqs, args.context, args.block_size, args.ragged)
    keys = int(batch.seq_lens.sum())
    fp8 = args.kv_cache_dtype == "fp8"
    exact_pool = pool.float()         # fp32 attention over the unquantized cache: the error's yardstick
    if fp8:
        pool = to_fp8(pool)
    (k_cache, k_scale), (v_cache, v_scale) = (cache_views(pool, 0, i, K, D) for i in (0, 1))
    bf16_bytes = keys * K * D * 2 * 2
    kv_bytes = keys * K * (D + 4) * 2 if fp8 else bf16_bytes
    scale = D ** -0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    head = (f"device={torch.cuda.get_device_name(0)!r} seqs={args.num_seqs} context={args.context} "
            f"ragged={args.ragged} block_size={args.block_size} kv_cache_dtype={args.kv_cache_dtype} "
            f"kv_read_MB={kv_bytes / 1e6:.1f} "
            f"copy_TBps={copy_bw / 1e12:.3f}")
    print(head, flush=True)

    def line(label, us):
        bw = kv_bytes / (us * 1e-6)
        eq = f" {100 * bf16_bytes / (us * 1e-6) / copy_bw:.1f}%copy_bf16eq" if fp8 else ""
        return f"{label}={us:.1f}us {bw / 1e12:.3f}TB/s {100 * bw / copy_bw:.1f}%copy" + eq

    def attend_fn(backend, order=None):
        return lambda: attend(q, k_cache, v_cache, batch.cu_q, batch.seq_lens, batch.block_tables,
                              batch.max_seq_len, scale, backend.tiles, (k_scale, v_scale), order)

    if args.sweep:
        for block_n in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                for splits in (1, 2):
                    backend = TritonBackend(num_splits=splits, decode_block_n=block_n,
                                            decode_warps=warps, decode_stages=stages)
                    try:
                        us = time_us(attend_fn(backend), args.iters, graph=True)
                        print(f"sweep block_n={block_n} warps={warps} stages={stages} "
                              f"splits={splits} " + line("attend_graph", us), flush=True)
                    except Exception as e:   # e.g. out of shared memory: report, go on
                        print(f"sweep block_n={block_n} warps={warps} stages={stages} "
                              f"splits={splits} failed: {type(e).__name__}: {str(e)[:80]}")

    backend = TritonBackend(num_splits=args.splits)
    prepared = backend.prepare(batch)      # (the longest-first order of the decode programs)
    forward = lambda: backend.forward(q, k, v, pool, 0, prepared, scale)  # noqa: E731
    ours = forward()
    parts = [f"splits={args.splits or choose_num_splits(args.num_seqs, K, batch.max_seq_len, sms)}",
             line("attend_graph", time_us(attend_fn(backend, prepared.extra), args.iters, graph=True)),
             line("attend_graph_unordered", time_us(attend_fn(backend), args.iters, graph=True)),
             line("attend_eager", time_us(attend_fn(backend), args.iters)),
             line("forward_graph", time_us(forward, args.iters, graph=True))]
    if not args.no_reference:
        ref_backend = ReferenceBackend()
        ref_prepared = ref_backend.prepare(batch)
        ref = ref_backend.forward(q, k, v, pool, 0, ref_prepared, scale)
        us = time_us(lambda: ref_backend.forward(q, k, v, pool, 0, ref_prepared, scale),
                     max(10, args.iters // 10))
        parts += [line("reference_forward_eager", us),
                  f"max_abs_diff_vs_reference={(ours.float() - ref.float()).abs().max().item():.2e}"]
    exact_ref = ReferenceBackend()
    exact = exact_ref.forward(q.float(), k.float(), v.float(), exact_pool, 0, exact_ref.prepare(batch), scale)
    parts.append(f"rel_err_vs_fp32={((ours.float() - exact).norm() / exact.norm()).item():.2e}")
    print("summary " + head + " " + " ".join(parts), flush=True)


if __name__ == "__main__":
    main()
