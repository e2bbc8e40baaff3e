"""Host time per decode step at 256 running sequences: schedule + commit + staging the device
inputs (no model). Target (ARCHITECTURE.md): <= 2 ms on the 2-core development machine.

    python benchmarks/host_step.py [--seqs 256] [--steps 200]
"""
import argparse
import random
import time


from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.records import Request, SamplingParams, SchedConfig, new_state
from functional_llm.llm import quiet_collector
from functional_llm.runtime.staging import stage_host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--default-gc", action="store_true", help="keep the collector as Python sets it")
    args = ap.parse_args()
    rng = random.Random(0)
    cfg = SchedConfig(block_size=args.block_size, num_blocks=40000, max_num_seqs=args.seqs,
                      max_num_batched_tokens=1 << 20, max_model_len=8192)
    st = new_state(cfg)
    for i in range(args.seqs):
        prompt = tuple(rng.randrange(1, 10000) for _ in range(rng.randrange(100, 1024)))
        params = SamplingParams(temperature=0.6, max_tokens=4000, ignore_eos=True)
        st = S.admit(st, cfg, Request(f"r{i}", prompt, params, i, i))
    st, plan = S.schedule(st, cfg)                      # the prefill step
    st, _ = C.commit(st, cfg, plan, [1] * len(plan.rids))
    if not args.default_gc:
        quiet_collector()    # as LLM does after start-up
    times = {"schedule": [], "stage": [], "commit": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        st, plan = S.schedule(st, cfg)
        t1 = time.perf_counter()
        stage_host(st, plan, cfg)
        t2 = time.perf_counter()
        st, _ = C.commit(st, cfg, plan, [rng.randrange(10000) for _ in plan.rids])
        t3 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(dt)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"{args.seqs} running sequences, {args.steps} decode steps (median ms): "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + f", total {sum(med.values()):.3f} ms")


if __name__ == "__main__":
    main()
