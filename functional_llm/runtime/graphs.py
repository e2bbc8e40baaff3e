"""Decode steps replayed from CUDA graphs: one graph per (batch-size bucket, sampler mode).

A decode step launches hundreds of small kernels; replaying a captured graph costs one launch.
Graphs read fixed addresses, so every input lives in a static buffer sized for the largest
bucket; a step of B rows copies its host arrays into the first B rows and pads the rest of its
bucket with harmless rows (position 0, one key, K/V written to a scratch block outside the
pool, greedy sampling). Captured lazily on first use of a (bucket, mode): the capture's warm-up
runs on the step's real inputs, so the K/V they write are exactly the values the replay writes.
"""
from __future__ import annotations

import numpy as np
import torch

from functional_llm.kernels.base import AttnBatch
from functional_llm.runtime.sampling import SamplingTensors
from functional_llm.runtime.staging import HostInputs, StepInputs


def buckets(max_seqs: int) -> list[int]:
    small = [1, 2, 4, 8, 16, 24, 32]
    return sorted({b for b in small if b < max_seqs} | set(range(48, max_seqs, 16)) | {max_seqs})


class DecodeGraphs:
    def __init__(self, step_fn, max_seqs: int, max_blocks: int, scratch_block: int,
                 block_size: int, max_seq_len: int, device):
        self.step_fn, self.device = step_fn, device
        self.buckets = buckets(max_seqs)
        self.scratch_block, self.max_seq_len = scratch_block, max_seq_len
        self.scratch_slot = scratch_block * block_size
        n, z = max_seqs, dict(device=device)
        self.ids = torch.zeros(n, dtype=torch.int64, **z)
        self.positions = torch.zeros(n, dtype=torch.int64, **z)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, **z)
        self.seq_lens = torch.ones(n, dtype=torch.int32, **z)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, **z)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, **z)
        self.sample_rows = torch.arange(n, dtype=torch.int64, **z)
        self.floats = torch.zeros(3, n, dtype=torch.float32, **z)
        self.ints = torch.zeros(3, n, dtype=torch.int64, **z)
        self.graphs: dict = {}
        self.mempool = None

    def fits(self, h: HostInputs) -> bool:
        return h.is_decode and len(h.seq_lens) <= self.buckets[-1]

    def _inputs(self, b: int, greedy_only: bool, unfiltered: bool) -> StepInputs:
        attn = AttnBatch(slot_mapping=self.slots[:b], cu_q=self.cu_q[:b + 1], seq_lens=self.seq_lens[:b],
                         block_tables=self.tables[:b], max_q=1, max_seq_len=self.max_seq_len)
        sampling = SamplingTensors(self.floats[0, :b], self.ints[0, :b], self.floats[1, :b],
                                   self.floats[2, :b], self.ints[1, :b], self.ints[2, :b],
                                   greedy_only, unfiltered)
        return StepInputs(self.ids[:b], self.positions[:b], attn, self.sample_rows[:b], sampling)

    def run(self, h: HostInputs) -> torch.Tensor:
        """Copy h into the static buffers, replay (capturing first if needed); tokens [B]."""
        B = len(h.seq_lens)
        b = next(x for x in self.buckets if x >= B)
        pad = b - B

        def put(buf, host, fill):
            buf[:b].copy_(torch.from_numpy(np.concatenate([host, np.full(pad, fill, host.dtype)])),
                          non_blocking=True)

        put(self.ids, h.ids, 0)
        put(self.positions, h.positions, 0)
        put(self.slots, h.slots, self.scratch_slot)
        put(self.seq_lens, h.seq_lens, 1)
        M = h.tables.shape[1]
        tables = np.full((b, M), self.scratch_block, np.int32)
        tables[:B] = h.tables
        self.tables[:b, :M].copy_(torch.from_numpy(tables), non_blocking=True)
        floats = np.zeros((3, b), np.float32)
        floats[:, :B] = h.floats
        floats[1:2, B:] = 1.0                       # pad rows: greedy, top_p 1
        ints = np.zeros((3, b), np.int64)
        ints[:, :B] = h.ints
        self.floats[:, :b].copy_(torch.from_numpy(floats), non_blocking=True)
        self.ints[:, :b].copy_(torch.from_numpy(ints), non_blocking=True)
        mode = (bool(np.all(h.floats[0] == 0)),
                bool(np.all(h.ints[0] == 0) and np.all(h.floats[1] >= 1) and np.all(h.floats[2] <= 0)))
        key = (b,) + mode
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, *mode)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:B]

    def _capture(self, b, greedy_only, unfiltered):
        inputs = self._inputs(b, greedy_only, unfiltered)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):          # compile / autotune outside the capture
                self.step_fn(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.step_fn(inputs)
        self.mempool = graph.pool()
        return graph, out
