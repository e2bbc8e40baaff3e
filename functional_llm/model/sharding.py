"""Tensor-parallel layout: which dimension of each parameter a rank holds, the pure slicing that
produces a rank's parameters, and a loader that reads only those slices from safetensors.

The layout (the one `llama.forward` implements, DEFAULT_RULES): q/k/v and gate/up are split by
output features (heads, kv heads, ffw), so o_proj and down_proj are split by input features and
each rank's output is a partial sum that the forward all-reduces; the embedding and the head are
split by vocabulary rows; norms and anything on the "embed" axis are replicated.

Every split cuts a dimension into `world` equal contiguous chunks, rank r holding chunk r, in
whole units: one head (head_dim rows) on the "heads"/"kv_heads" axes, one row elsewhere.

Fewer kv heads than ranks (K < world, e.g. MQA on 2 ranks) cannot be split without cutting a
head, so kv heads are replicated in groups: world must be a multiple of K and rank r keeps the
one kv head r * K // world. That is exactly the head its queries read: rank r holds q heads
[r*H/world, (r+1)*H/world), q head h reads kv head h // (H/K), and since H/K = (H/world) *
(world/K) all of the rank's q heads fall in kv group (r*H/world) // (H/K) = r*K//world. Each
rank therefore computes and caches one kv head (its KV pool holds K_rank = 1 head); world/K
ranks repeat the same k/v projection, which costs compute but no communication.
"""
from __future__ import annotations

import attrs
import torch

from functional_llm.errors import InvalidConfig, InvalidModel
from functional_llm.model.config import ModelConfig
from functional_llm.model.loader import load_params
from functional_llm.model.spec import ParamSpec, param_specs

TP = "tp"                                   # the one mesh axis: tensor parallel
AXES = ("heads", "kv_heads", "ffw", "vocab", "embed")


def _placement(instance, attribute, value) -> None:
    if value not in (TP, None):
        raise InvalidConfig(attribute.name, value, f"a logical axis maps to {TP!r} (split over "
                            "the tensor-parallel ranks) or None (replicated)")


@attrs.frozen(slots=True)
class ShardingRules:
    """Logical axis -> TP (split over the ranks) or None (replicated on every rank)."""

    heads: str | None = attrs.field(default=TP, validator=_placement)
    kv_heads: str | None = attrs.field(default=TP, validator=_placement)
    ffw: str | None = attrs.field(default=TP, validator=_placement)
    vocab: str | None = attrs.field(default=TP, validator=_placement)
    embed: str | None = attrs.field(default=None, validator=_placement)

    def placement(self, axis: str | None) -> str | None:
        """TP or None for one axis of a ParamSpec (None, the "never split" axis, is None)."""
        if axis is not None and axis not in AXES:
            raise InvalidConfig("axis", axis, f"unknown logical axis; known: {list(AXES)}")
        return None if axis is None else getattr(self, axis)


DEFAULT_RULES = ShardingRules()


def _check_rank(rank: int, world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise InvalidConfig("world", world, "the tensor-parallel size must be a positive int")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise InvalidConfig("rank", rank, f"must be an int in [0, {world})")


@attrs.frozen(slots=True)
class Mesh:
    """This process's place among the tensor-parallel ranks, passed explicitly to the forward.
    `group` is a torch.distributed process group; None means the default group, and with world
    1 no collective is ever issued, so no process group need exist."""

    rank: int = 0
    world: int = 1
    group: object = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_rank(self.rank, self.world)


def _unit(axis: str, head_dim: int) -> int:
    """The whole unit a split of `axis` cuts in: a head of head_dim features, else one row."""
    return head_dim if axis in ("heads", "kv_heads") else 1


def shard_spec(specs: dict[str, ParamSpec], rules: ShardingRules, world: int, *,
               head_dim: int) -> dict[str, int | None]:
    """For each parameter, the dimension split over the ranks, or None when it is replicated.
    head_dim is needed because heads are never cut: a "heads" dimension of H*D features is split
    by heads. Raises InvalidConfig naming the tensor (value: the offending count) when the rules
    split two dimensions of one tensor, or a head count, ffw size or vocabulary is not divisible
    by world (kv heads may instead divide world: see the module docstring)."""
    _check_rank(0, world)
    plan: dict[str, int | None] = {}
    for name, spec in specs.items():
        dims = [d for d, axis in enumerate(spec.axes) if rules.placement(axis) == TP]
        if len(dims) > 1:
            raise InvalidConfig(name, spec.axes, f"the rules split axes {[spec.axes[d] for d in dims]} "
                                "of this one tensor; at most one dimension per tensor can be split")
        plan[name] = dim = dims[0] if dims else None   # (an error below leaves no plan)
        if dim is None:
            continue
        axis = spec.axes[dim]
        unit = _unit(axis, head_dim)
        if spec.shape[dim] % unit:
            raise InvalidConfig(name, spec.shape[dim], f"{axis} dimension is not a whole number "
                                f"of heads of head_dim {unit}")
        count = spec.shape[dim] // unit
        if count % world and not (axis == "kv_heads" and world % count == 0):
            kv_rule = ", or divide it (then each kv head is replicated)" if axis == "kv_heads" else ""
            raise InvalidConfig(name, count, f"{count} {axis} cannot be split over {world} ranks: "
                                f"must be divisible by the number of ranks{kv_rule}")
    return plan


def shard_index(spec: ParamSpec, dim: int | None, head_dim: int, rank: int, world: int
                ) -> tuple[slice, ...] | None:
    """The index of `rank`'s chunk of a tensor split along `dim` (as checked by shard_spec), or
    None when dim is None (replicated): of the dimension's count units, count/world from unit
    r*count/world; with fewer units than ranks (only kv heads) rank r gets the one unit
    r*count//world."""
    if dim is None:
        return None
    unit = _unit(spec.axes[dim], head_dim)
    count = spec.shape[dim] // unit
    first, per = rank * count // world, max(count // world, 1)
    return (slice(None),) * dim + (slice(first * unit, (first + per) * unit),)


def shard(params: dict[str, torch.Tensor], specs: dict[str, ParamSpec], rules: ShardingRules,
          rank: int, world: int, *, head_dim: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s parameters: a new dict of views (slices) of the unfused `params`, with
    replicated tensors passed through; nothing is copied and the argument is unchanged (apply
    fuse_params after). Raises InvalidConfig as shard_spec does, or for a tensor with no spec,
    and InvalidModel for a tensor whose shape is not its spec's."""
    _check_rank(rank, world)
    plan = shard_spec(specs, rules, world, head_dim=head_dim)
    out = {}
    for name, tensor in params.items():
        if (spec := specs.get(name)) is None:
            raise InvalidConfig(name, None, "no ParamSpec for this tensor (shard the unfused "
                                "params, then fuse_params)")
        if tuple(tensor.shape) != spec.shape:
            raise InvalidModel(name, tuple(tensor.shape), f"expected shape {spec.shape}")
        index = shard_index(spec, plan[name], head_dim, rank, world)
        out[name] = tensor if index is None else tensor[index]   # basic slicing: a view
    return out


def cfg_for_rank(cfg: ModelConfig, world: int, rules: ShardingRules = DEFAULT_RULES) -> ModelConfig:
    """The config one rank's forward and KV pool use: num_heads, num_kv_heads (at least 1, see
    the module docstring) and intermediate_size per rank. vocab_size stays the model's: token
    ids and the gathered logits span the whole vocabulary, and the forward tells a split
    embedding by its row count. Raises InvalidConfig when the model cannot be split (as
    shard_spec) or when world > 1 with rules other than the layout the forward implements."""
    if world > 1 and (rules.heads, rules.kv_heads, rules.ffw, rules.embed) != (TP, TP, TP, None):
        raise InvalidConfig("rules", rules, "the forward implements heads, kv_heads and ffw "
                            "split over tp and embed replicated (vocab either way)")
    shard_spec(param_specs(cfg), rules, world, head_dim=cfg.head_dim)
    return attrs.evolve(cfg, num_heads=cfg.num_heads // world, num_kv_heads=max(cfg.num_kv_heads // world, 1),
                        intermediate_size=cfg.intermediate_size // world)


def load_params_sharded(path, cfg: ModelConfig, dtype: torch.dtype,
                        device: str | torch.device = "cpu", rank: int = 0, world: int = 1,
                        rules: ShardingRules = DEFAULT_RULES) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of `param_specs(cfg)` read from the safetensors folder `path`, equal
    to shard(load_params(...)) but contiguous, and without ever materialising a split tensor
    whole: split tensors are read through get_slice, replicated ones with get_tensor. Raises
    InvalidModel as load_params does (missing tensor, wrong shape) and InvalidConfig as
    shard_spec does."""
    _check_rank(rank, world)
    specs = param_specs(cfg)
    plan = shard_spec(specs, rules, world, head_dim=cfg.head_dim)
    return load_params(path, cfg, dtype, device, lambda name, shape:   # shape: the spec's
                       shard_index(specs[name], plan[name], cfg.head_dim, rank, world))
