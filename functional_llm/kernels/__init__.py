"""Attention backends behind one interface (see base.py), chosen by name."""
from functional_llm.kernels.base import (AttentionBackend, AttnBatch, available_backends, default_backend,
                                         get_backend)

__all__ = ["AttnBatch", "AttentionBackend", "get_backend", "available_backends", "default_backend"]
