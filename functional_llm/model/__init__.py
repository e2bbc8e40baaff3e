"""The llama-family model: config, parameter specs, safetensors loader, forward.
The GGUF converter (model.gguf) is imported on demand: it pulls in transformers' model code."""
from functional_llm.model.config import ModelConfig, load_config
from functional_llm.model.llama import compute_logits, forward, fuse_params
from functional_llm.model.loader import load_params, write_params
from functional_llm.model.spec import ParamSpec, param_specs

__all__ = ["ModelConfig", "load_config", "ParamSpec", "param_specs", "load_params",
           "write_params", "forward", "compute_logits", "fuse_params"]
