"""Attention backends behind one interface (see base.py), chosen by name."""
from functional_llm.kernels.base import AttnBatch, AttentionBackend, get_backend, available_backends

__all__ = ["AttnBatch", "AttentionBackend", "get_backend", "available_backends"]
