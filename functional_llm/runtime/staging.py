"""Plan -> device inputs. Host work on the per-step path, so it is vectorised with numpy:
one Python pass over the rows to collect token ids, the rest as array arithmetic."""
from __future__ import annotations

import attrs
import numpy as np
import torch

from functional_llm.core.records import MAX_BANNED, Plan, SchedConfig, SchedState
from functional_llm.core.scheduler import banned_ids
from functional_llm.kernels.base import AttnBatch
from functional_llm.runtime.sampling import SamplingTensors, sampling_from_blocks


@attrs.frozen(slots=True)
class StepInputs:
    """Everything the device step reads, already on the device."""

    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64 absolute positions
    attn: AttnBatch
    sample_rows: torch.Tensor    # [Bs] int64: row in T of each sampling sequence's last token
    sampling: SamplingTensors    # [Bs] per sampling row


NONE = np.zeros(0, dtype=np.int64)


@attrs.frozen(slots=True)
class HostInputs:
    """The step's inputs as host arrays (what `to_device` copies, or the decode graphs copy
    into their static buffers)."""

    ids: np.ndarray            # [T] int64
    positions: np.ndarray      # [T] int64
    slots: np.ndarray          # [T] int64
    cu_q: np.ndarray           # [B+1] int32
    seq_lens: np.ndarray       # [B] int32
    tables: np.ndarray         # [B, M] int32
    sample_rows: np.ndarray    # [Bs] int64
    floats: np.ndarray         # [3, Bs] float32: temperature, top_p, min_p
    ints: np.ndarray           # [3, Bs] int64: top_k, seed, position
    max_q: int
    banned: np.ndarray         # [Bs, MAX_BANNED] int64: ids masked (min_tokens), -1 = none
    logprobs_k: int = -1       # the largest `logprobs` of the sampling rows (-1: none asks)
    prompt_k: int = -1         # the largest `prompt_logprobs` of the rows (-1: none asks)
    prompt_rows: np.ndarray = NONE   # [P] int64 rows of ids whose next token is a prompt token
    prompt_ids: np.ndarray = NONE    # [P] int64 that prompt token, of a prompt_logprobs request

    @property
    def is_decode(self) -> bool:
        """One token per row, every row sampled: the shape CUDA graphs are captured for."""
        return self.max_q == 1 and len(self.sample_rows) == len(self.seq_lens)

    def row_of_token(self, index: np.ndarray) -> np.ndarray:
        """The row (sequence) of each token index into ids."""
        return np.searchsorted(self.cu_q, index, side="right") - 1


def stage_host(state: SchedState, plan: Plan, sched: SchedConfig) -> HostInputs:
    """Build the step's inputs from the post-schedule state (block tables are allocated)."""
    block_size, seqs = sched.block_size, state.seqs
    starts, counts = np.asarray(plan.starts, dtype=np.int64), np.asarray(plan.counts, dtype=np.int64)
    rows = [seqs[rid] for rid in plan.rids]
    if counts.max() == 1:  # pure decode: one token per row
        ids = np.fromiter((s.tokens[p] for s, p in zip(rows, plan.starts)), np.int64, len(rows))
        positions, row_of = starts, np.arange(len(rows))
    else:
        ids = np.concatenate([np.asarray(s.tokens[p:p + c], dtype=np.int64)
                              for s, p, c in zip(rows, plan.starts, plan.counts)])
        row_of = np.repeat(np.arange(len(rows)), counts)
        cu = np.concatenate(([0], np.cumsum(counts)))
        positions = np.arange(len(ids)) - cu[row_of] + starts[row_of]
    block_tables = [s.block_table for s in rows]
    lens = np.fromiter(map(len, block_tables), np.int64, len(rows))
    tables = np.zeros((len(rows), lens.max()), dtype=np.int32)
    tables[np.arange(tables.shape[1]) < lens[:, None]] = np.concatenate(block_tables)
    slots = tables[row_of, positions // block_size].astype(np.int64) * block_size + positions % block_size
    seq_lens = starts + counts
    cu_q = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_q[1:])

    sample_idx = [r for r, smp in enumerate(plan.sample) if smp]
    knobs = [rows[r].req.knobs for r in sample_idx]   # Request.knobs
    floats = np.ascontiguousarray(np.array([k[:3] for k in knobs], dtype=np.float32).reshape(-1, 3).T)
    ints = np.empty((3, len(knobs)), dtype=np.int64)
    ints[:2] = np.array([k[3:5] for k in knobs], dtype=np.int64).reshape(-1, 2).T
    ints[2] = seq_lens[sample_idx]  # the sampled token's absolute position keys its noise
    banned = np.full((len(knobs), MAX_BANNED), -1, dtype=np.int64)
    for i in np.flatnonzero(ints[2] < np.fromiter((k[5] for k in knobs), np.int64, len(knobs))):
        ban = banned_ids(sched, rows[sample_idx[i]].req)      # under min_tokens: rare
        banned[i, :len(ban)] = ban
    asks = [r.req.params.logprobs for r in (rows[i] for i in sample_idx)]
    host = HostInputs(ids, positions, slots, cu_q, seq_lens.astype(np.int32), tables,
                      (cu_q[1:][sample_idx] - 1).astype(np.int64), floats, ints, int(counts.max()),
                      banned, max((k for k in asks if k is not None), default=-1))
    prompt = [r for r, s in enumerate(rows) if s.req.params.prompt_logprobs is not None]
    return _prompt_targets(host, rows, prompt, starts, counts) if prompt else host


def _prompt_targets(host: HostInputs, rows, prompt: list, starts, counts) -> HostInputs:
    """The prompt_logprobs rows: each token of such a row's chunk whose next position holds a
    prompt token (the logits at position p predict the token at p + 1)."""
    token_rows, targets = [], []
    for r in prompt:
        ids, start = rows[r].req.prompt, int(starts[r])
        end = min(start + int(counts[r]), len(ids) - 1)
        token_rows += range(host.cu_q[r], host.cu_q[r] + max(end - start, 0))
        targets += ids[start + 1:end + 1]
    return attrs.evolve(host, prompt_k=max(rows[r].req.params.prompt_logprobs for r in prompt),
                        prompt_rows=np.array(token_rows, np.int64), prompt_ids=np.array(targets, np.int64))


def to_device(h: HostInputs, device) -> StepInputs:
    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    attn = AttnBatch(slot_mapping=dev(h.slots), cu_q=dev(h.cu_q), seq_lens=dev(h.seq_lens),
                     block_tables=dev(h.tables), max_q=h.max_q, max_seq_len=int(h.seq_lens.max()))
    return StepInputs(dev(h.ids), dev(h.positions), attn, dev(h.sample_rows),
                      sampling_from_blocks(h.floats, h.ints, h.banned, device))
