"""Tensor parallelism: the layout (shard-then-gather is the identity), its typed errors, loading
only a rank's slices, and TP=2 over gloo on CPU giving the world-1 tokens and logits.

The TP=2 workers are spawned processes that import this module, so it imports nothing heavy at
module level (tiny_models pulls in transformers: imported inside the fixture)."""
from __future__ import annotations

import functools
import socket
import time

import attrs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.errors import InvalidConfig
from functional_llm.kernels.base import AttnBatch
from functional_llm.kernels.reference import ReferenceBackend
from functional_llm.model import (ModelConfig, ParamSpec, compute_logits, forward, fuse_params,
                                  load_config, load_params, param_specs)
from functional_llm.model import loader
from functional_llm.model.sharding import (DEFAULT_RULES, TP, Mesh, ShardingRules, cfg_for_rank,
                                           load_params_sharded, shard, shard_spec)

ARCHS = ("llama", "llama-mqa", "qwen2", "qwen3")
BLOCK, NUM_BLOCKS = 4, 8
TABLE = [5, 2, 7, 0]            # scattered blocks, block 0 included: room for 16 tokens
PROMPT = [17, 200, 3, 91, 45, 128, 250]
NEW_TOKENS = 6                  # prompt + new tokens cross into the fourth block
BACKEND = ReferenceBackend()


def small_cfg(**changes) -> ModelConfig:
    base = ModelConfig(arch="qwen3", vocab_size=24, hidden_size=8, intermediate_size=24,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2, rms_norm_eps=1e-6,
                       rope_theta=1e4, tie_word_embeddings=False, qkv_bias=True, qk_norm=True,
                       max_position_embeddings=64, eos_token_ids=(0,), bos_token_id=None,
                       torch_dtype=None)
    return attrs.evolve(base, **changes)


# ---- the layout ----

@st.composite
def split_models(draw):
    """(cfg, world) that the default rules can split: H, ffw and V multiples of world, and
    kv heads either a multiple of world or a divisor of it (then replicated)."""
    world = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    heads = world * draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1)
                                     if heads % k == 0 and (k % world == 0 or world % k == 0)]))
    cfg = small_cfg(vocab_size=world * draw(st.integers(1, 5)),
                    hidden_size=draw(st.integers(1, 6)),
                    intermediate_size=world * draw(st.integers(1, 4)),
                    num_layers=draw(st.integers(1, 2)), num_heads=heads, num_kv_heads=kv_heads,
                    head_dim=draw(st.sampled_from([1, 2, 4])),
                    tie_word_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
                    qk_norm=draw(st.booleans()))
    return cfg, world


@settings(max_examples=60, deadline=None)
@given(split_models(), st.integers(0, 2**31 - 1))
def test_shard_then_gather_is_identity(case, seed):
    cfg, world = case
    specs = param_specs(cfg)
    gen = torch.Generator().manual_seed(seed)
    # random values: every head differs, so a rank holding the wrong head cannot pass
    params = {name: torch.randn(spec.shape, generator=gen) for name, spec in specs.items()}
    plan = shard_spec(specs, DEFAULT_RULES, world, head_dim=cfg.head_dim)
    ranks = [shard(params, specs, DEFAULT_RULES, r, world, head_dim=cfg.head_dim)
             for r in range(world)]
    rank_specs = param_specs(cfg_for_rank(cfg, world))
    for name, full in params.items():
        axes, dim = specs[name].axes, plan[name]
        slices = [p[name] for p in ranks]
        assert all(p.keys() == params.keys() for p in ranks)
        if dim is None:
            assert all(DEFAULT_RULES.placement(a) is None for a in axes), name
            assert all(s is full for s in slices), f"{name}: replicated, must not be copied"
            continue
        axis = axes[dim]
        assert axis in ("heads", "kv_heads", "ffw", "vocab"), name
        for s in slices:   # views into the full tensor, of the rank's config's shape
            assert s.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
            if axis != "vocab":
                assert s.shape == rank_specs[name].shape, name
        if axis == "kv_heads" and cfg.num_kv_heads < world:
            # each kv head sits on world/K consecutive ranks, rank r holding head r*K//world
            group = world // cfg.num_kv_heads
            assert all(s.shape[dim] == cfg.head_dim for s in slices), name
            assert all(torch.equal(s, slices[r - r % group]) for r, s in enumerate(slices))
            slices = slices[::group]
        else:
            assert all(s.shape[dim] == full.shape[dim] // world for s in slices), name
        assert torch.equal(torch.cat(slices, dim), full), name


def test_rank_config_divides_heads_and_ffw():
    cfg = small_cfg(num_heads=8, num_kv_heads=2, intermediate_size=24)
    assert cfg_for_rank(cfg, 1) == cfg
    rank = cfg_for_rank(cfg, 4)
    assert (rank.num_heads, rank.num_kv_heads, rank.intermediate_size) == (2, 1, 6)
    assert rank.vocab_size == cfg.vocab_size       # ids and gathered logits span all of V
    assert cfg_for_rank(cfg, 2).num_kv_heads == 1


# ---- errors ----

@pytest.mark.parametrize("changes, world, name, value", [
    (dict(vocab_size=25), 2, "model.embed_tokens.weight", 25),
    # 3 heads of head_dim 2: 6 features would split evenly in 2, heads would not
    (dict(num_heads=3, num_kv_heads=3), 2, "model.layers.0.self_attn.q_proj.weight", 3),
    (dict(num_heads=6, num_kv_heads=3), 2, "model.layers.0.self_attn.k_proj.weight", 3),
    # 2 kv heads < 3 ranks, but 3 ranks cannot share 2 heads evenly
    (dict(num_heads=6, num_kv_heads=2), 3, "model.layers.0.self_attn.k_proj.weight", 2),
    (dict(intermediate_size=6), 4, "model.layers.0.mlp.gate_proj.weight", 6),
])
def test_indivisible_model_names_the_tensor(changes, world, name, value):
    cfg = small_cfg(**changes)
    for call in (lambda: shard_spec(param_specs(cfg), DEFAULT_RULES, world,
                                    head_dim=cfg.head_dim),
                 lambda: cfg_for_rank(cfg, world)):
        with pytest.raises(InvalidConfig, match="cannot be split") as info:
            call()
        assert (info.value.parameter, info.value.value) == (name, value)


def test_double_shard_and_bad_rules_are_typed():
    specs = {"w": ParamSpec((4, 4), "weight", ("heads", "ffw"))}
    for world in (1, 2):          # a rules error whatever the world size
        with pytest.raises(InvalidConfig, match="at most one dimension") as info:
            shard_spec(specs, DEFAULT_RULES, world, head_dim=1)
        assert info.value.parameter == "w"
    with pytest.raises(InvalidConfig) as info:
        shard_spec(param_specs(small_cfg()), ShardingRules(embed=TP), 2, head_dim=2)
    assert info.value.parameter == "model.embed_tokens.weight"
    with pytest.raises(InvalidConfig) as info:
        ShardingRules(heads="row")
    assert info.value.parameter == "heads"
    with pytest.raises(InvalidConfig) as info:
        Mesh(rank=2, world=2)
    assert info.value.parameter == "rank"
    with pytest.raises(InvalidConfig) as info:   # the forward has no replicated-ffw path
        cfg_for_rank(small_cfg(), 2, ShardingRules(ffw=None))
    assert info.value.parameter == "rules"
    params = {"model.embed_tokens.weight": torch.zeros(24, 8), "extra": torch.zeros(1)}
    with pytest.raises(InvalidConfig) as info:
        shard(params, param_specs(small_cfg()), DEFAULT_RULES, 0, 2, head_dim=2)
    assert info.value.parameter == "extra"


# ---- loading only the rank's slices ----

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_models import make_tiny_model        # transformers: parent process only
    return {arch: make_tiny_model(arch, tmp_path_factory.mktemp(arch), seed=3) for arch in ARCHS}


class _SpyFile:
    """Wraps a safe_open handle, logging every tensor read and how much of it was read."""

    def __init__(self, handle, log):
        self._handle, self._log = handle, log

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, name):
        tensor = self._handle.get_tensor(name)
        self._log.append(("whole", name, tuple(tensor.shape)))
        return tensor

    def get_slice(self, name):
        return _SpySlice(self._handle.get_slice(name), name, self._log)


class _SpySlice:
    def __init__(self, view, name, log):
        self._view, self._name, self._log = view, name, log

    def get_shape(self):
        return self._view.get_shape()

    def __getitem__(self, index):
        tensor = self._view[index]
        self._log.append(("slice", self._name, tuple(tensor.shape)))
        return tensor


@pytest.mark.parametrize("arch, world", [("qwen2", 2), ("qwen2", 4), ("llama-mqa", 2),
                                         ("qwen3", 4)])
def test_sliced_loading_reads_only_the_rank_slices(folders, monkeypatch, arch, world):
    folder = folders[arch]
    cfg = load_config(folder)
    specs = param_specs(cfg)
    plan = shard_spec(specs, DEFAULT_RULES, world, head_dim=cfg.head_dim)
    full = load_params(folder, cfg, torch.float32)
    real_open = loader.safe_open
    for rank in range(world):
        log = []
        monkeypatch.setattr(loader, "safe_open",
                            lambda *a, **k: _SpyFile(real_open(*a, **k), log))
        loaded = load_params_sharded(folder, cfg, torch.float64, "cpu", rank, world)
        expected = shard(full, specs, DEFAULT_RULES, rank, world, head_dim=cfg.head_dim)
        assert loaded.keys() == expected.keys() == specs.keys()
        for name, tensor in loaded.items():
            assert tensor.dtype == torch.float64 and tensor.is_contiguous()
            assert torch.equal(tensor.float(), expected[name]), name
        whole = {name for kind, name, _ in log if kind == "whole"}
        sliced = {name: shape for kind, name, shape in log if kind == "slice"}
        assert whole == {n for n, d in plan.items() if d is None}
        assert sliced.keys() == {n for n, d in plan.items() if d is not None}
        for name, shape in sliced.items():      # no more than the rank's slice was read
            assert shape == tuple(expected[name].shape), name
            # ... which is less than the tensor, but for one kv head kept by several ranks
            whole_head = specs[name].axes[0] == "kv_heads" and cfg.num_kv_heads == 1
            assert whole_head or shape != specs[name].shape, name
        assert len(log) == len(specs), "each tensor read exactly once"


# ---- TP=2 over gloo against world 1 ----

def _logits(params, cfg, mesh, ids, pos, batch, kv) -> torch.Tensor:
    return compute_logits(params, cfg, forward(params, cfg, ids, pos, batch, kv, BACKEND, mesh), mesh)


def _greedy(params, cfg, mesh, traced=False) -> tuple[list[int], torch.Tensor]:
    """Prefill PROMPT, then NEW_TOKENS - 1 single-token decodes through a NaN-filled paged pool
    of the rank's kv heads. Returns the greedy tokens and the logits of every step [n, V].
    traced: each step runs traced whole by torch.compile(fullgraph=True), collectives
    included (backend "eager": a graph break fails, and the ops are the eager ones)."""
    step = functools.partial(_logits, params, cfg, mesh)
    if traced:
        step = torch.compile(step, backend="eager", fullgraph=True)
    kv = torch.full((cfg.num_layers, 2, NUM_BLOCKS, BLOCK, cfg.num_kv_heads, cfg.head_dim),
                    float("nan"))
    tokens, start, logits = list(PROMPT), 0, []
    while len(tokens) < len(PROMPT) + NEW_TOKENS:
        pos = list(range(start, len(tokens)))
        batch = BACKEND.prepare(AttnBatch(
            slot_mapping=torch.tensor([TABLE[p // BLOCK] * BLOCK + p % BLOCK for p in pos]),
            cu_q=torch.tensor([0, len(pos)], dtype=torch.int32),
            seq_lens=torch.tensor([len(tokens)], dtype=torch.int32),
            block_tables=torch.tensor([TABLE], dtype=torch.int32),
            max_q=len(pos), max_seq_len=len(tokens)))
        logits.append(step(torch.tensor(tokens[start:]), torch.tensor(pos), batch, kv))
        start = len(tokens)
        tokens.append(int(logits[-1][-1].argmax()))
    return tokens[len(PROMPT):], torch.cat(logits)


def _tp_worker(rank: int, world: int, port: int, folders: dict, out_dir: str) -> None:
    """One spawned rank: loads its slices of each tiny model and runs the greedy loop."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        mesh = Mesh(rank, world, dist.group.WORLD)
        for arch, folder in folders.items():
            cfg = load_config(folder)
            params = fuse_params(load_params_sharded(folder, cfg, torch.float32, "cpu", rank,
                                                     world), cfg)
            tokens, logits = _greedy(params, cfg_for_rank(cfg, world), mesh)
            traced = _greedy(params, cfg_for_rank(cfg, world), mesh, traced=True)
            torch.save({"tokens": tokens, "logits": logits, "traced": traced,
                        "shapes": {n: tuple(t.shape) for n, t in params.items()}},
                       f"{out_dir}/{arch}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tp2_runs(folders, tmp_path_factory):
    """One spawn of 2 gloo ranks runs every variant (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("tp2")
    ctx = mp.start_processes(_tp_worker, args=(2, _free_port(), {a: str(f) for a, f in
                                                                 folders.items()}, str(out)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1.0):     # raises if a rank failed (and stops the other)
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                    proc.join(5)
                pytest.fail("TP=2 workers did not finish within 120 s")
    except mp.ProcessExitedException as e:
        # now and then gloo's teardown (destroy_process_group) aborts a rank after it saved
        # every result ("terminate called without an active exception"): those results stand;
        # a rank that died before saving them fails the test
        if e.signal_name != "SIGABRT" or not all((out / f"{a}-{r}.pt").is_file() for a in ARCHS
                                                 for r in range(2)):
            raise
        print(f"TP=2 worker {e.error_index} died by a signal after saving its results: {e}")
    return {(arch, rank): torch.load(out / f"{arch}-{rank}.pt") for arch in ARCHS
            for rank in range(2)}


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_world1(folders, tp2_runs, arch):
    cfg = load_config(folders[arch])
    tokens, logits = _greedy(fuse_params(load_params(folders[arch], cfg, torch.float32), cfg),
                             cfg, None)
    assert len(set(tokens)) >= 3, f"degenerate tiny model: {tokens}"
    rank0, rank1 = tp2_runs[arch, 0], tp2_runs[arch, 1]
    # the ranks really held half the heads and ffw (kv heads: half, or the one they need)
    D, H, K = cfg.head_dim, cfg.num_heads // 2, max(cfg.num_kv_heads // 2, 1)
    assert rank0["shapes"]["model.layers.0.self_attn.qkv_proj.weight"][0] == (H + 2 * K) * D
    assert rank0["shapes"]["model.layers.0.mlp.down_proj.weight"][1] == cfg.intermediate_size // 2
    assert rank0["shapes"]["model.embed_tokens.weight"][0] == cfg.vocab_size // 2
    assert rank0["tokens"] == tokens
    torch.testing.assert_close(rank0["logits"], logits, atol=1e-4, rtol=1e-4)
    # all-gathered logits: both ranks see the same numbers and so pick the same tokens
    assert rank1["tokens"] == rank0["tokens"] and torch.equal(rank1["logits"], rank0["logits"])
    # the step traced whole (functional collectives in the graph) computes the same numbers
    for rank in (rank0, rank1):
        assert rank["traced"][0] == rank["tokens"]
        assert torch.equal(rank["traced"][1], rank["logits"])
