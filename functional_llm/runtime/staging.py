"""Plan -> device inputs. Host work on the per-step path, so it is vectorised with numpy:
one Python pass over the rows to collect token ids, the rest as array arithmetic."""
from __future__ import annotations

import attrs
import numpy as np
import torch

from functional_llm.core.records import Plan, SchedState
from functional_llm.kernels.base import AttnBatch
from functional_llm.runtime.sampling import SamplingTensors, make_sampling_tensors


@attrs.frozen(slots=True)
class StepInputs:
    """Everything the device step reads, already on the device."""

    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64 absolute positions
    attn: AttnBatch
    sample_rows: torch.Tensor    # [Bs] int64: row in T of each sampling sequence's last token
    sampling: SamplingTensors    # [Bs] per sampling row


def stage(state: SchedState, plan: Plan, block_size: int, device) -> StepInputs:
    """Build the step's inputs from the post-schedule state (block tables are allocated)."""
    seqs = state.seqs
    starts = np.asarray(plan.starts, dtype=np.int64)
    counts = np.asarray(plan.counts, dtype=np.int64)
    rows = [seqs[rid] for rid in plan.rids]
    if counts.max() == 1:  # pure decode: one token per row
        ids = np.fromiter((s.tokens[p] for s, p in zip(rows, plan.starts)), np.int64, len(rows))
        positions = starts
        row_of = np.arange(len(rows))
    else:
        ids = np.concatenate([np.asarray(s.tokens[p:p + c], dtype=np.int64)
                              for s, p, c in zip(rows, plan.starts, plan.counts)])
        row_of = np.repeat(np.arange(len(rows)), counts)
        cu = np.concatenate(([0], np.cumsum(counts)))
        positions = np.arange(len(ids)) - cu[row_of] + starts[row_of]
    width = max(len(s.block_table) for s in rows)
    tables = np.zeros((len(rows), width), dtype=np.int32)
    for r, s in enumerate(rows):
        tables[r, :len(s.block_table)] = s.block_table
    slots = tables[row_of, positions // block_size].astype(np.int64) * block_size + positions % block_size
    seq_lens = starts + counts
    cu_q = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_q[1:])

    sample_idx = [r for r, smp in enumerate(plan.sample) if smp]
    params = [rows[r].req.params for r in sample_idx]
    sampling = make_sampling_tensors(
        temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params], min_p=[p.min_p for p in params],
        seeds=[rows[r].req.seed for r in sample_idx], positions=seq_lens[sample_idx],
        device=device)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    attn = AttnBatch(slot_mapping=dev(slots), cu_q=dev(cu_q), seq_lens=dev(seq_lens.astype(np.int32)),
                     block_tables=dev(tables), max_q=int(counts.max()), max_seq_len=int(seq_lens.max()))
    return StepInputs(dev(ids), dev(positions), attn, dev(cu_q[1:][sample_idx] - 1), sampling)
