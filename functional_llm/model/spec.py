"""One declarative description of every parameter: shape, dtype role and logical axes.

The same table drives loading (shape checks), test initialisation and, later, tensor-parallel
sharding: a rules record maps each logical axis to "split over ranks" or "replicate", so no
code outside this file needs to know which weight is column- or row-parallel.

Logical axes: "heads" (H*D query features), "kv_heads" (K*D key/value features), "ffw" (MLP
inner features), "vocab" (V), "embed" (E, the residual stream), None (never split).
"""
from __future__ import annotations

import attrs

from functional_llm.model.config import ModelConfig


@attrs.frozen(slots=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype_role: str                  # "weight" (matmul), "bias" or "norm": lets a loader keep
                                     # e.g. norms in fp32 later; today all share one dtype
    axes: tuple[str | None, ...]     # one logical axis per dimension of `shape`


def _layer_specs(cfg: ModelConfig, i: int) -> dict[str, ParamSpec]:
    E, D, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    HD, KD = cfg.num_heads * D, cfg.num_kv_heads * D
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    specs = {
        # HF stores nn.Linear weights as [out, in]
        attn + "q_proj.weight": ParamSpec((HD, E), "weight", ("heads", "embed")),
        attn + "k_proj.weight": ParamSpec((KD, E), "weight", ("kv_heads", "embed")),
        attn + "v_proj.weight": ParamSpec((KD, E), "weight", ("kv_heads", "embed")),
        attn + "o_proj.weight": ParamSpec((E, HD), "weight", ("embed", "heads")),
        mlp + "gate_proj.weight": ParamSpec((F, E), "weight", ("ffw", "embed")),
        mlp + "up_proj.weight": ParamSpec((F, E), "weight", ("ffw", "embed")),
        mlp + "down_proj.weight": ParamSpec((E, F), "weight", ("embed", "ffw")),
        f"model.layers.{i}.input_layernorm.weight": ParamSpec((E,), "norm", ("embed",)),
        f"model.layers.{i}.post_attention_layernorm.weight": ParamSpec((E,), "norm", ("embed",)),
    }
    if cfg.qkv_bias:
        specs[attn + "q_proj.bias"] = ParamSpec((HD,), "bias", ("heads",))
        specs[attn + "k_proj.bias"] = ParamSpec((KD,), "bias", ("kv_heads",))
        specs[attn + "v_proj.bias"] = ParamSpec((KD,), "bias", ("kv_heads",))
    if cfg.qk_norm:
        # one weight shared by every head: replicated, never split
        specs.update({f"{attn}{n}_norm.weight": ParamSpec((D,), "norm", (None,)) for n in "qk"})
    return specs


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of the model, keyed by its Hugging Face tensor name. lm_head.weight is
    listed only when the head is not tied to the embedding."""
    V, E = cfg.vocab_size, cfg.hidden_size
    specs = {"model.embed_tokens.weight": ParamSpec((V, E), "weight", ("vocab", "embed"))}
    for i in range(cfg.num_layers):
        specs.update(_layer_specs(cfg, i))
    specs["model.norm.weight"] = ParamSpec((E,), "norm", ("embed",))
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = ParamSpec((V, E), "weight", ("vocab", "embed"))
    return specs
