"""How one rank's device half is built: DeviceSpec (plain values, the same on every
tensor-parallel rank; spawned workers receive it) -> weights (the rank's shard), KV pool,
compiled pieces, Runner. Also the checks a tensor-parallel start would fail, made before it
starts anything."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import attrs
import torch

from functional_llm.core.records import SchedConfig
from functional_llm.errors import InvalidConfig
from functional_llm.kernels import default_backend, get_backend
from functional_llm.kernels.base import block_bytes, new_pool
from functional_llm.model.config import load_config
from functional_llm.model.llama import fuse_params
from functional_llm.model.loader import load_params
from functional_llm.model.sharding import cfg_for_rank, load_params_sharded
from functional_llm.runtime.runner import DeviceModel, Runner

CPU_KV_BYTES = 2 << 30           # default KV pool budget on CPU
GPU_KV_FRACTION = 0.85           # of the memory free after loading weights


@attrs.frozen(slots=True)
class DeviceSpec:
    """Everything the device half (weights, KV pool, Runner) is built from: plain values, the
    same on every tensor-parallel rank (spawned workers receive it)."""

    model: str                    # the HF folder
    dtype: str                    # "float32", "bfloat16", "float16"
    device: str                   # with world > 1 on GPUs, rank r uses cuda:<local rank r>
    attention_backend: str
    block_size: int
    num_kv_blocks: Optional[int]  # None: as many as the memory budget holds (min over ranks)
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enforce_eager: bool
    world: int = 1                # tensor_parallel_size
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" (kernels/base.py)
    batch_invariant: bool = False # kernels/invariant.py and the backend's invariant() tiles


def build_runner(spec: DeviceSpec, mesh=None, device=None, agree=lambda n: n):
    """One rank's device half: its weights (its shard when mesh.world > 1), a KV pool of its kv
    heads, the Runner. agree(n) -> the block count every rank can hold (the minimum over the
    ranks). Returns (runner, sched), sched with the scheduling limits the runner was built for
    (the caller adds eos ids and prefix caching)."""
    path, cfg = Path(spec.model), load_config(Path(spec.model))
    device = torch.device(device if device is not None else spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if mesh is not None and mesh.world > 1:
        params = load_params_sharded(path, cfg, dtype, device, mesh.rank, mesh.world)
        rank_cfg = cfg_for_rank(cfg, mesh.world)
    else:
        params, rank_cfg = load_params(path, cfg, dtype, device), cfg
    params = fuse_params(params, cfg)
    backend = get_backend(spec.attention_backend)
    if spec.batch_invariant:
        rank_cfg, backend = attrs.evolve(rank_cfg, batch_invariant=True), backend.invariant()
    fp8 = spec.kv_cache_dtype == "fp8"
    per_block = 2 * rank_cfg.num_layers * block_bytes(rank_cfg.num_kv_heads, rank_cfg.head_dim,
                                                      spec.block_size, dtype, fp8)
    num_blocks = spec.num_kv_blocks
    if num_blocks is None:
        if device.type == "cuda":   # what LLMs dropped before this one held (collected by
            torch.cuda.empty_cache()  # llm.quiet_collector at this one's start) counts as free
        budget = (torch.cuda.mem_get_info(device)[0] * GPU_KV_FRACTION if device.type == "cuda"
                  else CPU_KV_BYTES)
        num_blocks = max(1, int(budget // per_block))
    num_blocks = agree(num_blocks)
    # on GPUs, unless enforce_eager: the whole step compiled (backends whose attention is a
    # registered op) and every step replayed from CUDA graphs captured here
    fast = device.type == "cuda" and not spec.enforce_eager
    graphs = fast and getattr(backend, "capturable", False)
    compiled = fast and getattr(backend, "compilable", False)
    kv = new_pool(rank_cfg.num_layers, num_blocks + graphs, spec.block_size, rank_cfg.num_kv_heads,
                  rank_cfg.head_dim, dtype, fp8, device)   # zeroed: see kernels/flash.py
    sched = SchedConfig(block_size=spec.block_size, num_blocks=num_blocks, max_num_seqs=spec.max_num_seqs,
                        max_num_batched_tokens=spec.max_num_batched_tokens, max_model_len=spec.max_model_len)
    model_fns = DeviceModel(params, rank_cfg, backend, mesh=mesh)
    return Runner(model_fns, kv, sched, device, cuda_graphs=graphs, compiled=compiled), sched


KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8"}   # (vLLM's names)


def check_arguments(sizes: dict, device) -> torch.device:
    """The LLM's size arguments (positive ints or None) and its device (one this build can
    use), checked before the model loads, so a typo costs nothing. Returns the device."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidConfig(name, value, "must be a positive int")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise InvalidConfig("device", device, "expected 'cpu', 'cuda' or 'cuda:N'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig("device", device, f"CUDA is not available here (torch {torch.__version__})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidConfig("device", device, f"only {torch.cuda.device_count()} CUDA devices here")
    return parsed


def device_spec(path: Path, cfg, device: torch.device, dtype, attention_backend, enforce_eager,
                *, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
                tensor_parallel_size, kv_cache_dtype="auto",
                batch_invariant=False) -> tuple[DeviceSpec, object]:
    """(DeviceSpec, attention backend) from the LLM's arguments and the model's config, with
    the defaults filled in; raises InvalidConfig for what the model, backend or device cannot
    serve (before any weight loads or process starts)."""
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise InvalidConfig("max_model_len", max_model_len, "above the model's own limit "
                            f"(max_position_embeddings={cfg.max_position_embeddings})")
    dtype = resolve_dtype(dtype, device)
    backend = get_backend(attention_backend) if attention_backend else default_backend(device.type, dtype)
    if backend.name == "flash" and dtype == torch.float32:
        raise InvalidConfig("attention_backend", "flash", "flash-attn needs dtype bfloat16 or float16")
    if tensor_parallel_size > 1:
        check_split(cfg, tensor_parallel_size, device)
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidConfig("kv_cache_dtype", kv_cache_dtype, f"expected one of {sorted(KV_CACHE_DTYPES)}")
    kv_cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    # the backend's default for the pool's dtype (its block_sizes), else 16: fine-grained
    # prefix reuse and little tail waste
    block_size = block_size or getattr(backend, "block_sizes", (16, 16))[kv_cache_dtype == "fp8"]
    backend.check(block_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    if kv_cache_dtype == "fp8" and not getattr(backend, "fp8_kv", False):
        raise InvalidConfig("kv_cache_dtype", "fp8", f"the {backend.name} backend does not "
                            "support it yet (attention_backend 'triton' and 'reference' do)")
    check_invariant(batch_invariant, backend, device, tensor_parallel_size)
    return DeviceSpec(str(path), str(dtype).removeprefix("torch."), str(device), backend.name, block_size,
                      num_kv_blocks, max_num_seqs, max_num_batched_tokens or max(8192, block_size),
                      max_model_len or cfg.max_position_embeddings, enforce_eager, tensor_parallel_size,
                      kv_cache_dtype, batch_invariant), backend


def check_invariant(batch_invariant, backend, device: torch.device, world: int) -> None:
    """The InvalidConfig for a batch_invariant=True the build could not honour."""
    if not isinstance(batch_invariant, bool):
        raise InvalidConfig("batch_invariant", batch_invariant, "must be True or False")
    if not batch_invariant:
        return
    if device.type != "cuda":   # torch's CPU GEMMs round a row by the row count (tokens agree)
        raise InvalidConfig("batch_invariant", True, "needs a CUDA device: its kernels are Triton "
                            "(on the CPU fp32 tokens agree in any batch; logprobs may not, in the last bits)")
    if not hasattr(backend, "invariant"):
        raise InvalidConfig("attention_backend", backend.name, "batch_invariant needs the triton backend")
    if world > 2:   # two ranks sum a + b (one rounding, either order); more sum in an order
        raise InvalidConfig("tensor_parallel_size", world, "batch_invariant=True holds for "
                            "1 or 2 ranks: more would sum partials in an order set by the row's place")


def check_split(cfg, world: int, device: torch.device) -> None:
    """The InvalidConfig a tensor-parallel start would meet, raised before it starts anything."""
    cfg_for_rank(cfg, world)      # names the tensor that cannot be split
    if device.type == "cuda":
        if device.index is not None:
            raise InvalidConfig("device", str(device), "with tensor_parallel_size > 1 pass "
                                "'cuda': rank r uses cuda:<local rank r>")
        count = torch.cuda.device_count()
        if world > count and "WORLD_SIZE" not in os.environ:
            raise InvalidConfig("tensor_parallel_size", world, f"only {count} CUDA devices here")


def resolve_dtype(name, device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(name, torch.dtype) and name in table.values():
        return name
    if name not in table:
        raise InvalidConfig("dtype", name, f"expected one of {sorted(table)}")
    return table[name]
