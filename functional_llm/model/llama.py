"""The llama-family forward (Llama, Qwen2, Qwen3) as pure functions over the params dict.

Numerics follow the Hugging Face implementations so fp32 logits agree to ~1e-5: RMSNorm in
fp32 then cast back before the weight multiply, RoPE angles in fp32 with the rotate-half
layout, SiLU-gated MLP. The only in-place effect is the backend writing new K/V into `kv`.
Shape letters: T tokens of the step, B rows to score, E hidden, H/K heads, D head dim, V vocab,
L layers, N blocks, S block size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from functional_llm.kernels.base import AttentionBackend, AttnBatch
from functional_llm.model.config import ModelConfig


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


def attention(params: dict, cfg: ModelConfig, layer: int, x: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, batch: AttnBatch, kv: torch.Tensor,
              backend: AttentionBackend) -> torch.Tensor:
    """x [T, E] (already normed) -> [T, E]. Writes this step's K/V into kv[layer]."""
    p = f"model.layers.{layer}.self_attn."
    T, H, K, D = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    qkv = F.linear(x, params[p + "qkv_proj.weight"], params.get(p + "qkv_proj.bias"))
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, K, D), v.view(T, K, D)
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm over D, before the rotation
        q = rms_norm(q, params[p + "q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, params[p + "k_norm.weight"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = backend.forward(q, k, v, kv[layer, 0], kv[layer, 1], batch, D ** -0.5)  # [T, H, D]
    return F.linear(out.reshape(T, H * D), params[p + "o_proj.weight"])


def mlp(params: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x [T, E] -> [T, E]: down(silu(gate(x)) * up(x))."""
    p = f"model.layers.{layer}.mlp."
    gate, up = F.linear(x, params[p + "gate_up_proj.weight"]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, params[p + "down_proj.weight"])


def fuse_params(params: dict, cfg: ModelConfig) -> dict:
    """A new dict in which each layer's q/k/v projections are one `qkv_proj` and gate/up one
    `gate_up_proj` (rows concatenated), so a layer reads its input once per matmul group: 4
    matmuls instead of 7. Applied after loading (and after sharding: each rank's slices
    concatenate the same way). The argument is not modified."""
    out = dict(params)
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = [out.pop(f"{a}{n}_proj.{kind}") for n in "qkv"]
            out[f"{a}qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        out[m + "gate_up_proj.weight"] = torch.cat([out.pop(m + "gate_proj.weight"),
                                                     out.pop(m + "up_proj.weight")], dim=0)
    return out


def forward(params: dict, cfg: ModelConfig, input_ids: torch.Tensor, positions: torch.Tensor,
            batch: AttnBatch, kv: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
    """params: fuse_params(load_params(...)). input_ids [T] int64, positions [T] int64
    (absolute), batch prepared by `backend`,
    kv [L, 2, N, S, K, D] -> final-normed hidden [T, E]. Mutates only kv (new tokens' K/V)."""
    x = F.embedding(input_ids, params["model.embed_tokens.weight"])          # [T, E]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_layers):
        h = rms_norm(x, params[f"model.layers.{i}.input_layernorm.weight"], eps)
        x = x + attention(params, cfg, i, h, cos, sin, batch, kv, backend)
        h = rms_norm(x, params[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
        x = x + mlp(params, i, h)
    return rms_norm(x, params["model.norm.weight"], eps)


def compute_logits(params: dict, cfg: ModelConfig, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, E] -> logits [B, V] float32 (a tied head reuses the embedding matrix)."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return F.linear(hidden, params[name]).float()
