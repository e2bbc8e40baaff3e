"""The model description read from a Hugging Face folder (config.json + generation_config.json).

Only what the llama-family forward needs is kept, as one frozen record; everything a user can
get wrong about the folder is reported as InvalidModel naming the file or key at fault.
"""
from __future__ import annotations

import json
import pathlib

import attrs

from functional_llm.errors import InvalidModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_DEFAULT_ROPE_THETA = 10000.0  # the transformers default for all three families
# features of these families that the forward does not implement: (config.json key, the one
# supported value, which an absent key or a null / false / empty one also means, what is missing)
_UNSUPPORTED = (("hidden_act", "silu", "only the SiLU-gated MLP is supported"),
                ("mlp_bias", False, "MLP biases are not supported"),
                ("use_sliding_window", False, "sliding-window attention is not supported"))


@attrs.frozen(slots=True)
class ModelConfig:
    arch: str                      # "llama" | "qwen2" | "qwen3"
    vocab_size: int                # V
    hidden_size: int               # E
    intermediate_size: int
    num_layers: int
    num_heads: int                 # H
    num_kv_heads: int              # K
    head_dim: int                  # D
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool                 # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool                  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None        # the checkpoint's dtype name, e.g. "bfloat16"
    batch_invariant: bool = False  # LLM(batch_invariant=True): GEMMs and norms of kernels/invariant.py


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidModel("model", str(path), f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidModel("model", str(path), f"{path.name} must hold a JSON object")
    return data


def _ids(value) -> tuple[int, ...]:
    """eos_token_id may be absent, one int or a list of ints."""
    return (value,) if isinstance(value, int) else tuple(int(v) for v in value or ())


def _rope_theta(raw: dict, folder: pathlib.Path) -> float:
    # transformers 5 writes rope_parameters={"rope_theta", "rope_type"}; older files carry a
    # top-level rope_theta and an optional rope_scaling dict. Only plain RoPE is implemented.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise InvalidModel("rope_type", rope_type, f"{folder}/config.json asks for RoPE scaling "
                           f"'{rope_type}'; only rope_type 'default' is supported")
    return float(params.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA)))


def load_config(path) -> ModelConfig:
    """Read a Hugging Face model folder's configuration. Raises InvalidModel when the folder,
    config.json or the *.safetensors weights are missing, or the architecture is unsupported."""
    folder = pathlib.Path(path)
    if folder.is_file():
        raise InvalidModel("model", str(path), "is a file; expected a Hugging Face model folder "
                           "(config.json + *.safetensors)")
    if not folder.is_dir():
        raise InvalidModel("model", str(path), "folder does not exist")
    if not (folder / "config.json").is_file():
        raise InvalidModel("model", str(path), "no config.json in the folder")
    raw = _read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidModel("model_type", model_type, f"{folder}/config.json: supported model types are "
                           f"{list(SUPPORTED_MODEL_TYPES)}")
    if not any(folder.glob("*.safetensors")):
        raise InvalidModel("model", str(path), "no *.safetensors weight files in the folder")
    for key, supported, why in _UNSUPPORTED:
        if (raw.get(key) or supported) != supported:
            raise InvalidModel(key, raw[key], f"{folder}: {why}")

    def need(key: str):
        if raw.get(key) is None:
            raise InvalidModel(key, None, f"{folder}/config.json has no '{key}'")
        return raw[key]

    generation_file = folder / "generation_config.json"   # its token ids win over config.json's
    merged = {**raw, **(_read_json(generation_file) if generation_file.is_file() else {})}
    bos = merged.get("bos_token_id")

    num_heads, hidden = int(need("num_attention_heads")), int(need("hidden_size"))
    return ModelConfig(
        arch=model_type, vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads, num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads), rope_theta=_rope_theta(raw, folder),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        eos_token_ids=_ids(merged.get("eos_token_id")), bos_token_id=None if bos is None else int(bos),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"))
