"""The llama-family forward (Llama, Qwen2, Qwen3) as pure functions over the params dict.

Numerics follow the Hugging Face implementations so fp32 logits agree to ~1e-5: RMSNorm in
fp32 then cast back before the weight multiply, RoPE angles in fp32 with the rotate-half
layout, SiLU-gated MLP. The only in-place effect is the backend writing new K/V into `kv`.
Tensor parallelism (model/sharding.py) is explicit: with a Mesh of world > 1 the forward
all-reduces the partial sums of o_proj and down_proj and of the vocab-parallel embedding, and
compute_logits all-gathers the vocab slices; with no mesh or world 1 nothing is communicated.
Shape letters: T tokens of the step, B rows to score, E hidden, H/K heads, D head dim, V vocab,
L layers, N blocks, S block size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from functional_llm.kernels import invariant
from functional_llm.kernels.base import AttentionBackend, AttnBatch
from functional_llm.model.config import ModelConfig

if TYPE_CHECKING:
    from functional_llm.model.sharding import Mesh


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E] -> [..., E]; statistics in fp32 whatever the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64 -> cos, sin [T, D]. Angles in fp32: in bf16 a position of a few
    thousand would lose most of its fractional rotation."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponent.float() / head_dim))              # [D/2]
    angles = positions.float()[:, None] * inv_freq[None, :]                 # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)                            # [T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D]; pairs are (i, i + D/2) ("rotate half")."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           cfg: ModelConfig) -> torch.Tensor:
    """F.linear; with cfg.batch_invariant the fixed-tile GEMM of kernels/invariant.py."""
    return (invariant.linear if cfg.batch_invariant else F.linear)(x, weight, bias)


def norm(x: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """rms_norm with the model's eps; with cfg.batch_invariant one fixed-order kernel."""
    return (invariant.norm if cfg.batch_invariant else rms_norm)(x, weight, cfg.rms_norm_eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, K, D] -> per-head RMSNorm over D (Qwen3, when weights are given),
    then the rotation."""
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def residual(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta. Compiled, written through fp32 (bitwise the same: a 16-bit add is an fp32 add
    rounded once) so that Inductor does not fold it into the GEMM that made delta: x + mm(...)
    would become addmm(x, ...), which first copies x into its output, a device copy per
    residual add (2 a layer); unfolded, the add fuses into the next norm's kernel."""
    return (x.float() + delta.float()).to(x.dtype) if torch.compiler.is_compiling() else x + delta


def all_reduce(x: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """x summed over the ranks of `mesh` (a new tensor); x itself with no mesh or one rank.
    A functional collective: torch.compile traces it into the step's graph."""
    return funcol.all_reduce(x, "sum", mesh.group) if mesh is not None and mesh.world > 1 else x


def embed(params: dict, cfg: ModelConfig, input_ids: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """input_ids [T] -> [T, E]. A rank holding V/world rows (vocab-parallel) owns ids
    [rank * rows, (rank + 1) * rows): others look up row 0 and are zeroed, so the all-reduce
    adds exactly one real row per token."""
    table = params["model.embed_tokens.weight"]
    rows = table.shape[0]
    if rows == cfg.vocab_size:
        return F.embedding(input_ids, table)
    assert mesh is not None, "vocab-parallel params need their mesh"
    local = input_ids - mesh.rank * rows
    outside = (local < 0) | (local >= rows)
    x = F.embedding(local.masked_fill(outside, 0), table).masked_fill(outside[:, None], 0)
    return all_reduce(x, mesh)


def attention(params: dict, cfg: ModelConfig, layer: int, x: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, batch: AttnBatch, kv: torch.Tensor,
              backend: AttentionBackend, mesh: Mesh | None = None) -> torch.Tensor:
    """x [T, E] (already normed) -> [T, E]. Writes this step's K/V into kv[layer]. H and K
    are the rank's heads (cfg_for_rank); o_proj then yields a partial sum over them."""
    p = f"model.layers.{layer}.self_attn."
    T, H, K, D = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    qkv = linear(x, params[p + "qkv_proj.weight"], params.get(p + "qkv_proj.bias"), cfg)
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, K, D), v.view(T, K, D)
    rope = (cos, sin, params.get(p + "q_norm.weight"), params.get(p + "k_norm.weight"),
            cfg.rms_norm_eps)                  # Qwen3 norms q and k per head before the rope
    if getattr(backend, "fuses_rope", False):  # in the kernel that writes the KV
        out = backend.forward(q, k, v, kv, layer, batch, D ** -0.5, rope=rope)   # [T, H, D]
    else:
        q, k = qk_norm_rope(q, k, *rope[2:4], cos, sin, cfg.rms_norm_eps)
        out = backend.forward(q, k, v, kv, layer, batch, D ** -0.5)
    return all_reduce(linear(out.reshape(T, H * D), params[p + "o_proj.weight"], None, cfg), mesh)


def mlp(params: dict, cfg: ModelConfig, layer: int, x: torch.Tensor,
        mesh: Mesh | None = None) -> torch.Tensor:
    """x [T, E] -> [T, E]: down(silu(gate(x)) * up(x)), summed over the ranks' ffw slices."""
    p = f"model.layers.{layer}.mlp."
    gate, up = linear(x, params[p + "gate_up_proj.weight"], None, cfg).chunk(2, dim=-1)   # [T, F] each
    return all_reduce(linear(F.silu(gate) * up, params[p + "down_proj.weight"], None, cfg), mesh)


def fuse_params(params: dict, cfg: ModelConfig) -> dict:
    """A new dict in which each layer's q/k/v projections are one `qkv_proj` and gate/up one
    `gate_up_proj` (rows concatenated), so a layer reads its input once per matmul group: 4
    matmuls instead of 7. Applied after loading (and after sharding: each rank's slices
    concatenate the same way). The argument is not modified."""
    out = dict(params)
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            out[f"{a}qkv_proj.{kind}"] = torch.cat([out.pop(f"{a}{n}_proj.{kind}") for n in "qkv"], dim=0)
        out[m + "gate_up_proj.weight"] = torch.cat([out.pop(m + "gate_proj.weight"),
                                                     out.pop(m + "up_proj.weight")], dim=0)
    return out


def forward(params: dict, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor,
            batch: AttnBatch, kv: torch.Tensor, backend: AttentionBackend,
            mesh: Mesh | None = None) -> torch.Tensor:
    """params: fuse_params(load_params(...)). input_ids [T] int64, positions [T] int64
    (absolute), batch prepared by `backend`,
    kv [L, 2, N, S, K, D] -> final-normed hidden [T, E]. Mutates only kv (new tokens' K/V).
    Tensor parallel: params of this rank (fuse_params(load_params_sharded(...))), cfg =
    cfg_for_rank(...) (K is then the rank's kv heads), and its mesh; every rank runs the same
    step and gets the same hidden. Traceable whole by torch.compile(fullgraph=True) when the
    backend is `compilable` (its attention is one registered op): the compiled step fuses
    the norms, rope, residual adds and activation with their neighbours."""
    x = embed(params, cfg, input_ids, mesh)                                  # [T, E]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    L = "model.layers.{}."
    h = norm(x, params[L.format(0) + "input_layernorm.weight"], cfg)
    for i in range(cfg.num_layers):
        x = residual(x, attention(params, cfg, i, h, cos, sin, batch, kv, backend, mesh))
        h = norm(x, params[L.format(i) + "post_attention_layernorm.weight"], cfg)
        x = residual(x, mlp(params, cfg, i, h, mesh))
        h = norm(x, params[L.format(i + 1) + "input_layernorm.weight" if i + 1 < cfg.num_layers
                           else "model.norm.weight"], cfg)
    return h


def compute_logits(params: dict, cfg: ModelConfig, hidden: torch.Tensor, mesh: Mesh | None = None,
                   dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """hidden [B, E] -> logits [B, V] in `dtype` (None: the model's, as the head's GEMM makes
    them; a tied head reuses the embedding matrix). A vocab-parallel head scores the rank's
    V/world slice; the slices are all-gathered in rank order, so every rank returns the whole
    [B, V]."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    logits = linear(hidden, params[name], None, cfg)
    if logits.shape[-1] != cfg.vocab_size:
        assert mesh is not None, "vocab-parallel params need their mesh"
        # gathered along dim 0 ([world * B, V/world]) and laid out by hand: gathering along
        # dim 1 goes through a helper torch.compile refuses to trace (torch 2.11)
        B, part = logits.shape
        parts = funcol.all_gather_tensor(logits, 0, mesh.group)
        logits = parts.view(mesh.world, B, part).permute(1, 0, 2).reshape(B, mesh.world * part)
    return logits if dtype is None else logits.to(dtype)
