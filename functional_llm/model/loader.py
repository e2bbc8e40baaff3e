"""Read a folder of safetensors files into the flat params dict, checked against the spec."""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from functional_llm.errors import InvalidModel
from functional_llm.model.config import ModelConfig
from functional_llm.model.spec import param_specs

INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The shards named by model.safetensors.index.json, else every *.safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModel("model", str(index), f"unreadable shard index: {exc}") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise InvalidModel("model", str(folder), f"shards named in {INDEX_FILE} are missing: {missing}")
        return files
    if not (files := sorted(folder.glob("*.safetensors"))):
        raise InvalidModel("model", str(folder), "no *.safetensors weight files in the folder")
    return files


def load_params(path, cfg: ModelConfig, dtype: torch.dtype,
                device: str | torch.device = "cpu", select=None) -> dict[str, torch.Tensor]:
    """Every tensor of `param_specs(cfg)`, cast to `dtype` on `device`. Tensors the spec does
    not list (rotary inv_freq, a redundant lm_head of a tied model) are skipped. Raises
    InvalidModel naming the tensor when one is missing or has the wrong shape.
    select(name, shape) -> index tuple or None: read only that slice of a tensor (tensor
    parallelism); None reads it whole."""
    folder, specs, params = pathlib.Path(path), param_specs(cfg), {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in [n for n in handle.keys() if n in specs]:
                spec = specs[name]
                # read the shape from the header first: a mismatch costs no tensor copy
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != spec.shape:
                    raise InvalidModel(name, shape, f"{file.name}: expected shape {spec.shape} "
                                       f"from config.json")
                index = select(name, shape) if select is not None else None
                tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
                params[name] = tensor.to(device=device, dtype=dtype)
    if missing := [name for name in specs if name not in params]:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise InvalidModel(missing[0], None, f"{len(missing)} tensor(s) missing from {folder}: {shown}")
    return params


def write_params(path, params: dict[str, torch.Tensor], filename: str = "model.safetensors") -> pathlib.Path:
    """Save `params` as one safetensors file in folder `path` (created if needed). Tensors are
    made contiguous and must not share storage (drop a tied lm_head first)."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    save_file({name: t.detach().contiguous() for name, t in params.items()}, str(target),
              metadata={"format": "pt"})
    return target
