"""Tiny random Hugging Face checkpoints for numerics tests (a helper module, not a test file).

Each variant keeps the structure of its real family at toy size: Qwen3 (tied embedding,
per-head q/k norm, head_dim 32 != hidden / heads as in the real Qwen3 sizes), Qwen2 (q/k/v
biases, untied), Llama (untied, head_dim = hidden / heads) and Llama with a single kv head
(MQA, tied).
"""
from __future__ import annotations

import pathlib

import torch
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

TINY_VOCAB = 256
EOS_ID = 255
BOS_ID = 1
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID)

# name -> (config class, model class, family-specific config fields; rope_theta as in
# the real family, so a loader that ignores it fails)
VARIANTS = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5e5)),
    "llama-mqa": (LlamaConfig, LlamaForCausalLM,
                  dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e4)),
}


def build_tiny_model(arch: str, seed: int = 0, init_std: float = 0.25,
                     num_layers: int = 2) -> torch.nn.Module:
    """A random fp32 model of variant `arch`, deterministic in `seed`. Weights are drawn here
    (not by transformers' initialiser) so norms and biases are non-trivial too, and with a
    large std so logits are peaked and greedy outputs change from step to step."""
    config_cls, model_cls, fields = VARIANTS[arch]
    fields = dict(fields)
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    config = config_cls(**{**_COMMON, "num_hidden_layers": num_layers}, **fields,
                        rope_parameters=rope, initializer_range=init_std, dtype="float32")
    model = model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(init_std * noise)
    return model


def make_tiny_model(arch: str, folder, seed: int = 0, init_std: float = 0.25,
                    num_layers: int = 2) -> pathlib.Path:
    """Save a tiny model of variant `arch` ("qwen3", "qwen2", "llama", "llama-mqa") to `folder`
    as safetensors plus generation_config.json; returns the folder."""
    folder = pathlib.Path(folder)
    model = build_tiny_model(arch, seed, init_std, num_layers)
    model.save_pretrained(str(folder))
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID).save_pretrained(str(folder))
    return folder


def add_char_tokenizer(folder) -> pathlib.Path:
    """Give a tiny model folder a character-level tokenizer with a chat template, so text
    prompts, stop strings and chat work on it: id i is the character chr(i) where that is
    printable (ASCII prompts encode as themselves), else chr(256 + i); 0, 1 and EOS_ID are
    <unk>, <s> and </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {0: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
    vocab = {special.get(i) or (chr(i) if chr(i).isprintable() or i == 10 else chr(256 + i)): i
             for i in range(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(folder))
    return pathlib.Path(folder)
