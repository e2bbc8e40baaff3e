"""Every step replayed from a CUDA graph: one graph per (bucket, sampler mode), all captured
at start-up.

A step launches hundreds of kernels; replaying a captured graph costs one launch. Graphs read
fixed addresses, so every input lives in a static device buffer sized for the largest
bucket, and a step is padded up to its bucket:
* decode buckets (every row one token, every row sampled): b rows of one token. Pad rows are
  harmless decodes (position 0, one key, K/V written to a scratch block outside the pool).
* mixed buckets (anything else, prefill chunks included): T tokens and B = min(max_seqs, T - 1)
  rows, so T > B always (the attention op launches its prefill kernel exactly when T > B).
  Pad tokens belong to no row and write the scratch block; pad rows hold no tokens.
Sampled rows are padded to the bucket's rows with greedy rows. A step of T tokens and B rows
takes the smallest decode bucket >= B if it is a decode, else the smallest mixed bucket
with T_b >= max(T, B + 1): every step the scheduler can make fits one.
All inputs sit in one byte buffer: the host fills a pinned copy (two, used in turn, so filling
step k+1 never races the copy of step k) and one asynchronous copy moves it.
Sampler modes: `unfiltered` (temperature / greedy rows, no sort) and filtered (top-k/p, min-p:
a vocabulary sort); greedy-only steps take the unfiltered graph, whose greedy rows are exact.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from functional_llm.core.records import MAX_BANNED
from functional_llm.kernels.base import AttnBatch
from functional_llm.runtime.sampling import SamplingTensors, sampling_rows
from functional_llm.runtime.staging import HostInputs, StepInputs

MODES = (True, False)     # unfiltered, filtered


def decode_buckets(max_seqs: int) -> list[int]:
    """Row counts. No bucket of 1: a size-1 dimension would be specialised by the compiler
    (a second compile); batch 1 runs padded to 2."""
    small = {b for b in (2, 4, 8, 16, 24, 32) if b < max_seqs}
    return sorted(small | set(range(48, max_seqs, 16)) | {max(2, max_seqs)})


def mixed_buckets(max_tokens: int, max_seqs: int) -> list[int]:
    """Token counts: powers of two to 512, then steps of 512; the top one holds any step."""
    top = max_tokens + 1 if max_seqs >= max_tokens else max_tokens
    sizes = {16 << i for i in range(6)} | set(range(1024, top, 512))
    return sorted({t for t in sizes if t < top} | {max(16, top)})


def _layout(num_tokens: int, num_rows: int, max_blocks: int) -> tuple[dict, int]:
    """name -> (dtype, shape, byte offset) of the static inputs in one 8-byte aligned buffer."""
    fields = {"ids": (np.int64, (num_tokens,)), "positions": (np.int64, (num_tokens,)),
              "slots": (np.int64, (num_tokens,)), "sample_rows": (np.int64, (num_rows,)),
              "ints": (np.int64, (3, num_rows)), "feed_dst": (np.int64, (num_rows,)),
              "feed_src": (np.int64, (num_rows,)), "floats": (np.float32, (3, num_rows)),
              "banned": (np.int64, (num_rows, MAX_BANNED)),
              "cu_q": (np.int32, (num_rows + 1,)), "seq_lens": (np.int32, (num_rows,)),
              "tables": (np.int32, (num_rows, max_blocks))}
    out, off = {}, 0
    for name, (dt, shape) in fields.items():
        out[name] = (dt, shape, off)
        off += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 8) * 8
    return out, off


def _views(buf: torch.Tensor, layout) -> dict:
    """Typed views of a flat uint8 buffer."""
    tt = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}
    return {k: buf[o:o + int(np.prod(s)) * np.dtype(d).itemsize].view(tt[d]).view(s)
            for k, (d, s, o) in layout.items()}


class StepGraphs:
    def __init__(self, step_fn, max_seqs: int, max_tokens: int, max_blocks: int,
                 scratch_block: int, block_size: int, max_seq_len: int, device, mark_dynamic: bool = False):
        """mark_dynamic: step_fn is compiled: mark the token and row dimensions of its inputs
        dynamic, so one compile per sampler mode serves every bucket."""
        self.step_fn, self.device, self.mark_dynamic = step_fn, device, mark_dynamic
        self.decode, self.mixed = decode_buckets(max_seqs), mixed_buckets(max_tokens, max_seqs)
        self.row_cap, self.scratch_block, self.max_seq_len = max_seqs, scratch_block, max_seq_len
        self.scratch_slot = scratch_block * block_size
        self.layout, nbytes = _layout(max(self.mixed[-1], self.decode[-1]), self.decode[-1], max_blocks)
        self.buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.dev = _views(self.buf, self.layout)
        pin = torch.device(device).type == "cuda"     # (CPU: the padding is tested without graphs)
        self.pinned = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.host = [{k: v.numpy() for k, v in _views(p, self.layout).items()} for p in self.pinned]
        self.turn, self.graphs, self.mempool = 0, {}, None   # graphs: by (decode, size, unfiltered)
        self.capture_seconds = self.compile_seconds = 0.0     # start-up, compiles included

    def mixed_rows(self, tokens: int) -> int:
        return min(self.row_cap, tokens - 1)

    def release(self) -> None:
        """Free every captured graph. A graph that captured NCCL collectives must be freed before
        its process group is destroyed (destroying the group first hangs)."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs = {}

    def bucket(self, h: HostInputs) -> tuple[bool, int]:
        """(is_decode, size) of the bucket a step takes."""
        B = len(h.seq_lens)
        if h.is_decode:
            return True, next(x for x in self.decode if x >= B)
        need = max(len(h.ids), B + 1)
        return False, next(x for x in self.mixed if x >= need)

    def _fill(self, host: dict, h: HostInputs | None, decode: bool, size: int) -> None:
        """Write h's rows into a pinned buffer and pad them to the bucket (h None: all pad)."""
        T, B, Bs = (0, 0, 0) if h is None else (len(h.ids), len(h.seq_lens), len(h.sample_rows))
        rows = size if decode else self.mixed_rows(size)
        if h is not None:   # each field's leading rows (floats and ints: [3, Bs], rows second)
            for name, n in (("ids", T), ("positions", T), ("slots", T), ("cu_q", B + 1),
                            ("seq_lens", B), ("sample_rows", Bs), ("banned", Bs)):
                host[name][:n] = getattr(h, name)
            host["tables"][:B, :h.tables.shape[1]] = h.tables
            host["floats"][:, :Bs] = h.floats
            host["ints"][:, :Bs] = h.ints
        host["ids"][T:size] = 0
        host["positions"][T:size] = 0
        host["slots"][T:size] = self.scratch_slot
        # decode pad rows hold one pad token each; mixed pad rows hold none
        host["cu_q"][B + 1:rows + 1] = np.arange(B + 1, rows + 1) if decode else T
        host["seq_lens"][B:rows] = 1
        host["tables"][B:rows] = self.scratch_block
        host["sample_rows"][Bs:rows] = np.arange(Bs, rows) if decode else 0
        host["floats"][:, Bs:rows] = 0.0
        host["floats"][1, Bs:rows] = 1.0                 # pad rows: greedy, top_p 1
        host["ints"][:, Bs:rows] = 0
        host["banned"][Bs:rows] = -1

    def inputs(self, decode: bool, size: int, unfiltered: bool) -> StepInputs:
        """The static buffers as the StepInputs of bucket (decode, size) in a sampler mode."""
        d, rows = self.dev, (size if decode else self.mixed_rows(size))
        attn = AttnBatch(slot_mapping=d["slots"][:size], cu_q=d["cu_q"][:rows + 1],
                         seq_lens=d["seq_lens"][:rows], block_tables=d["tables"][:rows],
                         max_q=1 if decode else size, max_seq_len=self.max_seq_len)
        sampling = SamplingTensors(d["floats"][0, :rows], d["ints"][0, :rows], d["floats"][1, :rows],
                                   d["floats"][2, :rows], d["ints"][1, :rows], d["ints"][2, :rows],
                                   False, unfiltered, d["banned"][:rows])
        inputs = StepInputs(d["ids"][:size], d["positions"][:size], attn, d["sample_rows"][:rows], sampling)
        if self.mark_dynamic:
            for t in (inputs.input_ids, inputs.positions, attn.slot_mapping, attn.cu_q,
                      attn.seq_lens, attn.block_tables, inputs.sample_rows, *sampling_rows(sampling)):
                torch._dynamo.mark_dynamic(t, 0)
        return inputs

    def run(self, h: HostInputs, feed=None) -> tuple:
        """Stage h (and the feed of ids from the previous step's tokens), replay; returns the
        step's outputs (tokens [Bs], logits [Bs', V], hidden [T', E]) in the graph's static
        buffers (Bs' >= Bs and T' >= T: the padding), on the device."""
        graph, (tokens, logits, hidden) = self.graphs[self.stage(h, feed)]
        graph.replay()
        return tokens[:len(h.sample_rows)], logits, hidden

    def stage(self, h: HostInputs, feed=None) -> tuple:
        """Copy h, padded to its bucket, into the static buffers (and apply the feed); returns
        the key (decode, size, unfiltered) of the graph that reads them."""
        decode, size = self.bucket(h)
        host, self.turn = self.host[self.turn], 1 - self.turn
        self._fill(host, h, decode, size)
        nf = 0 if feed is None else len(feed.dst)
        if nf:
            host["feed_dst"][:nf] = feed.dst
            host["feed_src"][:nf] = feed.index
        self.buf.copy_(self.pinned[1 - self.turn], non_blocking=True)
        if nf:
            self.dev["ids"].index_copy_(0, self.dev["feed_dst"][:nf], feed.src[self.dev["feed_src"][:nf]])
        unfiltered = bool(np.all(h.ints[0] == 0) and np.all(h.floats[1] >= 1) and np.all(h.floats[2] <= 0))
        return decode, size, unfiltered

    def capture_all(self) -> None:
        """Compile (first call of each mode) and capture every (bucket, mode), largest first so
        the shared memory pool is sized once. Inputs are all pad rows: they write only the
        scratch block."""
        t0 = time.perf_counter()
        keys = [(False, t) for t in reversed(self.mixed)] + [(True, b) for b in reversed(self.decode)]
        for unfiltered in MODES:
            for decode, size in keys:
                t1 = time.perf_counter()
                self._fill(self.host[0], None, decode, size)
                self.buf.copy_(self.pinned[0])
                self.graphs[(decode, size, unfiltered)] = self._capture(self.inputs(decode, size, unfiltered))
                if (decode, size) == keys[0]:     # the mode's first call compiles it
                    self.compile_seconds += time.perf_counter() - t1
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0

    def _capture(self, inputs: StepInputs):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.step_fn(inputs)          # compile / autotune outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.step_fn(inputs)
        self.mempool = graph.pool()
        return graph, out
