"""Host time of outputs.apply per step (the shell's output transition) at 256 streamed requests,
when every output is 16 tokens long and when it is 8,192 long: the per-step cost must depend on
what is new, not on what is there (target: <= 1.2x). Synthetic deltas, one token per request
per step, and a fake decode (a table of word pieces), so only apply's own work is measured:
incremental detokenization, the stop-string window, persistent vectors, the outputs.

    python benchmarks/apply_step.py [--requests 256] [--steps 200] [--generate]
"""
import argparse
import random
import statistics
import time
from types import MappingProxyType

import attrs
import immutables
from pyrsistent import pvector

from functional_llm.core.records import Deltas, Request, SamplingParams
from functional_llm.llm import quiet_collector
from functional_llm.outputs import apply, start

PIECES = [" the", " a", " cat", " sat", " on", " mat", ",", ".", " and", " é", "\n"]


def decode(ids) -> str:
    return "".join(PIECES[i] for i in ids)


def outputs_at(length: int, n: int, stream: bool, rng) -> immutables.Map:
    """n requests whose outputs are already `length` tokens long (built directly: stepping
    256 requests to 8,192 tokens would only repeat what is measured)."""
    params = SamplingParams(max_tokens=1 << 20, stop=["STOP here", "\n\n"] if stream else ())
    live = {}
    for i in range(n):
        req = Request(rid=f"r{i}", prompt=(1, 2, 3), params=params, seed=i)
        toks = [rng.randrange(len(PIECES) - 1) for _ in range(length)]
        parts = pvector(PIECES[t] for t in toks)
        live[req.rid] = attrs.evolve(start(req, None, stream), token_ids=pvector(toks),
                                     prefix_offset=length - 1, read_offset=length,
                                     text_parts=parts, tail="".join(parts[-8:])[-8:])
    return immutables.Map(live)


def time_steps(outputs, steps: int, rng) -> float:
    """Median seconds of one apply over `steps` steps (one new token per request each)."""
    rids = tuple(outputs.keys())
    times = []
    for _ in range(steps):
        deltas = Deltas(rids=rids, tokens=tuple(rng.randrange(len(PIECES) - 1) for _ in rids),
                        num_cached=MappingProxyType(dict.fromkeys(rids, 0)))
        t0 = time.perf_counter()
        outputs, emitted = apply(outputs, deltas, decode)
        times.append(time.perf_counter() - t0)
        assert len(emitted.outputs) == len(rids) or not outputs.get(rids[0]).stream
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--generate", action="store_true", help="generate's path: not streamed, no stop strings")
    args = ap.parse_args()
    quiet_collector()
    rng = random.Random(0)
    per = {}
    for length in (16, 8192):
        outputs = outputs_at(length, args.requests, not args.generate, rng)
        per[length] = time_steps(outputs, args.steps, rng)
        print(f"output length {length:5d}: apply {per[length] * 1e3:.3f} ms per step "
              f"({args.requests} requests, median of {args.steps})")
    ratio = per[8192] / per[16]
    print(f"ratio 8192 / 16: {ratio:.2f}x (target <= 1.2x) {'OK' if ratio <= 1.2 else 'OVER'}")


if __name__ == "__main__":
    main()
